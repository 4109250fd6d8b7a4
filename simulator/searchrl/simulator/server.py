"""SimulatedSearchService: ZeroSearch simulated search over gRPC (``searchrl serve simulator``).

``Search`` answers a batch of queries with ``top_k`` LLM-written documents each. The quality of every query's
document set is fixed by the caller (USEFUL / NOISY), or drawn per query with a noise probability that the caller
sends or that the curriculum (ZeroSearch section 3.4) computes from the training step; the draw is seeded so runs can
be replayed (:mod:`searchrl.simulator.curriculum`). The quality used comes back in each result.

A search cache sits in front of the engine (Redis when ``--redis-url`` is set, :class:`~searchrl.serving.cache.
SearchCache`; an in-process LRU with ``--in-process-cache``), keyed by engine, model, prompt version, query, top-k,
quality and conditioning, holding serialized ``QueryResult`` messages. Generation seeds are a function of the request
(:func:`searchrl.simulator.simulate.generation_seed`), so every result is cached, including one that needed "no result"
fillers: generating it again would give the same documents.

Errors: empty batch or batch over ``--max-batch``, empty or over-long query, top-k outside [0, ``--max-top-k``], an
unknown quality value, a noise probability outside [0, 1] or a bad curriculum position -> INVALID_ARGUMENT; the engine
down -> UNAVAILABLE; the engine too slow -> DEADLINE_EXCEEDED. The service keeps serving after any of them.

Metrics (besides the runtime's per-RPC ones and the cache's): ``searchrl_simulator_queries_total{quality}``,
``searchrl_simulator_documents_total{quality}``, ``searchrl_simulator_noise_probability`` (last noise probability
used), and from :mod:`searchrl.simulator.simulate` ``searchrl_simulator_repairs_total{kind}``,
``searchrl_simulator_engine_tokens_total`` and ``searchrl_simulator_engine_seconds``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from searchrl.errors import InvalidRequest
from searchrl.rollout.v1 import rollout_pb2
from searchrl.serving.config import field
from searchrl.serving.runtime import ServerConfig, ServiceSpec, run_service
from searchrl.simulation.v1 import simulation_pb2, simulation_pb2_grpc
from searchrl.simulator.curriculum import Curriculum, Quality, draw_qualities
from searchrl.simulator.engines import ENGINES, SimulationEngine, make_engine
from searchrl.simulator.parsing import document_id
from searchrl.simulator.prompts import PROMPT_VERSION, Conditioning
from searchrl.simulator.simulate import DocumentSimulator, SimulationItem

log = logging.getLogger("searchrl.simulator")

SERVICE_NAME = simulation_pb2.DESCRIPTOR.services_by_name["SimulatedSearchService"].full_name
CACHE_BACKEND = "simulator"

QUERIES = PromCounter(
    "searchrl_simulator_queries_total", "Simulated queries answered, by document quality.", ["quality"]
)
DOCUMENTS = PromCounter("searchrl_simulator_documents_total", "Simulated documents returned, by quality.", ["quality"])
NOISE_PROBABILITY = Gauge(
    "searchrl_simulator_noise_probability",
    "Noise probability of the last request that drew qualities (curriculum p_i).",
)

_PROTO_QUALITY = {
    Quality.USEFUL: rollout_pb2.DOCUMENT_QUALITY_USEFUL,
    Quality.NOISY: rollout_pb2.DOCUMENT_QUALITY_NOISY,
}
_QUALITY_OF = {v: k for k, v in _PROTO_QUALITY.items()}


class SimulatorConfig(ServerConfig):
    """Settings of ``searchrl serve simulator`` (flags ``--top-k`` ..., env ``SEARCHRL_SIMULATOR_TOP_K`` ...)."""

    engine: str = field(
        "transformers", help="Simulation engine: transformers (CPU), vllm (GPU, in-process) or openai (remote servers)."
    )
    model: str = field(
        "smollm2-135m-instruct",
        help="Model: a checkpoint directory or name (transformers/vllm; 'smollm2-135m-instruct' is the embedded one) "
        "or the served model name (openai).",
    )
    openai_base_urls: list[str] = field(
        default_factory=list,
        help="Comma-separated base URLs of OpenAI-compatible servers (vLLM/SGLang), e.g. http://sim-0:8000.",
    )
    openai_api_key: str = field("", help="Bearer token for the OpenAI-compatible servers.", secret=True)
    engine_timeout_s: float = field(120.0, help="Timeout of one engine request (openai), in seconds.")
    engine_max_attempts: int = field(3, help="Attempts per engine request on connection errors / 5xx (openai).")
    engine_max_batch_size: int = field(16, help="Rows the transformers engine decodes together.")
    dtype: str = field("float32", help="Weights dtype of the transformers engine: float32, bfloat16 or float16.")
    torch_threads: int = field(
        1,
        help="Torch intra-op threads of the transformers engine (0: one per core). One avoids OpenMP thrashing on "
        "small or shared CPUs (measured 5x faster decoding on 2 busy cores).",
    )
    vllm_kwargs: str = field("{}", help='Extra vLLM AsyncEngineArgs as JSON, e.g. {"gpu_memory_utilization": 0.5}.')
    top_k: int = field(5, help="Documents per query when a request sends top_k 0 (ZeroSearch: 5).")
    max_top_k: int = field(20, help="Largest top_k accepted.")
    max_batch: int = field(256, help="Most queries in one Search request.")
    max_query_chars: int = field(1024, help="Longest query accepted, in characters.")
    curriculum_start: float = field(0.0, help="Curriculum p_s: noise probability at step 0 (ZeroSearch: 0).")
    curriculum_end: float = field(0.5, help="Curriculum p_e: noise probability at the last step (ZeroSearch: 0.5).")
    curriculum_base: float = field(4.0, help="Curriculum base b (ZeroSearch: 4).")
    noise_probability: float = field(0.0, help="Noise probability when a request names no quality source.")
    doc_words: int = field(30, help="Target words per document (ZeroSearch: about 30).")
    tokens_per_doc: int = field(64, help="Generation budget per missing document, in tokens.")
    max_tokens: int = field(600, help="Cap of one generation, in tokens (ZeroSearch: 600).")
    temperature: float = field(0.7, help="Sampling temperature of the simulation LLM.")
    top_p: float = field(0.95, help="Nucleus mass of the simulation LLM.")
    max_retries: int = field(2, help="Extra generation rounds for queries still short of top_k documents.")
    seed: int = field(0, help="Base seed of document generation.")
    in_process_cache: bool = field(False, help="Cache results in this process when no --redis-url is set.")


def _proto_quality(q: Quality) -> rollout_pb2.DocumentQuality.ValueType:
    return _PROTO_QUALITY[q]


class SimulatorServicer(simulation_pb2_grpc.SimulatedSearchServiceServicer):
    """Implements ``Search`` and ``GetSimulatorInfo``.

    Args:
        config: the service settings.
        engine: the simulation engine (owned by the caller).
        cache: a :class:`~searchrl.serving.cache.SearchCache`/``InProcessCache`` or ``None``.
    """

    def __init__(self, config: SimulatorConfig, engine: SimulationEngine, cache: Any = None) -> None:
        self.config = config
        self.engine = engine
        self.cache = cache
        self.curriculum = Curriculum(config.curriculum_start, config.curriculum_end, config.curriculum_base)
        self.simulator = DocumentSimulator(
            engine,
            words=config.doc_words,
            tokens_per_doc=config.tokens_per_doc,
            max_tokens=config.max_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            max_retries=config.max_retries,
            seed=config.seed,
        )
        self.version = f"{engine.name}:{engine.model}:{PROMPT_VERSION}:w{config.doc_words}"

    # ------------------------------------------------------------------------------------------------ validation
    def _validate(self, request: simulation_pb2.SearchRequest) -> int:
        cfg = self.config
        n = len(request.queries)
        if n == 0:
            raise InvalidRequest("queries is empty: send at least one query")
        if n > cfg.max_batch:
            raise InvalidRequest(f"too many queries: {n} > max batch {cfg.max_batch}")
        for i, q in enumerate(request.queries):
            if not q.strip():
                raise InvalidRequest(f"queries[{i}] is empty")
            if len(q) > cfg.max_query_chars:
                raise InvalidRequest(f"queries[{i}] has {len(q)} characters; the limit is {cfg.max_query_chars}")
        if request.top_k < 0 or request.top_k > cfg.max_top_k:
            raise InvalidRequest(f"top_k must be in [0, {cfg.max_top_k}] (0: default {cfg.top_k}), got {request.top_k}")
        if len(request.question) > 4 * cfg.max_query_chars:
            raise InvalidRequest(
                f"question has {len(request.question)} characters; the limit is {4 * cfg.max_query_chars}"
            )
        return request.top_k or cfg.top_k

    def _qualities(self, request: simulation_pb2.SearchRequest) -> tuple[list[Quality], float]:
        """Qualities per query and the noise probability used (-1 for a fixed quality)."""
        source = request.WhichOneof("quality_source")
        queries = list(request.queries)
        if source == "quality":
            if request.quality not in _QUALITY_OF:
                raise InvalidRequest(
                    f"quality must be DOCUMENT_QUALITY_USEFUL (1) or DOCUMENT_QUALITY_NOISY (2), got {request.quality}"
                )
            return [_QUALITY_OF[request.quality]] * len(queries), -1.0
        if source == "noise_probability":
            p = float(request.noise_probability)
            if not 0.0 <= p <= 1.0:  # also rejects NaN
                raise InvalidRequest(f"noise_probability must be in [0, 1], got {request.noise_probability}")
        elif source == "curriculum":
            step, total = request.curriculum.step, request.curriculum.total_steps
            if total <= 0 or not 0 <= step <= total:
                raise InvalidRequest(
                    f"curriculum needs total_steps > 0 and 0 <= step <= total_steps, got step={step}, total_steps={total}"
                )
            p = self.curriculum.noise_probability(step, total)
        else:
            p = self.config.noise_probability
        NOISE_PROBABILITY.set(p)
        return draw_qualities(queries, p, int(request.seed)), p

    # ------------------------------------------------------------------------------------------------ RPCs
    async def Search(self, request: simulation_pb2.SearchRequest, context: Any) -> simulation_pb2.SearchResponse:  # noqa: N802
        """Simulated documents for each query (see the module docstring)."""
        k = self._validate(request)
        qualities, p = self._qualities(request)
        conditioning = Conditioning(request.question, tuple(request.golden_answers))
        cond_key = conditioning.key()
        queries = list(request.queries)
        use_cache = self.cache is not None and not request.skip_cache
        keys = (
            [
                self.cache.make_key(CACHE_BACKEND, self.version, q, k, qual.value, cond_key)
                for q, qual in zip(queries, qualities, strict=True)
            ]
            if use_cache
            else []
        )
        cached: list[bytes | None] = await self.cache.get_many(keys) if use_cache else [None] * len(queries)
        results: list[simulation_pb2.QueryResult | None] = [None] * len(queries)
        for i, raw in enumerate(cached):
            if raw is None:
                continue
            try:
                hit = simulation_pb2.QueryResult.FromString(raw)
            except Exception:  # a corrupt entry is a miss
                log.warning("undecodable cache entry for query %d; regenerating", i)
                continue
            hit.query = queries[i]
            hit.cache_hit = True
            results[i] = hit
        # Identical (query, quality) misses in one request are generated once.
        todo: dict[tuple[str, Quality], list[int]] = {}
        for i, r in enumerate(results):
            if r is None:
                todo.setdefault((queries[i], qualities[i]), []).append(i)
        if todo:
            items = [SimulationItem(q, qual, k, conditioning) for (q, qual) in todo]
            sims = await self.simulator.simulate(items, seed=int(request.seed))
            to_store: dict[str, bytes] = {}
            for item, sim, idxs in zip(items, sims, todo.values(), strict=True):
                result = simulation_pb2.QueryResult(query=item.query, quality=_proto_quality(item.quality))
                pq = _proto_quality(item.quality)
                for rank, doc in enumerate(sim.documents):
                    result.documents.add(
                        id=document_id(item.query, item.quality.value, rank),
                        title=doc.title,
                        text=doc.text,
                        score=0.0,
                        quality=pq,
                    )
                for i in idxs:
                    results[i] = result
                if use_cache:
                    to_store[keys[idxs[0]]] = result.SerializeToString()
            if to_store:
                await self.cache.set_many(to_store)
        out = simulation_pb2.SearchResponse(noise_probability=p)
        tally: Counter[Quality] = Counter()
        for r, qual in zip(results, qualities, strict=True):
            assert r is not None
            out.results.append(r)
            tally[qual] += 1
        for qual, n in tally.items():
            QUERIES.labels(qual.value).inc(n)
            DOCUMENTS.labels(qual.value).inc(n * k)
        return out

    async def GetSimulatorInfo(
        self, request: simulation_pb2.GetSimulatorInfoRequest, context: Any
    ) -> simulation_pb2.GetSimulatorInfoResponse:  # noqa: N802
        """Engine, model and curriculum parameters."""
        return simulation_pb2.GetSimulatorInfoResponse(
            engine=self.engine.name,
            model=self.engine.model,
            curriculum_start=self.curriculum.start,
            curriculum_end=self.curriculum.end,
            curriculum_base=self.curriculum.base,
        )


def check_config(config: SimulatorConfig) -> None:
    """Validates the settings before anything is loaded.

    Raises:
        ValueError: an unknown engine, out-of-range limits, bad curriculum parameters or vLLM kwargs that are not JSON.
    """
    if config.engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {config.engine!r}")
    if config.engine == "openai" and not config.openai_base_urls:
        raise ValueError("--engine openai needs --openai-base-urls")
    if not 1 <= config.top_k <= config.max_top_k:
        raise ValueError(f"--top-k must be in [1, --max-top-k={config.max_top_k}], got {config.top_k}")
    if config.max_batch < 1 or config.max_query_chars < 1:
        raise ValueError("--max-batch and --max-query-chars must be >= 1")
    if not 0.0 <= config.noise_probability <= 1.0:
        raise ValueError(f"--noise-probability must be in [0, 1], got {config.noise_probability}")
    Curriculum(config.curriculum_start, config.curriculum_end, config.curriculum_base)
    try:
        kwargs = json.loads(config.vllm_kwargs or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"--vllm-kwargs is not JSON: {exc}") from None
    if not isinstance(kwargs, dict):
        raise ValueError("--vllm-kwargs must be a JSON object")


def engine_from_config(config: SimulatorConfig) -> SimulationEngine:
    """Builds the engine the config names (loads the model for transformers/vLLM)."""
    return make_engine(
        config.engine,
        config.model,
        openai_base_urls=config.openai_base_urls,
        openai_api_key=config.openai_api_key,
        timeout_s=config.engine_timeout_s,
        max_attempts=config.engine_max_attempts,
        max_batch_size=config.engine_max_batch_size,
        dtype=config.dtype,
        torch_threads=config.torch_threads,
        vllm_kwargs=json.loads(config.vllm_kwargs or "{}"),
    )


def cache_from_config(config: SimulatorConfig) -> Any:
    """The search cache the config asks for, or ``None``."""
    from searchrl.serving.cache import make_cache

    return make_cache(
        config.redis_url, config.cache_ttl_s, in_process=config.in_process_cache, password=config.redis_password or None
    )


async def build(config: SimulatorConfig) -> tuple[list[ServiceSpec], Any]:
    """``run_service`` factory: engine, cache and servicer; the cleanup closes the cache and the engine."""
    check_config(config)
    engine = engine_from_config(config)
    cache = cache_from_config(config)
    servicer = SimulatorServicer(config, engine, cache)
    log.info(
        "simulator engine=%s model=%s cache=%s", engine.name, engine.model, type(cache).__name__ if cache else "none"
    )

    async def cleanup() -> None:
        if cache is not None:
            await cache.close()
        await engine.close()

    spec = ServiceSpec(SERVICE_NAME, servicer, simulation_pb2_grpc.add_SimulatedSearchServiceServicer_to_server)
    return [spec], cleanup


def main(argv: Sequence[str] | None = None) -> int:
    """``searchrl serve simulator [flags]``; returns the exit code."""
    description = "Simulated search service (ZeroSearch): an LLM writes useful or noisy documents for each query."
    return int(run_service(SimulatorConfig, "simulator", build, argv, description=description))


if __name__ == "__main__":
    raise SystemExit(main())
