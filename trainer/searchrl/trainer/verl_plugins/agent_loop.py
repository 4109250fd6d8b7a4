"""``searchrl_research``: a verl AgentLoop that runs our ReSearch agent loop inside verl's rollout.

verl (``verl/experimental/agent_loop``) instantiates an ``AgentLoopBase`` subclass per sample with the rollout
server manager (``generate(request_id, prompt_ids=..., sampling_params=...) -> TokenOutput``), the tokenizer and the
loaded tools, and calls ``run(sampling_params, **dataset_fields)``. This class adapts the server manager to our
:class:`~searchrl.agent.loop.GenerationBackend`, runs :class:`~searchrl.agent.loop.AgentLoop` with
the ReSearch tags (``<search>`` / ``<result>``), and returns ``AgentLoopOutput`` with ``response_mask`` = our loss
mask (0 on inserted documents).

Registration: ``@register("searchrl_research")`` when this module is imported, and the agent-loop config file
``trainer/searchrl/trainer/config/agent_loops.yaml`` (``rollout.agent.agent_loop_config_path``) names this class with its settings,
so verl's workers import it. The search backend is the ``SearchRLSearchTool`` of the tool config when present
(``rollout.multi_turn.tool_config_path``), else the ``search`` mapping given here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from uuid import uuid4

from verl.experimental.agent_loop.agent_loop import AgentLoopBase, AgentLoopMetrics, AgentLoopOutput, register

from searchrl.agent.loop import (
    AgentLoop,
    Episode,
    GenerationOutput,
    SearchContext,
    SearchOutcome,
)
from searchrl.agent.prompts import render_prompt
from searchrl.agent.search import SearchSpec, build_search_backend
from searchrl.agent.settings import AgentSettings, SamplingParams
from searchrl.reward.verl_reward import row_golden_answers
from searchrl.trainer.data import row_question
from searchrl.trainer.guards import SearchFailureWindow
from searchrl.trainer.verl_plugins.metrics import report_episode

# One per agent-loop worker process: verl runs every episode of the worker through the same class.
_FAILURES: SearchFailureWindow | None = None


def _failure_window() -> SearchFailureWindow:
    global _FAILURES
    if _FAILURES is None:
        _FAILURES = SearchFailureWindow.from_env()
    return _FAILURES


def _search_tally(episode: Episode) -> tuple[dict[str, int], int, int]:
    """``({"<backend>/<outcome>": n}, searches sent to a backend, failed searches)`` of one episode."""
    outcomes: dict[str, int] = {}
    for s in episode.searches:
        key = f"{s.backend}/{s.outcome}"
        outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes, sum(s.sent for s in episode.searches), sum(s.failed for s in episode.searches)


class VerlServerBackend:
    """A :class:`~searchrl.agent.loop.GenerationBackend` over verl's rollout server manager.

    Args:
        server_manager: verl's ``LLMServerClient`` (or anything with the same async ``generate``).
        tokenizer: the policy tokenizer.
        base_params: verl's sampling parameters for this sample (``temperature``, ``top_p``, ``top_k``,
            ``repetition_penalty``, ``logprobs``); each call's sampling parameters (a ``top_k`` of -1 keeps verl's),
            stop strings and seed are added.
        engine: ``"sglang"`` or ``"vllm"`` (how to ask for the stop string to be kept and for a seed).
        request_id: sticky-session id (one per trajectory, so turns reuse the server's prefix cache).
    """

    def __init__(
        self,
        server_manager: Any,
        tokenizer: Any,
        base_params: dict[str, Any],
        engine: str = "sglang",
        request_id: str = "",
    ) -> None:
        self.server_manager = server_manager
        self.tokenizer = tokenizer
        self.base_params = dict(base_params)
        self.engine = engine
        self.request_id = request_id or uuid4().hex
        self.want_logprobs = bool(self.base_params.get("logprobs", False))
        self.global_step: int | None = None
        eos = tokenizer.eos_token_id
        self.eos_ids = {int(eos)} if eos is not None else set()

    def _params(self, sampling: SamplingParams, stop: Sequence[str], seed: int | None) -> dict[str, Any]:
        params = dict(self.base_params)
        params.update(temperature=sampling.temperature, top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens)
        if sampling.top_k != -1:  # -1 (no limit of ours) keeps verl's top_k
            params["top_k"] = sampling.top_k
        if stop:
            params["stop"] = list(stop)
            if self.engine == "vllm":
                params["include_stop_str_in_output"] = True
            else:
                params["no_stop_trim"] = True
        if seed is not None:
            params["seed" if self.engine == "vllm" else "sampling_seed"] = int(seed)
        return params

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, *, stop: Sequence[str] = (), seed: int | None = None
    ) -> GenerationOutput:
        """One generation call through ``server_manager.generate``; the finish reason is derived from the tokens."""
        out = await self.server_manager.generate(
            request_id=self.request_id,
            prompt_ids=list(prompt_ids),
            sampling_params=self._params(sampling, stop, seed),
        )
        token_ids = [int(t) for t in out.token_ids]
        logprobs = [float(x) for x in out.log_probs] if out.log_probs else [0.0] * len(token_ids)
        step = (out.extra_fields or {}).get("global_steps")
        if isinstance(step, int) and step >= 0:
            self.global_step = step
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if token_ids and token_ids[-1] in self.eos_ids:
            reason = "eos"
        elif any(s in text for s in stop):
            reason = "stop"
        else:
            reason = "length"
        return GenerationOutput(token_ids=token_ids, logprobs=logprobs, text=text, finish_reason=reason)


class _StepFromServer:
    """Fills the curriculum step from the rollout server's ``global_steps`` when the dataset row has none."""

    def __init__(self, inner: Any, backend: VerlServerBackend) -> None:
        self.inner = inner
        self.backend = backend
        self.name = getattr(inner, "name", None) or getattr(inner, "backend_kind", "search")

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        if context.step is None and self.backend.global_step is not None:
            context.step = self.backend.global_step
        outcome: SearchOutcome = await self.inner.search(query, top_k=top_k, context=context)
        return outcome


@register("searchrl_research")
class SearchRLResearchAgentLoop(AgentLoopBase):
    """ReSearch multi-turn rollouts with search, as a verl agent loop.

    Keyword settings (from ``trainer/searchrl/trainer/config/agent_loops.yaml``): any field of
    :class:`~searchrl.agent.settings.AgentSettings` (``template``, ``protocol``, ``top_k``, ``max_turns`` (0 or unset:
    ``rollout.multi_turn.max_assistant_turns``), ``max_new_tokens_per_turn``, ``response_prefix``,
    ``search_timeout_s``, ``max_doc_chars`` ...; ``max_response_tokens`` is ``rollout.response_length``),
    ``use_dataset_prompt`` (render the dataset's chat messages instead of our template), ``search`` (the fields of a
    :class:`~searchrl.agent.search.SearchSpec` used when no search tool is loaded; none: no search).

    Raises:
        InvalidRequest: a setting out of range or an invalid ``search`` mapping.
    """

    def __init__(
        self,
        *args: Any,
        tools: Any = None,
        use_dataset_prompt: bool = True,
        search: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in AgentSettings.model_fields}
        super().__init__(*args, **kwargs)
        tool_list = list(getattr(tools, "tools", None) or [])
        self.search_tool = next((t for t in tool_list if hasattr(t, "search") and hasattr(t, "execute")), None)
        self._search_spec = SearchSpec(**search) if search else SearchSpec(kind="none")
        self._fallback_search: Any = None
        multi_turn = self.rollout_config.get("multi_turn", {}) or {}
        self.response_length = int(self.rollout_config.response_length)
        self.use_dataset_prompt = use_dataset_prompt
        self.engine = str(self.rollout_config.get("name", "sglang"))
        self.settings = AgentSettings(
            **{
                **ours,
                "max_turns": int(ours.get("max_turns") or multi_turn.get("max_assistant_turns") or 4),
                "max_response_tokens": self.response_length,
                # verl's tool-response limit (characters) and cut side apply to our <result> blocks too
                "max_observation_chars": int(multi_turn.get("max_tool_response_length") or 0),
                "truncate_side": str(multi_turn.get("tool_response_truncate_side") or "right"),
            }
        )

    def _search_backend(self) -> Any:
        if self.search_tool is not None:
            return self.search_tool
        if self._fallback_search is None:
            self._fallback_search = build_search_backend(self._search_spec)
        return self._fallback_search

    def _prompt_ids(self, kwargs: dict[str, Any]) -> list[int]:
        """The prompt's token ids, cut to ``rollout.prompt_length`` like verl's own loops (left-truncation).

        The dataset's chat messages when ``use_dataset_prompt`` and the row has them, else our template for the
        question; both go through verl's ``_cap_text_prompt_length``.
        """
        raw = kwargs.get("raw_prompt")
        tokenizer: Any = self.tokenizer
        if self.use_dataset_prompt and raw is not None and len(raw) > 0:
            ids = tokenizer.apply_chat_template(
                list(raw), add_generation_prompt=True, tokenize=True, **(self.apply_chat_template_kwargs or {})
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = render_prompt(
                tokenizer, row_question(kwargs, "raw_prompt"), self.settings.template, self.settings.protocol
            ).ids
        capped: list[int] = self._cap_text_prompt_length([int(x) for x in ids])
        return capped

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> AgentLoopOutput:
        """Runs one episode for one dataset row.

        Args:
            sampling_params: verl's per-sample sampling parameters (temperature 0 for greedy validation).
            **kwargs: the dataset fields (``raw_prompt``, ``extra_info`` with ``question``/``golden_answers``/
                optional ``step``/``total_steps``/``seed``, ``reward_model``).

        Returns:
            ``AgentLoopOutput`` with ``response_mask`` = the loss mask, ``response_logprobs`` when verl asked for
            log-probs, ``num_turns``, timing metrics, and extra fields ``ended_with_eos`` (read by
            ``compute_score``), ``searchrl_finish_reason``, ``searchrl_num_searches``, ``searchrl_search_failures``
            and ``searchrl_answer``.

        Raises:
            SearchFailuresExceeded: more than ``SEARCHRL_MAX_SEARCH_FAILURE_RATIO`` of this worker's recent searches
                failed (the step fails rather than train on error observations).
        """
        extra = kwargs.get("extra_info") or {}
        backend = VerlServerBackend(self.server_manager, self.tokenizer, sampling_params, engine=self.engine)
        cfg = AgentSettings(
            **{
                **self.settings.model_dump(),
                "temperature": float(sampling_params.get("temperature", 1.0)),
                "top_p": float(sampling_params.get("top_p", 1.0)),
            }
        )
        search = _StepFromServer(self._search_backend(), backend)
        loop = AgentLoop(backend, search, cfg)
        total_steps = extra.get("total_steps")
        if total_steps is None:
            total_steps = (self.config.get("trainer", {}) or {}).get("total_training_steps")
        t0 = time.perf_counter()
        episode = await loop.run(
            row_question(kwargs, "raw_prompt"),
            row_golden_answers(kwargs),
            question_id=str(extra.get("id", "")),
            seed=int(extra["seed"]) if extra.get("seed") is not None else None,
            step=int(extra["step"]) if extra.get("step") is not None else None,
            total_steps=int(total_steps) if total_steps else None,
            prompt_ids=self._prompt_ids(kwargs),
        )
        outcomes, sent, failed = _search_tally(episode)
        report_episode(outcomes, sent, failed)
        # raises SearchFailuresExceeded (fails the step and the run) past SEARCHRL_MAX_SEARCH_FAILURE_RATIO
        _failure_window().record([s.failed for s in episode.searches if s.sent])
        n = self.response_length
        return AgentLoopOutput(
            prompt_ids=episode.prompt_ids,
            response_ids=episode.response_ids[:n],
            response_mask=episode.loss_mask[:n],
            response_logprobs=episode.response_logprobs[:n] if backend.want_logprobs else None,
            num_turns=2 * len(episode.turns) + 1,
            metrics=AgentLoopMetrics(
                generate_sequences=episode.timings["generation_ms"] / 1000,
                tool_calls=episode.timings["search_ms"] / 1000,
            ),
            extra_fields={
                # verl merges extra_fields into the reward function's extra_info: the ReSearch EOS rule of
                # compute_score needs it (an episode cut by the token budget gets no format reward)
                "ended_with_eos": episode.ended_with_eos,
                "searchrl_finish_reason": episode.finish_reason,
                "searchrl_num_searches": episode.num_searches,
                "searchrl_search_failures": failed,
                "searchrl_answer": episode.answer,
                "searchrl_total_s": time.perf_counter() - t0,
            },
        )
