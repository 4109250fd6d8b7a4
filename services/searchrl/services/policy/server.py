"""PolicyService: ``searchrl.policy.v1.PolicyService`` on the shared gRPC runtime (``searchrl serve policy``).

* ``Generate`` - n completions of a prompt (text or token ids) with token ids and per-token log-probs.
* ``Rollout`` - one ReSearch episode through :class:`searchrl.agent.loop.AgentLoop`, streaming each turn as it
  finishes and then the trajectory (with the reward from :mod:`searchrl.reward.scoring` when gold answers are
  given). With ``--redis-url`` every finished trajectory is also appended to the rollout stream.
* ``GetModelInfo``, ``LoadWeights`` (hot-swap: in-flight requests finish on the old weights).

Engines: ``transformers`` (CPU, the embedded SmolLM2-135M-Instruct by default) or ``sglang`` (GPU; an in-process
``sglang.Engine``, or a remote SGLang server with ``--sglang-url``).

Metrics (besides the runtime's per-RPC ones): ``searchrl_policy_generated_tokens_total``,
``searchrl_policy_episodes_total{finish_reason}``, ``searchrl_policy_searches_total{backend,outcome}``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from searchrl.agent.loop import AgentLoop, AgentLoopConfig, Episode, GenerationOutput, SearchBackend, TurnRecord
from searchrl.agent.search import SearchSpec, build_search_backend
from searchrl.agent.settings import AgentSettings, SamplingParams
from searchrl.client.base import BaseClient, ChannelOptions
from searchrl.client.retrieval import RetrievalClient
from searchrl.client.simulation import SimulatorClient
from searchrl.errors import InvalidRequest, PermissionDenied
from searchrl.policy.v1 import policy_pb2, policy_pb2_grpc
from searchrl.serving.config import ServerConfig, field
from searchrl.serving.runtime import ServiceSpec, run_service

if TYPE_CHECKING:
    from searchrl.services.policy.engines.base import PolicyEngine
    from searchrl.services.rollouts.store import RolloutStore

log = logging.getLogger("searchrl.policy")

SERVICE_NAME = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name

GENERATED_TOKENS = Counter(
    "searchrl_policy_generated_tokens_total", "Tokens sampled by the policy (Generate and Rollout)."
)
EPISODES = Counter("searchrl_policy_episodes_total", "Rollout episodes finished, by finish reason.", ["finish_reason"])
SEARCH_BACKENDS = ("retriever", "simulator", "mixed", "none")
AGENT = AgentSettings()  # the agent loop's defaults: the server's agent-loop fields default to them


class PolicyConfig(ServerConfig):
    """Settings of ``searchrl serve policy`` (flags ``--max-turns`` ..., env ``SEARCHRL_POLICY_MAX_TURNS`` ...)."""

    model: str = field(
        "smollm2-135m-instruct", help="Model name or checkpoint directory ('smollm2-135m-instruct': the embedded one)."
    )
    engine: str = field("transformers", help="Inference engine: transformers (CPU) or sglang (GPU).")
    sglang_url: str = field(
        "", help="Base URL of a running SGLang server (engine sglang); empty starts an in-process sglang.Engine."
    )
    sglang_deterministic: bool = field(
        False,
        help="Engine sglang (in-process): start SGLang with enable_deterministic_inference so that seeded requests "
        "reproduce their tokens (SGLang ignores seeds otherwise). Slower: pytorch sampling backend, batch-invariant "
        "kernels. With --sglang-url: states that the server runs with --enable-deterministic-inference.",
    )
    dtype: str = field("float32", help="Weights dtype of the transformers engine: float32, bfloat16 or float16.")
    max_batch_size: int = field(16, help="Rows decoded together by the transformers engine.")
    batch_wait_ms: float = field(5.0, help="How long an idle engine waits for more requests to join a prefill, in ms.")
    torch_threads: int = field(
        0,
        help="Intra-op threads of the transformers engine (0: torch's default; 1 avoids OpenMP thrashing on a few shared cores).",
    )
    max_new_tokens: int = field(1024, help="Limit of max_new_tokens per Generate call and per Rollout turn.")
    max_n: int = field(64, help="Most completions one Generate call may ask for.")
    max_prompt_tokens: int = field(0, help="Longest prompt accepted, in tokens; 0: the model's context window.")
    retriever_target: str = field("", help="host:port of the RetrievalService (search backend 'retriever'/'mixed').")
    simulator_target: str = field(
        "", help="host:port of the SimulatedSearchService (search backend 'simulator'/'mixed')."
    )
    search_backend: str = field(
        "auto",
        help="Default search backend: retriever, simulator, mixed, none, or auto (retriever if set, else simulator, else none).",
    )
    mix_ratio: float = field(0.5, help="Share of searches sent to the retriever with search backend 'mixed'.")
    simulator_training: bool = field(
        True, help="Send the question and gold answers to the simulator (ZeroSearch training conditioning)."
    )
    search_timeout_s: float = field(AGENT.search_timeout_s, help="Deadline of one search, in seconds.")
    template: str = field(AGENT.template, help="Default prompt template: research_instruct or research_base.")
    protocol: str = field(AGENT.protocol, help="Tag protocol: research (<result>) or search_r1 (<information>).")
    response_prefix: str = field(AGENT.response_prefix, help="Text starting the response (loss mask 0); empty: none.")
    max_turns: int = field(AGENT.max_turns, help="Default assistant turns per episode.")
    max_response_tokens: int = field(
        AGENT.max_response_tokens, help="Default response token budget (generated + inserted)."
    )
    max_new_tokens_per_turn: int = field(AGENT.max_new_tokens_per_turn, help="Default cap of one turn's generation.")
    top_k: int = field(AGENT.top_k, help="Default documents per search.")
    max_doc_chars: int = field(AGENT.max_doc_chars, help="Cut every document to this many characters; 0: no limit.")
    reward_scheme: str = field("research", help="Reward scheme of Rollout trajectories (see searchrl.reward.scoring).")
    weights_roots: str = field(
        ".",
        help="Comma-separated directories LoadWeights may load checkpoints from (resolved at start; '.': the working "
        "directory). A requested path is resolved, symlinks and '..' included, and must lie inside one; empty: "
        "LoadWeights is refused.",
    )


def build_engine(config: PolicyConfig) -> PolicyEngine:
    """The engine named by ``config.engine``. Call it for ``sglang`` on the serving event loop (see
    :class:`~searchrl.services.policy.engines.sglang.SGLangEngine`), for ``transformers`` anywhere.

    Raises:
        InvalidRequest: unknown engine.
        RuntimeError: in-process ``sglang`` without a running event loop in this thread.
    """
    from searchrl.assets import policy_model_path

    if config.engine == "transformers":
        from searchrl.services.policy.engines.transformers import TransformersEngine

        return TransformersEngine(
            policy_model_path(config.model),
            dtype=config.dtype,
            max_batch_size=config.max_batch_size,
            batch_wait_ms=config.batch_wait_ms,
            torch_threads=config.torch_threads,
        )
    if config.engine == "sglang":
        from searchrl.services.policy.engines.sglang import SGLangEngine

        return SGLangEngine(
            policy_model_path(config.model), url=config.sglang_url, deterministic=config.sglang_deterministic
        )
    raise InvalidRequest(f"unknown engine {config.engine!r}; expected transformers or sglang")


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    """Implements ``PolicyService`` over one engine and a set of search backends.

    Args:
        engine: the engine (either engine of :mod:`searchrl.services.policy.engines`).
        config: the service settings.
        searches: search backends by name (``retriever``, ``simulator``, ``mixed``, ``none``).
        store: where finished trajectories are appended, or ``None``.
    """

    def __init__(
        self,
        engine: PolicyEngine,
        config: PolicyConfig,
        searches: Mapping[str, SearchBackend],
        store: RolloutStore | None = None,
    ) -> None:
        self.engine = engine
        self.config = config
        self.searches = searches
        self.store = store
        self.default_search = self._default_search_name()
        self.weights_roots = [Path(r.strip()).resolve() for r in config.weights_roots.split(",") if r.strip()]

    def _default_search_name(self) -> str:
        name = self.config.search_backend
        if name == "auto":
            return next((n for n in ("retriever", "simulator") if n in self.searches), "none")
        if name not in SEARCH_BACKENDS:
            raise InvalidRequest(f"unknown search backend {name!r}; expected one of {SEARCH_BACKENDS} or auto")
        if name not in self.searches:
            raise InvalidRequest(
                f"search backend {name!r} needs --{'retriever' if name == 'retriever' else 'simulator'}-target"
            )
        return name

    @property
    def prompt_limit(self) -> int:
        """Longest prompt accepted, in tokens."""
        ctx = self.engine.max_context_tokens
        return min(self.config.max_prompt_tokens, ctx - 1) if self.config.max_prompt_tokens else ctx - 1

    def _sampling(self, s: policy_pb2.SamplingParams, default_max: int) -> SamplingParams:
        """The message's sampling parameters (unset ones: the defaults of :class:`SamplingParams`).

        Raises:
            InvalidRequest: ``max_new_tokens`` over the server's limit, a value out of range, bad stop strings.
        """
        limit = self.config.max_new_tokens
        if s.max_new_tokens > limit:
            raise InvalidRequest(f"max_new_tokens must be in [1, {limit}] (0: default), got {s.max_new_tokens}")
        if len(s.stop) > 16 or any(len(x) > 256 or not x for x in s.stop):
            raise InvalidRequest("stop: at most 16 non-empty strings of at most 256 characters")
        return SamplingParams.parse(
            max_new_tokens=s.max_new_tokens or min(default_max, limit),
            top_k=s.top_k or -1,
            **{name: getattr(s, name) for name in ("temperature", "top_p") if s.HasField(name)},
        )

    # ------------------------------------------------------------------------------------------ RPCs
    async def Generate(self, request: policy_pb2.GenerateRequest, context: Any) -> policy_pb2.GenerateResponse:  # noqa: N802
        """n completions of one prompt.

        Raises:
            InvalidRequest: no prompt, a prompt over the limit, n outside [1, max_n], bad sampling parameters.
            Unavailable: the engine failed.
        """
        which = request.WhichOneof("prompt")
        if which == "text":
            if not request.text:
                raise InvalidRequest("prompt text is empty")
            ids = [int(x) for x in self.engine.tokenizer.encode(request.text, add_special_tokens=False)]
        elif which == "token_ids":
            ids = list(request.token_ids.ids)
        else:
            raise InvalidRequest("set prompt.text or prompt.token_ids")
        if not ids:
            raise InvalidRequest("prompt is empty")
        if len(ids) > self.prompt_limit:
            raise InvalidRequest(f"prompt has {len(ids)} tokens; the limit is {self.prompt_limit}")
        n = request.n or 1
        if not 1 <= n <= self.config.max_n:
            raise InvalidRequest(f"n must be in [1, {self.config.max_n}], got {request.n}")
        sampling = self._sampling(request.sampling, self.config.max_new_tokens)
        seed = request.sampling.seed
        outs: list[GenerationOutput] = await asyncio.gather(
            *(
                self.engine.generate(ids, sampling, stop=list(request.sampling.stop), seed=seed + i if seed else None)
                for i in range(n)
            )
        )
        GENERATED_TOKENS.inc(sum(len(o.token_ids) for o in outs))
        return policy_pb2.GenerateResponse(
            completions=[
                policy_pb2.Completion(
                    text=o.text, token_ids=o.token_ids, logprobs=o.logprobs, finish_reason=o.finish_reason
                )
                for o in outs
            ],
            prompt_tokens=len(ids),
            policy_version=next((o.policy_version for o in outs if o.policy_version), self.engine.version),
        )

    def _loop_for(self, request: policy_pb2.RolloutRequest) -> tuple[AgentLoop, int | None]:
        cfg = self.config
        backend = request.search_backend or self.default_search
        if backend not in SEARCH_BACKENDS:
            raise InvalidRequest(f"unknown search backend {backend!r}; expected one of {SEARCH_BACKENDS}")
        if backend not in self.searches:
            raise InvalidRequest(f"search backend {backend!r} is not configured on this server")
        if request.top_k < 0 or request.top_k > 20:
            raise InvalidRequest(f"top_k must be in [1, 20] (0: default), got {request.top_k}")
        if request.max_turns < 0 or request.max_turns > 32:
            raise InvalidRequest(f"max_turns must be in [1, 32] (0: default), got {request.max_turns}")
        limit = max(1, self.engine.max_context_tokens - 1)
        if request.max_response_tokens < 0 or request.max_response_tokens > limit:
            raise InvalidRequest(
                f"max_response_tokens must be in [1, {limit}] (0: default), got {request.max_response_tokens}"
            )
        s = self._sampling(request.sampling, cfg.max_new_tokens_per_turn)
        loop_cfg = AgentLoopConfig(
            **{
                **cfg.model_dump(include=set(AgentLoopConfig.model_fields)),  # the server's defaults
                "template": request.template or cfg.template,
                "max_turns": request.max_turns or cfg.max_turns,
                "max_response_tokens": request.max_response_tokens or cfg.max_response_tokens,
                "top_k": request.top_k or cfg.top_k,
                "max_new_tokens_per_turn": s.max_new_tokens,
                "temperature": s.temperature,
                "top_p": s.top_p,
                "max_prompt_tokens": self.prompt_limit,
            }
        )
        return AgentLoop(self.engine, self.searches[backend], loop_cfg), request.sampling.seed or None

    async def Rollout(
        self, request: policy_pb2.RolloutRequest, context: Any
    ) -> AsyncIterator[policy_pb2.RolloutResponse]:  # noqa: N802
        """Runs one episode; streams each turn as it finishes, then the trajectory.

        Raises:
            InvalidRequest: empty question, unknown template/backend, out-of-range limits, over-long prompt.
            Unavailable: the engine failed.
        """
        if not request.question.strip():
            raise InvalidRequest("question is empty")
        if len(request.question) > 20_000:
            raise InvalidRequest(f"question has {len(request.question)} characters; the limit is 20000")
        loop, seed = self._loop_for(request)
        turns: asyncio.Queue[TurnRecord | None] = asyncio.Queue()

        async def on_turn(turn: TurnRecord) -> None:
            await turns.put(turn)

        async def run() -> Episode:
            try:
                return await loop.run(
                    request.question,
                    list(request.golden_answers),
                    question_id=request.question_id,
                    seed=seed,
                    on_turn=on_turn,
                )
            finally:
                await turns.put(None)

        task = asyncio.create_task(run())
        try:
            while True:
                turn = await turns.get()
                if turn is None:
                    break
                yield policy_pb2.RolloutResponse(turn=turn.to_proto())
            episode = await task
        finally:
            if not task.done():
                task.cancel()
        GENERATED_TOKENS.inc(sum(t.generated_tokens for t in episode.turns))
        EPISODES.labels(episode.finish_reason).inc()
        reward = 0.0
        if episode.golden_answers:
            from searchrl.reward.scoring import score

            t0 = time.perf_counter()
            result = score(
                episode.response_text,
                episode.golden_answers,
                self.config.reward_scheme,
                ended_with_eos=episode.ended_with_eos,
            )
            episode.timings["reward_ms"] = (time.perf_counter() - t0) * 1000
            reward = float(result.reward)
        trajectory = episode.to_proto(reward=reward)
        if self.store is not None:
            try:
                await self.store.add(trajectory)
            except Exception as exc:  # the caller still gets its trajectory; the store outage is logged
                log.warning("rollout store unavailable, trajectory %s not stored: %s", trajectory.id, exc)
        yield policy_pb2.RolloutResponse(trajectory=trajectory)

    async def GetModelInfo(
        self, request: policy_pb2.GetModelInfoRequest, context: Any
    ) -> policy_pb2.GetModelInfoResponse:  # noqa: N802
        """Describes the loaded model."""
        e = self.engine
        return policy_pb2.GetModelInfoResponse(
            model=e.model_name,
            engine=e.engine_name,
            policy_version=e.version,
            vocab_size=e.vocab_size,
            eos_token_id=e.eos_token_id,
            max_context_tokens=e.max_context_tokens,
        )

    def checkpoint_path(self, path: str) -> Path:
        """``path`` resolved (symlinks, ``..``), checked against ``--weights-roots`` and for a checkpoint.

        Raises:
            PermissionDenied: the path lies outside every checkpoint root (whether or not it exists: the answer tells
                nothing about the filesystem outside the roots).
            InvalidRequest: empty path, a path with a NUL character (no filesystem path has one), or not a Hugging
                Face checkpoint directory (no ``config.json``).
        """
        if not path:
            raise InvalidRequest("path is empty")
        if "\x00" in path:  # os calls raise ValueError on it: found by the long fuzz run (INTERNAL before)
            raise InvalidRequest(f"path contains a NUL character: {path!r}")
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.weights_roots):
            roots = ", ".join(str(r) for r in self.weights_roots) or "none configured"
            raise PermissionDenied(
                f"{path!r} is outside the checkpoint roots this server loads from ({roots}; --weights-roots)"
            )
        if not (resolved / "config.json").is_file():
            raise InvalidRequest(f"{path!r} is not a checkpoint directory: no config.json in {resolved}")
        return resolved

    async def LoadWeights(self, request: policy_pb2.LoadWeightsRequest, context: Any) -> policy_pb2.LoadWeightsResponse:  # noqa: N802
        """Hot-swaps the weights; returns once the new version serves.

        Raises:
            PermissionDenied: the path is outside ``--weights-roots``.
            InvalidRequest: empty path, not a checkpoint directory, or a checkpoint the engine cannot load.
        """
        path = self.checkpoint_path(request.path)
        t0 = time.perf_counter()
        try:
            version = await self.engine.load_weights(str(path), request.policy_version)
        except (OSError, ValueError) as exc:  # a broken or foreign checkpoint: the caller's input, not our fault
            if isinstance(exc, InvalidRequest):
                raise
            raise InvalidRequest(f"cannot load {request.path!r}: {type(exc).__name__}: {exc}"[:500]) from exc
        return policy_pb2.LoadWeightsResponse(policy_version=version, load_ms=(time.perf_counter() - t0) * 1000)


class SearchBackends(dict[str, SearchBackend]):
    """Search backends by name, plus the clients (channels) they share; :meth:`close` closes both."""

    def __init__(self, backends: dict[str, SearchBackend], clients: Sequence[BaseClient] = ()) -> None:
        super().__init__(backends)
        self.clients = list(clients)

    async def close(self) -> None:
        """Closes every backend, then the shared client channels."""
        for backend in self.values():
            closer = getattr(backend, "close", None)
            if closer is not None:
                await closer()
        for client in self.clients:
            await client.close()


def search_channel_options(config: PolicyConfig, environ: Mapping[str, str] | None = None) -> ChannelOptions:
    """How the policy dials the retriever/simulator: TLS and token from the client environment
    (:meth:`ChannelOptions.from_env`: ``SEARCHRL_TLS``, ``SEARCHRL_TLS_CA_FILE``, ``SEARCHRL_AUTH_TOKEN_FILE`` ...),
    the token falling back to this server's own (``auth_token_file``/``auth_token``: the chart gives every service
    the same one), and ``search_timeout_s`` as the deadline.

    Raises:
        InvalidRequest: a file named by the environment cannot be read, or a client cert comes without its key.
    """
    opts = ChannelOptions.from_env(environ, timeout_s=config.search_timeout_s)
    if not opts.token:
        opts.token = config.resolved_token()
    return opts


def build_searches(config: PolicyConfig, environ: Mapping[str, str] | None = None) -> SearchBackends:
    """Search backends available on this server, by name (``none`` always; ``mixed`` with both targets), built by
    :func:`~searchrl.agent.search.build_search_backend` over one shared channel per target, with the TLS/token
    settings of :func:`search_channel_options`.

    Raises:
        InvalidRequest: as :func:`search_channel_options`.
    """
    opts = search_channel_options(config, environ) if config.retriever_target or config.simulator_target else None
    retriever = RetrievalClient(config.retriever_target, opts) if config.retriever_target else None
    simulator = SimulatorClient(config.simulator_target, opts) if config.simulator_target else None
    spec = SearchSpec(
        retriever_target=retriever or "",
        simulator_target=simulator or "",
        mix_ratio=config.mix_ratio,
        training=config.simulator_training,
        timeout_s=config.search_timeout_s,
        kind="none",
    )
    kinds = {"none": True, "retriever": retriever, "simulator": simulator, "mixed": retriever and simulator}
    backends = {kind: build_search_backend(spec.model_copy(update={"kind": kind})) for kind, on in kinds.items() if on}
    return SearchBackends(backends, [c for c in (retriever, simulator) if c is not None])


async def build(config: PolicyConfig) -> tuple[list[ServiceSpec], Any]:
    """Builds the engine, search backends, rollout store and servicer (the runtime's ``build`` hook)."""
    if config.engine == "sglang":
        # On the serving loop itself: sglang.Engine captures the running loop at construction, and its tokenizer
        # manager resolves futures on it only. This blocks the loop while the model loads, before the gRPC server
        # starts; the metrics server (a thread) already answers.
        engine = build_engine(config)
    else:
        engine = await asyncio.to_thread(build_engine, config)
    searches = build_searches(config)
    store = None
    if config.redis_url:
        from searchrl.services.rollouts.store import RolloutStore

        store = RolloutStore(config.redis_url, password=config.redis_password or None)
    servicer = PolicyServicer(engine, config, searches, store)

    async def cleanup() -> None:
        await searches.close()
        if store is not None:
            await store.close()
        await engine.close()

    return [ServiceSpec(SERVICE_NAME, servicer, policy_pb2_grpc.add_PolicyServiceServicer_to_server)], cleanup


def main(argv: Sequence[str] | None = None) -> int:
    """``searchrl serve policy``."""
    return int(run_service(PolicyConfig, "policy", build, argv, description=__doc__ or ""))
