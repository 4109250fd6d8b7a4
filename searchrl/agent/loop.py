"""The ReSearch agent loop: one implementation of a multi-turn, search-augmented episode.

Used by the local GRPO trainer, the PolicyService ``Rollout`` RPC, the evaluator and the verl AgentLoop plug-in.
The protocol is ReSearch's (arXiv 2503.19470, section 2.2; Search-R1's variant with ``<information>`` tags):

1. the policy generates until it closes a search (``</search>``), closes an answer (``</answer>``) or emits EOS;
2. on a search, the query between the tags goes to a :class:`SearchBackend`; the documents are appended as
   ``" <result>\\n{documents}\\n</result>"`` tokens with loss mask 0 (tokenised separately, as verl's tool agent loop
   does with tool responses) and generation continues;
3. the episode ends on an answer, EOS, the turn limit, or the response token budget (generated + inserted tokens).

Bad actions never crash an episode: an empty or over-long query, a ``</search>`` without ``<search>``, a turn cut by
the per-turn token cap with no action, a search backend that is down or slow - each gets a short error observation
(counted in ``searchrl_policy_searches_total{backend,outcome}``) and the episode goes on.

Token layout of an episode (shapes are per episode, no padding)::

    prompt_ids        [P]   the rendered prompt (not trained)
    response_ids      [R]   response prefix, sampled tokens and observation tokens, in order; R <= max_response_tokens
    loss_mask         [R]   1 where the policy sampled the token, 0 where the environment inserted it
    response_logprobs [R]   behaviour-policy log-prob of each sampled token (natural log), 0.0 where loss_mask is 0
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from google.protobuf.json_format import MessageToDict, ParseDict
from prometheus_client import Counter

from searchrl.agent.prompts import TagProtocol, get_protocol, render_prompt
from searchrl.agent.settings import AgentSettings, SamplingParams
from searchrl.errors import InvalidRequest
from searchrl.reward.scoring import extract_answer
from searchrl.rollout.v1 import rollout_pb2

SEARCHES = Counter(
    "searchrl_policy_searches_total",
    "Searches made by the policy in agent-loop episodes, by backend and outcome (ok, empty, error, timeout, invalid_query, disabled).",
    ["backend", "outcome"],
)

# --------------------------------------------------------------------------------------------------- interfaces


@dataclass
class GenerationOutput:
    """One completion of one prompt.

    Attributes:
        token_ids: sampled token ids [T] (an EOS token is included when sampled).
        logprobs: natural-log probability of each sampled token under the raw logits (before temperature/top-p) [T].
        text: decoded ``token_ids`` (special tokens skipped).
        finish_reason: ``"stop"`` (a stop string matched; it is kept in the text), ``"eos"`` or ``"length"``.
        policy_version: version of the weights that sampled it (empty when the backend does not know).
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    policy_version: str = ""


class GenerationBackend(Protocol):
    """What the agent loop needs from a policy: a tokenizer and async token-level generation.

    Implemented by ``searchrl.services.policy.engines.transformers.TransformersEngine`` (CPU), ``SGLangEngine`` (GPU),
    ``RemotePolicyBackend`` (the PolicyService) and the verl server-manager adapter.
    """

    tokenizer: Any

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, *, stop: Sequence[str] = (), seed: int | None = None
    ) -> GenerationOutput:
        """One completion of ``prompt_ids`` with ``sampling``; generation ends after the first of ``stop`` (kept in
        the text), and ``seed`` makes it reproducible where the backend can."""
        ...


@dataclass
class SearchContext:
    """What a search backend may use besides the query.

    Attributes:
        question: the episode's question (ZeroSearch's simulator conditions on it during training).
        golden_answers: gold answers (simulator training prompts only; never shown to the policy).
        step / total_steps: training step and total steps (the ZeroSearch noise curriculum).
        seed: seed of the episode (reproducible simulated documents).
    """

    question: str
    golden_answers: list[str]
    step: int | None = None
    total_steps: int | None = None
    seed: int | None = None


@dataclass
class SearchOutcome:
    """Result of one search.

    Attributes:
        documents: documents, best first.
        backend: which backend answered (``"retriever"``, ``"simulator"``, ``"inprocess"``, ``"none"``).
        cache_hit: the Redis search cache answered.
        error: empty on success; otherwise a message (the episode gets an error observation).
    """

    documents: list[rollout_pb2.Document]
    backend: str
    cache_hit: bool = False
    error: str = ""


class SearchBackend(Protocol):
    """A search engine for the agent loop (implementations: :mod:`searchrl.agent.search`)."""

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome: ...


# --------------------------------------------------------------------------------------------------- records


AgentLoopConfig = AgentSettings
"""The agent loop's settings: :class:`searchrl.agent.settings.AgentSettings`."""


@dataclass
class SearchRecord:
    """One search the policy made (mirrors ``rollout.v1.SearchCall``).

    Attributes:
        error: why no documents came back (empty for a successful search, including one with no hits).
        outcome: the ``outcome`` label it was counted under in ``searchrl_policy_searches_total``: ``ok``,
            ``empty``, ``error``, ``timeout``, ``invalid_query`` or ``disabled``.
    """

    query: str
    documents: list[rollout_pb2.Document]
    backend: str
    latency_ms: float
    cache_hit: bool = False
    error: str = ""
    outcome: str = "ok"

    @property
    def sent(self) -> bool:
        """The query reached a search backend (not refused as invalid, and search was enabled)."""
        return self.outcome not in ("invalid_query", "disabled")

    @property
    def failed(self) -> bool:
        """The search service failed (an error or a timeout), as opposed to a query the policy got wrong: what the
        trainer counts against ``guards.search_failure`` / ``SEARCHRL_MAX_SEARCH_FAILURE_RATIO``."""
        return self.outcome in ("error", "timeout")


@dataclass
class TurnRecord:
    """One assistant turn (mirrors ``rollout.v1.Turn``).

    Attributes:
        index: zero-based turn index.
        generated_text: text the policy sampled in this turn (loss mask 1).
        observation_text: text the environment inserted after it (loss mask 0); empty when none.
        search: the search made in this turn, if any.
        finish_reason: ``"search"``, ``"answer"``, ``"eos"``, ``"length"``, ``"turn_limit"`` or ``"token_budget"``.
        generated_tokens: tokens sampled in this turn.
    """

    index: int
    generated_text: str
    observation_text: str
    search: SearchRecord | None
    finish_reason: str
    generated_tokens: int

    def to_proto(self) -> rollout_pb2.Turn:
        """As a ``Turn`` message (from the same dict as :meth:`Episode.to_record`)."""
        return ParseDict(asdict(self, dict_factory=_json_safe), rollout_pb2.Turn(), ignore_unknown_fields=True)


@dataclass
class Episode:
    """One finished trajectory (see the module docstring for the token layout).

    Attributes:
        finish_reason: ``"answer"``, ``"eos"``, ``"length"``, ``"turn_limit"`` or ``"token_budget"``.
        ended_with_eos: the policy ended the response itself (an answer or EOS), as ReSearch's format reward needs.
        answer: the final answer (``\\boxed{}`` content of the last ``<answer>`` for ReSearch; empty when none).
        timings: ``generation_ms``, ``search_ms``, ``total_ms`` (milliseconds).
        policy_version: version of the weights that sampled the last turn (empty when the backend does not say).
        mixed_policy_versions: an earlier turn was sampled by another version (the weights changed mid-episode).
    """

    question_id: str
    question: str
    golden_answers: list[str]
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    response_logprobs: list[float]
    response_text: str
    turns: list[TurnRecord]
    searches: list[SearchRecord]
    finish_reason: str
    ended_with_eos: bool
    answer: str
    timings: dict[str, float]
    policy_version: str = ""
    mixed_policy_versions: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def num_searches(self) -> int:
        """Searches made (including failed ones)."""
        return len(self.searches)

    def to_record(self) -> dict[str, Any]:
        """The episode as a JSON-safe dict: the one serialisation that the ``Trajectory`` message, ``trajectories.jsonl``
        rows, evaluation records and rollout-export rows derive from.

        Its keys are the attributes above; ``turns`` and ``searches`` hold dicts of :class:`TurnRecord` /
        :class:`SearchRecord` (a turn without a search has ``search: None``), documents are ``Document`` messages in
        proto3 JSON (proto field names, default values included). Apart from ``searches`` (the turns' searches again),
        it is the proto3 JSON form of :meth:`to_proto`'s message.
        """
        return asdict(self, dict_factory=_json_safe)

    @classmethod
    def from_proto(cls, message: rollout_pb2.Trajectory) -> Episode:
        """The inverse of :meth:`to_proto` (what a trainer reading the rollout stream rebuilds): every attribute comes
        back, ``searches`` from the turns' searches; the reward and score fields of the message are not part of an
        episode (read them from the message)."""
        turns, searches = [], []
        for t in message.turns:
            record = None
            if t.HasField("search"):
                c = t.search
                record = SearchRecord(
                    c.query, list(c.documents), c.backend, c.latency_ms, c.cache_hit, c.error, c.outcome or "ok"
                )
                searches.append(record)
            turns.append(
                TurnRecord(t.index, t.generated_text, t.observation_text, record, t.finish_reason, t.generated_tokens)
            )
        tm = message.timings
        return cls(
            question_id=message.question_id,
            question=message.question,
            golden_answers=list(message.golden_answers),
            prompt_ids=list(message.prompt_ids),
            response_ids=list(message.response_ids),
            loss_mask=list(message.loss_mask),
            response_logprobs=list(message.response_logprobs),
            response_text=message.response_text,
            turns=turns,
            searches=searches,
            finish_reason=message.finish_reason,
            ended_with_eos=message.ended_with_eos,
            answer=message.answer,
            timings={"generation_ms": tm.generation_ms, "search_ms": tm.search_ms, "total_ms": tm.total_ms},
            policy_version=message.policy_version,
            mixed_policy_versions=message.mixed_policy_versions,
            id=message.id,
        )

    def to_proto(self, reward: float = 0.0, group_index: int = 0) -> rollout_pb2.Trajectory:
        """As a ``Trajectory`` message (what the rollout stream stores): :meth:`to_record` parsed as proto3 JSON.

        Args:
            reward: scalar reward of the episode.
            group_index: index of the GRPO group within a batch.
        """
        record = {**self.to_record(), "reward": reward, "group_index": group_index}
        return ParseDict(record, rollout_pb2.Trajectory(), ignore_unknown_fields=True)


def _json_safe(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``dataclasses.asdict`` factory of the records: ``Document`` messages as proto3 JSON dicts."""
    return {
        k: [MessageToDict(d, preserving_proto_field_name=True, always_print_fields_with_no_presence=True) for d in v]
        if k == "documents"
        else v
        for k, v in pairs
    }


# --------------------------------------------------------------------------------------------------- helpers


def truncate_observation(text: str, max_chars: int, side: str = "right") -> str:
    """Cuts a search result to ``max_chars`` characters the way verl's ``ToolAgentLoop`` cuts tool responses.

    Args:
        text: the formatted documents.
        max_chars: the limit in characters (0: no limit).
        side: ``"right"`` keeps the start, ``"left"`` keeps the end, ``"middle"`` keeps both ends.

    Returns:
        ``text`` unchanged when it fits, else the kept part with a ``(truncated)`` marker where text was cut.
    """
    if not max_chars or len(text) <= max_chars:
        return text
    if side == "left":
        return "(truncated)..." + text[-max_chars:]
    if side == "right":
        return text[:max_chars] + "...(truncated)"
    half = max_chars // 2
    return text[:half] + "...(truncated)..." + text[-half:]


def format_documents(documents: Sequence[rollout_pb2.Document], max_doc_chars: int = 0) -> str:
    """Documents as the policy sees them: one ``"Doc i (Title: t) text"`` line per document, ``i`` from 1.

    Args:
        documents: the documents, best first.
        max_doc_chars: cut each text to this many characters (0: no limit).
    """
    return "\n".join(
        f"Doc {i} (Title: {doc.title}) {cut_document_text(doc.text, max_doc_chars)}"
        for i, doc in enumerate(documents, start=1)
    )


def cut_document_text(text: str, max_doc_chars: int = 0) -> str:
    """A document's text as the policy reads it: whitespace collapsed, cut at the last word boundary within
    ``max_doc_chars`` characters followed by ``" ..."`` (0: no limit)."""
    text = " ".join(text.split())
    if max_doc_chars and len(text) > max_doc_chars:
        text = text[:max_doc_chars].rsplit(" ", 1)[0] + " ..."
    return text


def _search_backend_name(search: object | None) -> str:
    return str(getattr(search, "name", None) or ("none" if search is None else type(search).__name__.lower()))


@dataclass
class _Action:
    kind: str  # "search", "answer", "eos", "invalid", "budget"
    query: str = ""
    error: str = ""


def _bare(tag: str) -> str:
    """A tag's name without angle brackets or slash: error observations must not contain literal tags, which the
    reward's format rules would count (e.g. a second ``<answer>``)."""
    return tag.strip("</>")


def parse_action(turn_text: str, finish_reason: str, protocol: TagProtocol) -> _Action:
    """Decides what a finished generation call asked for.

    Args:
        turn_text: the text written since the last observation (including a response prefix on the first turn).
        finish_reason: the generation's ``finish_reason``.
        protocol: the tag protocol.

    Returns:
        ``search`` (with the stripped query), ``answer``, ``eos`` (ended without an answer) or ``invalid`` (with a
        message for the error observation).
    """
    s_close = turn_text.rfind(protocol.search_close)
    a_close = turn_text.rfind(protocol.answer_close)
    if a_close >= 0 and a_close > s_close:
        return _Action("answer")
    if s_close >= 0:
        s_open = turn_text.rfind(protocol.search_open, 0, s_close)
        if s_open < 0:
            return _Action("invalid", error=f"a closing {_bare(protocol.search_close)} tag without an opening one")
        return _Action("search", query=turn_text[s_open + len(protocol.search_open) : s_close].strip())
    if finish_reason == "eos":
        return _Action("eos")
    if protocol.search_open in turn_text:
        return _Action("invalid", error=f"unclosed {_bare(protocol.search_open)} tag: close the query")
    if protocol.answer_open in turn_text:
        return _Action("invalid", error=f"unclosed {_bare(protocol.answer_open)} tag: close the answer")
    return _Action(
        "invalid",
        error=f"no action: write a query between {_bare(protocol.search_open)} tags or the final answer between {_bare(protocol.answer_open)} tags",
    )


TurnCallback = Callable[[TurnRecord], Awaitable[None]]


# --------------------------------------------------------------------------------------------------- the loop


class AgentLoop:
    """Runs ReSearch episodes with a policy and a search backend.

    Args:
        generator: the policy (a :class:`GenerationBackend`).
        search: the search backend, or ``None`` (searches then get an error observation).
        config: loop settings (default: :class:`AgentSettings` defaults).
    """

    def __init__(
        self, generator: GenerationBackend, search: SearchBackend | None, config: AgentLoopConfig | None = None
    ) -> None:
        self.generator = generator
        self.search = search
        self.config = config or AgentLoopConfig()
        self.protocol = get_protocol(self.config.protocol)
        self.tokenizer = generator.tokenizer
        self._backend_name = _search_backend_name(search)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return [int(x) for x in self.tokenizer.encode(text, add_special_tokens=False)]

    def prompt_ids(self, question: str) -> list[int]:
        """Token ids of the rendered prompt of ``question``."""
        ids: list[int] = render_prompt(self.tokenizer, question, self.config.template, self.config.protocol).ids
        return ids

    async def run(
        self,
        question: str,
        golden_answers: Sequence[str] = (),
        *,
        question_id: str = "",
        seed: int | None = None,
        step: int | None = None,
        total_steps: int | None = None,
        on_turn: TurnCallback | None = None,
        prompt_ids: Sequence[int] | None = None,
    ) -> Episode:
        """Runs one episode.

        Args:
            question: the question.
            golden_answers: gold answers (passed to the search backend's context; not used for scoring here).
            question_id: copied into the episode.
            seed: seeds turn ``t``'s sampling with ``seed + 1_000_003 * t`` (``None``: unseeded).
            step / total_steps: training step, for the simulator's curriculum.
            on_turn: awaited with each :class:`TurnRecord` as it finishes (the PolicyService streams them).
            prompt_ids: an already rendered prompt (e.g. verl's chat-formatted dataset prompt) instead of the
                configured template.

        Returns:
            The finished :class:`Episode`.

        Raises:
            InvalidRequest: an empty question, or a prompt longer than ``max_prompt_tokens`` or the model's context.
            Unavailable: the generation backend failed (search failures never raise).
        """
        cfg, proto = self.config, self.protocol
        if not question.strip():
            raise InvalidRequest("question is empty")
        t_start = time.perf_counter()
        prompt = [int(x) for x in prompt_ids] if prompt_ids is not None else self.prompt_ids(question)
        if not prompt:
            raise InvalidRequest("prompt is empty")
        if cfg.max_prompt_tokens and len(prompt) > cfg.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt has {len(prompt)} tokens, more than max_prompt_tokens={cfg.max_prompt_tokens}"
            )
        context = SearchContext(
            question=question, golden_answers=list(golden_answers), step=step, total_steps=total_steps, seed=seed
        )
        response_ids: list[int] = []
        loss_mask: list[int] = []
        logprobs: list[float] = []
        turns: list[TurnRecord] = []
        searches: list[SearchRecord] = []
        gen_ms = search_ms = 0.0
        version = ""
        mixed = False  # turns sampled by two policy versions (the weights were swapped mid-episode)
        pending_text = ""
        if cfg.response_prefix:
            prefix = cfg.response_prefix.replace("{question}", question.strip())
            prefix_ids = self.encode(prefix)[: cfg.max_response_tokens]
            response_ids += prefix_ids
            loss_mask += [0] * len(prefix_ids)
            logprobs += [0.0] * len(prefix_ids)
            pending_text = prefix
        finish = ""
        stops = (proto.search_close, proto.answer_close)
        for turn_index in range(cfg.max_turns):
            budget = cfg.max_response_tokens - len(response_ids)
            if budget <= 0:
                finish = "token_budget"
                break
            t0 = time.perf_counter()
            if turn_index == 0 and proto.search_close in pending_text:
                # The response prefix already holds a search (a forced first search): run it before generating.
                out = GenerationOutput(token_ids=[], logprobs=[], text="", finish_reason="stop")
            else:
                sampling = SamplingParams(
                    max_new_tokens=min(cfg.max_new_tokens_per_turn, budget),
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                )
                out = await self.generator.generate(
                    prompt + response_ids,
                    sampling,
                    stop=stops,
                    seed=None if seed is None else seed + 1_000_003 * turn_index,
                )
            gen_ms += (time.perf_counter() - t0) * 1000
            if out.policy_version:
                mixed = mixed or bool(version and out.policy_version != version)
                version = out.policy_version
            response_ids += out.token_ids
            loss_mask += [1] * len(out.token_ids)
            logprobs += out.logprobs
            turn_text = pending_text + out.text
            pending_text = ""
            action = parse_action(turn_text, out.finish_reason, proto)
            turn = TurnRecord(turn_index, out.text, "", None, "", len(out.token_ids))
            observation = ""
            if action.kind == "answer":
                turn.finish_reason = finish = "answer"
            elif action.kind == "eos":
                turn.finish_reason = finish = "eos"
            elif out.finish_reason == "length" and len(response_ids) >= cfg.max_response_tokens:
                turn.finish_reason = finish = "token_budget"
            elif turn_index == cfg.max_turns - 1:
                # No turn is left to read an observation: stop without searching.
                turn.finish_reason = finish = "turn_limit"
            elif action.kind == "search":
                turn.finish_reason = "search"
                t1 = time.perf_counter()
                record, body = await run_search(self.search, action.query, context, cfg, self._backend_name)
                search_ms += (time.perf_counter() - t1) * 1000
                turn.search = record
                searches.append(record)
                observation = proto.observation(body)
            else:  # invalid action: a short error observation, then the policy tries again
                turn.finish_reason = "length" if out.finish_reason == "length" else "search"
                observation = proto.observation(f"Invalid action: {action.error}.")
            if observation:
                obs_ids = self.encode(observation)
                if len(response_ids) + len(obs_ids) > cfg.max_response_tokens:
                    finish = "token_budget"  # the documents do not fit: end here rather than cut them
                    turn.finish_reason = turn.finish_reason or "token_budget"
                else:
                    if cfg.answer_prefix and turn_index + 1 == cfg.max_turns - 1:
                        # the next turn is the last: scaffold the answer (the environment writes it, loss mask 0)
                        scaffold = self.encode(cfg.answer_prefix)
                        if len(response_ids) + len(obs_ids) + len(scaffold) < cfg.max_response_tokens:
                            obs_ids += scaffold
                            pending_text = cfg.answer_prefix
                    response_ids += obs_ids
                    loss_mask += [0] * len(obs_ids)
                    logprobs += [0.0] * len(obs_ids)
                    turn.observation_text = observation
            turns.append(turn)
            if on_turn is not None:
                await on_turn(turn)
            if finish:
                break
        if not finish:
            finish = "turn_limit"
        response_text = self.tokenizer.decode(response_ids, skip_special_tokens=True)
        total_ms = (time.perf_counter() - t_start) * 1000
        return Episode(
            question_id=question_id,
            question=question,
            golden_answers=list(golden_answers),
            prompt_ids=prompt,
            response_ids=response_ids,
            loss_mask=loss_mask,
            response_logprobs=logprobs,
            response_text=response_text,
            turns=turns,
            searches=searches,
            finish_reason=finish,
            ended_with_eos=finish in ("answer", "eos"),
            answer=extract_answer(response_text),
            timings={"generation_ms": gen_ms, "search_ms": search_ms, "total_ms": total_ms},
            policy_version=version,
            mixed_policy_versions=mixed,
        )


async def run_search(
    search: SearchBackend | None, query: str, context: SearchContext, cfg: AgentSettings, backend: str
) -> tuple[SearchRecord, str]:
    """Runs one search of an episode and counts it in ``searchrl_policy_searches_total{backend,outcome}``.

    Args:
        search: the backend (``None``: search is disabled).
        query: the stripped query.
        context: the episode's question, gold answers, step and seed.
        cfg: ``top_k``, ``max_query_chars``, ``search_timeout_s`` and the observation limits.
        backend: label of ``search`` in records and metrics.

    Returns:
        The :class:`SearchRecord` and the observation body: the formatted documents or a short error message.
        Never raises for a bad query or a failed backend.
    """
    if not query:
        SEARCHES.labels(backend, "invalid_query").inc()
        record = SearchRecord(query, [], backend, 0.0, error="empty query", outcome="invalid_query")
        return record, "Search error: the query is empty."
    if len(query) > cfg.max_query_chars:
        SEARCHES.labels(backend, "invalid_query").inc()
        msg = f"query too long ({len(query)} characters; longer than {cfg.max_query_chars} is refused)"
        record = SearchRecord(query[: cfg.max_query_chars], [], backend, 0.0, error=msg, outcome="invalid_query")
        return record, f"Search error: {msg}."
    if search is None:
        SEARCHES.labels(backend, "disabled").inc()
        return SearchRecord(
            query, [], backend, 0.0, error="search is disabled", outcome="disabled"
        ), "Search error: search is not available."
    t0 = time.perf_counter()
    try:
        outcome = await asyncio.wait_for(search.search(query, top_k=cfg.top_k, context=context), cfg.search_timeout_s)
    except asyncio.TimeoutError:
        latency = (time.perf_counter() - t0) * 1000
        SEARCHES.labels(backend, "timeout").inc()
        msg = f"search timed out after {cfg.search_timeout_s:g} s"
        return SearchRecord(
            query, [], backend, latency, error=msg, outcome="timeout"
        ), "Search error: the search engine did not answer in time."
    except Exception as exc:  # a dead backend must not end the episode
        latency = (time.perf_counter() - t0) * 1000
        SEARCHES.labels(backend, "error").inc()
        msg = f"{type(exc).__name__}: {exc}"[:500]
        return SearchRecord(
            query, [], backend, latency, error=msg, outcome="error"
        ), "Search error: the search engine is unavailable."
    latency = (time.perf_counter() - t0) * 1000
    record = SearchRecord(
        query,
        list(outcome.documents),
        outcome.backend or backend,
        latency,
        outcome.cache_hit,
        outcome.error,
        outcome="error" if outcome.error else ("ok" if outcome.documents else "empty"),
    )
    SEARCHES.labels(record.backend, record.outcome).inc()
    if record.outcome == "error":
        return record, "Search error: the search engine is unavailable."
    if record.outcome == "empty":
        return record, "No documents found."
    return record, truncate_observation(
        format_documents(outcome.documents, cfg.max_doc_chars), cfg.max_observation_chars, cfg.truncate_side
    )


@dataclass
class EpisodeRequest:
    """One episode to run with :func:`run_episodes`."""

    question: str
    golden_answers: list[str] = field(default_factory=list)
    question_id: str = ""
    seed: int | None = None


async def run_episodes(
    loop: AgentLoop,
    requests: Sequence[EpisodeRequest],
    *,
    max_concurrency: int = 64,
    step: int | None = None,
    total_steps: int | None = None,
) -> list[Episode]:
    """Runs episodes concurrently (at most ``max_concurrency`` at once), so generation never idles on one search.

    Returns:
        The episodes in the order of ``requests``.

    Raises:
        InvalidRequest: ``max_concurrency < 1`` or an invalid request (the first error is raised).
    """
    if max_concurrency < 1:
        raise InvalidRequest(f"max_concurrency must be >= 1, got {max_concurrency}")
    gate = asyncio.Semaphore(max_concurrency)

    async def one(r: EpisodeRequest) -> Episode:
        async with gate:
            return await loop.run(
                r.question, r.golden_answers, question_id=r.question_id, seed=r.seed, step=step, total_steps=total_steps
            )

    return list(await asyncio.gather(*(one(r) for r in requests)))
