"""The evaluation methods (the rows of the ZeroSearch / Search-R1 / ReSearch result tables):

* ``direct`` - answer with no search;
* ``rag`` - retrieve once with the question (top-k documents from the search backend), then answer;
* ``agent`` - the multi-turn ReSearch agent loop (:class:`searchrl.agent.loop.AgentLoop`).

:class:`Evaluator` runs one example with one method and returns its ``records.jsonl`` record; the resumable driver
over datasets x methods is :mod:`searchrl.evaluator.driver`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from searchrl.agent.loop import AgentLoop, Episode, SearchContext, SearchRecord, TurnRecord
from searchrl.agent.settings import AgentSettings, SamplingParams, Temperature, episode_seed
from searchrl.data.datasets import Example
from searchrl.errors import InvalidRequest
from searchrl.evaluator.metrics import METHOD_ORDER, answer_scores
from searchrl.evaluator.prompts import render_baseline_prompt
from searchrl.reward.scoring import score, validate_scheme


class EvalConfig(AgentSettings):
    """Generation and search settings shared by every method: the agent loop's settings (same fields and defaults,
    except greedy decoding) plus what only evaluation needs.

    ``max_new_tokens_per_turn`` also caps the whole answer of ``direct``/``rag``, ``top_k``, ``max_doc_chars``,
    ``template``, ``temperature`` and ``top_p`` apply to them too; ``response_prefix`` is the agent's (evaluate a policy
    with the prefix it was trained with), the baselines keep the agent loop's default ``<think>``.

    Attributes:
        temperature: 0 is greedy decoding (the default for evaluation).
        seed: base seed; each example is sampled with a seed derived from it, the dataset and the example id.
        concurrency: examples in flight at once (an asyncio semaphore).
        scheme: reward-library scheme that decides format validity (``research``, ``search_r1_em`` ...).

    Raises:
        InvalidRequest: on construction, a value out of range (e.g. ``max_turns must be >= 1, got 0``) or an
            unknown scheme.
    """

    temperature: Temperature = 0.0
    seed: int = 0
    concurrency: Annotated[int, Field(ge=1)] = 8
    scheme: Annotated[str, AfterValidator(validate_scheme)] = "research"


def resolve_methods(methods: Sequence[str] | str, has_search: bool) -> list[str]:
    """The methods named by ``methods`` (names, comma-separated lists or ``all``), in order and without repeats.

    Raises:
        InvalidRequest: an unknown method, none at all, or ``rag`` without a search backend.
    """
    flat: list[str] = []
    for part in ",".join([methods] if isinstance(methods, str) else methods).split(","):
        part = part.strip()
        if part == "all":
            flat += [x for x in METHOD_ORDER if x != "rag" or has_search]
        elif part in METHOD_ORDER:
            flat.append(part)
        elif part:
            raise InvalidRequest(f"unknown method {part!r}; expected one of {', '.join(METHOD_ORDER)} or all")
    flat = list(dict.fromkeys(flat))
    if not flat:
        raise InvalidRequest("no method given")
    if "rag" in flat and not has_search:
        raise InvalidRequest("the rag baseline needs a search backend (--search retriever|simulator)")
    return flat


class Evaluator:
    """Runs methods over datasets against one policy backend and one search backend.

    Args:
        policy: a :class:`~searchrl.agent.loop.GenerationBackend` (``TransformersEngine``, ``SGLangEngine``,
            ``RemotePolicyBackend``); its ``tokenizer`` renders the prompts.
        search: a :class:`~searchrl.agent.loop.SearchBackend`, or ``None`` (then only ``direct`` and a
            search-less ``agent`` can run).
        config: generation settings.
        search_name: label of the search backend for records and MLflow (``retriever``, ``simulator``, ``none``).
    """

    def __init__(self, policy: Any, search: Any | None, config: EvalConfig, search_name: str = "") -> None:
        self.policy = policy
        self.search = search
        self.config = config
        self.search_name = search_name or ("none" if search is None else type(search).__name__)
        self.agent = AgentLoop(policy, search, config)

    async def _run_baseline(self, method: str, ex: Example, seed: int) -> Episode:
        c = self.config
        searches: list[SearchRecord] = []
        if method == "rag":
            if self.search is None:
                raise InvalidRequest("the rag baseline needs a search backend (--search retriever|simulator)")
            t0 = time.perf_counter()
            # No gold answers in the context: a simulator must not see them at evaluation time.
            outcome = await self.search.search(
                ex.question, top_k=c.top_k, context=SearchContext(question=ex.question, golden_answers=[], seed=seed)
            )
            ms = (time.perf_counter() - t0) * 1000
            searches.append(
                SearchRecord(
                    ex.question, list(outcome.documents), outcome.backend, ms, outcome.cache_hit, outcome.error
                )
            )
        prefix = AgentSettings.model_fields["response_prefix"].default
        _text, prompt_ids = render_baseline_prompt(
            self.policy.tokenizer,
            method,
            ex.question,
            searches[0].documents if searches else (),
            template=c.template,
            response_prefix=prefix,
            max_doc_chars=c.max_doc_chars,
        )
        t1 = time.perf_counter()
        out = await self.policy.generate(
            prompt_ids,
            SamplingParams(max_new_tokens=c.max_new_tokens_per_turn, temperature=c.temperature, top_p=c.top_p),
            stop=("</answer>",),
            seed=seed,
        )
        n = len(out.token_ids)
        search = searches[0] if searches else None
        # A stop at </answer> is where the episode ends (as the agent loop does); only "length" is cut short.
        return Episode(
            question_id=ex.id,
            question=ex.question,
            golden_answers=[],
            prompt_ids=list(prompt_ids),
            response_ids=list(out.token_ids),
            loss_mask=[1] * n,
            response_logprobs=list(out.logprobs),
            response_text=prefix + out.text,
            turns=[TurnRecord(0, out.text, "", search, out.finish_reason, n)],
            searches=searches,
            finish_reason=out.finish_reason,
            ended_with_eos=out.finish_reason in ("stop", "eos"),
            answer="",
            timings={
                "generation_ms": (time.perf_counter() - t1) * 1000,
                "search_ms": search.latency_ms if search else 0.0,
            },
            policy_version=out.policy_version,
        )

    async def run_example(self, method: str, ex: Example, dataset: str) -> dict[str, Any]:
        """Evaluates one example with one method and returns its record (see ``records.jsonl`` fields): the
        episode's :meth:`~searchrl.agent.loop.Episode.to_record` summed up (token counts, searches with their
        document titles) and scored against the gold answers with the reward-library ``scheme``.

        Raises:
            InvalidRequest: unknown method, or ``rag`` without a search backend.
            Unavailable / grpc.RpcError: the policy backend failed.
        """
        seed = episode_seed(self.config.seed, dataset, ex.id)
        t0 = time.perf_counter()
        if method in ("direct", "rag"):
            ep = await self._run_baseline(method, ex, seed)
        elif method == "agent":
            # Gold answers stay out of the episode so no search backend (e.g. a simulator) can see them; we score here.
            ep = await self.agent.run(ex.question, (), question_id=ex.id, seed=seed)
        else:
            raise InvalidRequest(f"unknown method {method!r}; expected one of {METHOD_ORDER}")
        rec = ep.to_record()
        res = score(rec["response_text"], list(ex.golden_answers), self.config.scheme, rec["ended_with_eos"])
        return {
            "dataset": dataset,
            "method": method,
            "id": ex.id,
            "question": ex.question,
            "golden_answers": list(ex.golden_answers),
            "answer": res.answer or "",
            "reward": float(res.reward),
            "format_valid": bool(res.format_ok),
            "format_error": str(res.format_error or ""),
            **answer_scores(res.answer or "", ex.golden_answers),
            "response": rec["response_text"],
            "searches": [
                {k: v for k, v in s.items() if k != "documents"}
                | {"titles": [d["title"] for d in s["documents"]], "latency_ms": round(s["latency_ms"], 2)}
                for s in rec["searches"]
            ],
            "num_searches": len(rec["searches"]),
            "turns": len(rec["turns"]),
            "prompt_tokens": len(rec["prompt_ids"]),
            "response_tokens": len(rec["response_ids"]),
            "generated_tokens": sum(rec["loss_mask"]),
            "finish_reason": rec["finish_reason"],
            **{k: round(float(rec["timings"].get(k, 0.0)), 2) for k in ("generation_ms", "search_ms")},
            "policy_version": rec["policy_version"],
            "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
            "seed": seed,
            "search_backend": self.search_name if method != "direct" else "none",
            "finished_at": time.time(),
        }
