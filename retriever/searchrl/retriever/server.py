"""``searchrl serve retriever``: the RetrievalService (gRPC) and the Search-R1/FlashRAG HTTP API in one process.

Both APIs share one :class:`~searchrl.retriever.engine.RetrievalEngine` (micro-batcher, Redis search cache, limits)
on one event loop; the HTTP server (aiohttp) starts inside ``build`` and stops in the cleanup function of
:func:`searchrl.serving.runtime.run_service`.

Start-up checks fail fast with exit code 2 and a one-line message, never mid-serving: missing or corrupt index file,
a manifest naming another embedding model than ``--embedding-model``, index dimension different from the model's,
passage store out of step with the index.

    searchrl serve retriever --index-dir ~/.cache/searchrl/indexes/wiki-all-minilm-l6-v2-flat
    searchrl serve retriever --index-dir wiki            # the bundled Wikipedia index, built on first use
    searchrl serve retriever --index-path e5_Flat.index --corpus-path wiki-18.jsonl --embedding-model intfloat/e5-base-v2
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from searchrl.errors import FailedPrecondition
from searchrl.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from searchrl.serving.config import field
from searchrl.serving.runtime import ServerConfig, ServiceSpec, run_service

log = logging.getLogger("searchrl.retriever.server")

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name


class RetrieverConfig(ServerConfig):
    """Settings of the RetrievalService (flags ``--index-dir`` ..., env ``SEARCHRL_RETRIEVER_INDEX_DIR`` ...)."""

    http_port: int = field(
        8000,
        help="Search-R1/FlashRAG-compatible HTTP port (/retrieve, /search, /batch_search, /health); 0 picks a free port, -1 disables. Uses the gRPC port's bearer token (all routes but /health) and TLS certificate.",
    )
    index_dir: str = field(
        "",
        help="Index directory from 'searchrl index build' (its encoder is loaded from DIR/model, offline, when present); 'wiki' or 'wiki:<type>' = the bundled Wikipedia index (built on first use).",
    )
    index_path: str = field(
        "",
        help="A raw FAISS index file (e.g. Search-R1's e5_Flat.index), instead of --index-dir; needs --corpus-path and --embedding-model.",
    )
    corpus_path: str = field("", help="Corpus jsonl of --index-path (row i = FAISS id i).")
    embedding_model: str = field(
        "",
        help="Embedding model name or path; empty: the manifest's. Must match the manifest; an --index-dir that stores its encoder (DIR/model) is queried with that copy.",
    )
    max_batch_size: int = field(1024, help="Max queries per request.")
    max_top_k: int = field(100, help="Max top-k per request.")
    max_query_chars: int = field(4096, help="Max characters per query.")
    default_top_k: int = field(5, help="Top-k when a request sends 0.")
    micro_batch_max: int = field(64, help="Max queries encoded and searched together in one micro-batch.")
    micro_batch_wait_ms: float = field(
        10.0, help="How long a forming micro-batch waits for more concurrent requests, in ms."
    )
    nprobe: int = field(0, help="IVF cells visited per query (0: the build-time value).")
    ef_search: int = field(0, help="HNSW efSearch (0: the build-time value).")
    use_gpu: bool = field(
        True,
        help="Put the index on the GPUs when faiss-gpu sees any (float16, sharded; IVF nprobe clamped to 2048). A GPU the installed faiss has no code for is refused at start-up.",
    )
    mmap_index: bool = field(False, help="Memory-map the index file instead of reading it (flat/IVF).")
    torch_threads: int = field(
        1,
        help="Torch intra-op threads for query encoding (0: one per core). One avoids OpenMP thrashing on small or shared CPUs (benchmarks/retrieval_bench.py).",
    )
    query_dtype: str = field(
        "auto",
        help="Query encoding dtype: auto (float16 on GPU, float32 on CPU), float32, bfloat16 (~1.5x faster on CPUs with native bf16; results then vary with batch composition), float16 (GPU).",
    )
    encode_workers: int = field(
        0,
        help="Threads a micro-batch's query encoding may be split over, one torch thread each (0: one per core); the encoder measures whether splitting pays under the current load.",
    )
    faiss_threads: int = field(1, help="FAISS OpenMP threads (0: one per core).")
    blas_min_batch: int = field(12, help="Exact search uses BLAS sgemm from this many queries per batch on.")
    filter_overfetch: int = field(10, help="With a titles filter, search top_k times this many candidates.")
    in_process_cache: bool = field(False, help="Without --redis-url, cache results in this process (LRU).")


def _load(config: RetrieverConfig):  # noqa: ANN202 - LoadedIndex, imported lazily
    from searchrl.retriever.index.load import LoadOptions, load_index, load_raw_index
    from searchrl.retriever.index.wiki import resolve_index_dir

    options = LoadOptions(
        use_gpu=None if config.use_gpu else False,
        nprobe=config.nprobe,
        ef_search=config.ef_search,
        mmap=config.mmap_index,
        torch_threads=config.torch_threads,
        query_dtype=config.query_dtype,
        encode_workers=config.encode_workers,
    )
    if config.index_path:
        if config.index_dir:
            raise FailedPrecondition("give either --index-dir or --index-path, not both")
        if not config.corpus_path:
            raise FailedPrecondition("--index-path needs --corpus-path (the corpus jsonl the index was built from)")
        return load_raw_index(config.index_path, config.corpus_path, config.embedding_model, options)
    if not config.index_dir:
        raise FailedPrecondition(
            "no index: pass --index-dir DIR (from 'searchrl index build'), --index-dir wiki, or --index-path/--corpus-path"
        )
    index_dir = resolve_index_dir(config.index_dir, model=config.embedding_model)
    if not index_dir.is_dir():
        raise FailedPrecondition(f"index directory {index_dir} does not exist")
    return load_index(index_dir, config.embedding_model, options)


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """``searchrl.retrieval.v1.RetrievalService`` over a :class:`~searchrl.retriever.engine.RetrievalEngine`."""

    def __init__(self, engine) -> None:  # noqa: ANN001 - RetrievalEngine, imported lazily
        self.engine = engine

    async def Search(self, request: retrieval_pb2.SearchRequest, context) -> retrieval_pb2.SearchResponse:  # noqa: N802, ANN001
        from searchrl.retriever.engine import Filters

        filters = Filters.from_proto(request.filters if request.HasField("filters") else None)
        results = await self.engine.search(
            list(request.queries), request.top_k, filters, request.skip_cache, api="grpc"
        )
        return retrieval_pb2.SearchResponse(results=results)

    async def GetIndexInfo(
        self, request: retrieval_pb2.GetIndexInfoRequest, context
    ) -> retrieval_pb2.GetIndexInfoResponse:  # noqa: N802, ANN001
        return self.engine.info()


async def build_engine(config: RetrieverConfig):  # noqa: ANN201 - RetrievalEngine
    """Loads the index, applies the thread/BLAS settings, warms the model up and starts the engine.

    Raises:
        FailedPrecondition: the index or model cannot be used (see the module docstring).
    """
    import asyncio

    from searchrl.retriever.engine import EngineLimits, RetrievalEngine
    from searchrl.retriever.index.faiss_util import set_blas_min_batch, set_faiss_threads
    from searchrl.serving.cache import make_cache

    set_faiss_threads(config.faiss_threads)  # this thread; the search worker sets its own (EngineLimits)
    loaded = await asyncio.to_thread(_load, config)  # the Encoder applies --torch-threads (process-wide)
    set_blas_min_batch(config.blas_min_batch, loaded.dimension)
    limits = EngineLimits(
        max_batch_size=config.max_batch_size,
        max_top_k=config.max_top_k,
        max_query_chars=config.max_query_chars,
        default_top_k=config.default_top_k,
        micro_batch_max=config.micro_batch_max,
        micro_batch_wait_ms=config.micro_batch_wait_ms,
        filter_overfetch=config.filter_overfetch,
        faiss_threads=config.faiss_threads,
    )
    cache = make_cache(
        config.redis_url, config.cache_ttl_s, in_process=config.in_process_cache, password=config.redis_password or None
    )
    engine = RetrievalEngine(loaded, limits, cache)
    await engine.start()
    # Warm-up: the first forward pass allocates and picks kernels; do it before reporting SERVING.
    await engine.search(["warm-up query"], 1, skip_cache=True, api="")
    log.info(
        "index %s: %d passages, dim %d, type %s, model %s (queries in %s), gpu=%s",
        loaded.manifest.corpus or config.index_dir,
        loaded.size,
        loaded.dimension,
        loaded.manifest.index_type,
        loaded.manifest.embedding_model,
        loaded.encoder.query_dtype,
        loaded.on_gpu,
    )
    return engine


async def build(config: RetrieverConfig):  # noqa: ANN201 - (specs, cleanup) for run_service
    """``run_service`` factory: engine, gRPC servicer, and the HTTP API on the same loop."""
    from searchrl.retriever.http import HttpApi, server_ssl_context

    ssl_context = (
        server_ssl_context(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file)
        if config.http_port >= 0
        else None
    )  # read before the slow index load, so a bad TLS file fails fast
    engine = await build_engine(config)
    http: HttpApi | None = None
    if config.http_port >= 0:
        http = HttpApi(
            engine, max_body_mb=config.max_message_mb, token=config.resolved_token(), ssl_context=ssl_context
        )
        try:
            port = await http.start(config.host, config.http_port)
        except OSError as exc:
            await engine.close()
            raise OSError(f"could not bind HTTP port {config.host}:{config.http_port}: {exc.strerror or exc}") from None
        auth = " bearer-token" if config.resolved_token() else ""
        print(
            f"HTTP retriever {http.scheme}://{config.host}:{port} (/retrieve, /search, /batch_search, /health){auth}",
            flush=True,
        )

    async def cleanup() -> None:
        if http is not None:
            await http.stop()
        await engine.close()

    spec = ServiceSpec(
        SERVICE_NAME, RetrievalServicer(engine), retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server
    )
    return [spec], cleanup


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``searchrl serve retriever``; returns the exit code (2 on a start-up error)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return run_service(RetrieverConfig, "retriever", build, argv, description=__doc__.splitlines()[0])


if __name__ == "__main__":
    raise SystemExit(main())
