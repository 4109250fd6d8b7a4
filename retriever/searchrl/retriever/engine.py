"""The search engine behind both APIs: validation, search cache, micro-batching, filters, metrics.

:class:`RetrievalEngine` answers :meth:`~RetrievalEngine.search` calls from the gRPC servicer and the HTTP handlers
alike, so both give identical results. One call:

1. validates the request (batch size, query length, top-k) and raises :class:`~searchrl.errors.InvalidRequest`;
2. looks every query up in the search cache (Redis via :class:`searchrl.serving.cache.SearchCache`, key = backend
   ``retriever``, index version = corpus checksum + model + index type, query, top-k, filters);
3. sends the misses to the :class:`~searchrl.retriever.batcher.MicroBatcher`, which encodes and searches the queries of
   many concurrent requests at once in a worker thread, with the largest (over-fetched when filtered) top-k of the
   batch, and cuts each request's results to its own top-k;
4. stores the new results in the cache and returns ``retrieval_pb2.QueryResult`` messages in request order.

Metrics: ``searchrl_retriever_batch_size`` (queries per micro-batch), ``searchrl_retriever_stage_seconds{stage=
encode|search|lookup}``, ``searchrl_retriever_queries_total{api}``; the cache counts its own hits and misses
(``searchrl_search_cache_requests_total{backend="retriever"}``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram

from searchrl.errors import InvalidRequest
from searchrl.retrieval.v1 import retrieval_pb2
from searchrl.retriever.batcher import MicroBatcher
from searchrl.retriever.index.faiss_util import set_faiss_threads
from searchrl.retriever.index.load import LoadedIndex
from searchrl.rollout.v1 import rollout_pb2

log = logging.getLogger("searchrl.retriever.engine")

BATCH_SIZE = Histogram(
    "searchrl_retriever_batch_size",
    "Queries encoded and searched together in one micro-batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
STAGE_SECONDS = Histogram(
    "searchrl_retriever_stage_seconds",
    "Time per micro-batch in each stage: encode (query embedding), search (FAISS), lookup (passages to documents).",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
QUERIES = Counter("searchrl_retriever_queries_total", "Queries received, by API (grpc|http).", ["api"])

CACHE_BACKEND = "retriever"


@dataclass
class EngineLimits:
    """Request limits and batching knobs of the engine.

    Attributes:
        max_batch_size: queries per request.
        max_top_k: largest top-k a request may ask for.
        max_query_chars: longest query, in characters.
        default_top_k: top-k when a request sends 0 (or no top-k over HTTP).
        micro_batch_max: queries per micro-batch.
        micro_batch_wait_ms: how long a forming micro-batch waits for more requests.
        filter_overfetch: with a titles filter, search ``top_k * filter_overfetch`` candidates and keep the matches.
        max_fetch: cap on candidates searched per query (filters).
        faiss_threads: OpenMP threads of FAISS in the search worker thread (0: FAISS's default, one per core).
    """

    max_batch_size: int = 1024
    max_top_k: int = 100
    max_query_chars: int = 4096
    default_top_k: int = 5
    micro_batch_max: int = 64
    micro_batch_wait_ms: float = 10.0
    filter_overfetch: int = 10
    max_fetch: int = 2048
    faiss_threads: int = 1


@dataclass(frozen=True)
class Filters:
    """Restrictions on returned passages (see ``retrieval.proto`` ``SearchFilters``)."""

    titles: frozenset[str] = frozenset()
    exclude_ids: frozenset[str] = frozenset()

    @staticmethod
    def from_proto(msg: retrieval_pb2.SearchFilters | None) -> Filters:
        if msg is None:
            return Filters()
        return Filters(frozenset(msg.titles), frozenset(msg.exclude_ids))

    def __bool__(self) -> bool:
        return bool(self.titles or self.exclude_ids)

    def cache_tag(self) -> str:
        """Canonical text of the filters for the cache key (``""`` when none)."""
        if not self:
            return ""
        return "t=" + "\x1f".join(sorted(self.titles)) + "|x=" + "\x1f".join(sorted(self.exclude_ids))


@dataclass
class _Job:
    queries: list[str]
    top_k: int
    fetch_k: int
    filters: Filters


class RetrievalEngine:
    """Validated, cached, micro-batched search over a :class:`~searchrl.retriever.index.load.LoadedIndex`.

    Args:
        index: the loaded index (model, FAISS index, passages).
        limits: request limits and batching knobs.
        cache: a :class:`searchrl.serving.cache.SearchCache` or ``InProcessCache`` (``None``: no cache).

    Call :meth:`start` on the serving event loop, and :meth:`close` at shutdown.
    """

    def __init__(self, index: LoadedIndex, limits: EngineLimits | None = None, cache: object | None = None) -> None:
        self.index = index
        self.limits = limits or EngineLimits()
        self.cache = cache
        self._batcher: MicroBatcher[_Job, list[retrieval_pb2.QueryResult]] = MicroBatcher(
            self._run_batch,
            max_items=self.limits.micro_batch_max,
            max_wait_ms=self.limits.micro_batch_wait_ms,
            units=lambda job: len(job.queries),
            on_batch=lambda _n, units: BATCH_SIZE.observe(units),
            thread_init=lambda: set_faiss_threads(self.limits.faiss_threads),
        )

    async def start(self) -> None:
        """Starts the micro-batcher (on the running loop)."""
        await self._batcher.start()

    async def close(self) -> None:
        """Stops the micro-batcher and closes the cache."""
        await self._batcher.close()
        close = getattr(self.cache, "close", None)
        if close is not None:
            await close()

    # ------------------------------------------------------------------ validation
    def resolve_top_k(self, top_k: int | None) -> int:
        """The effective top-k: ``None``/0 -> default; else 1..max_top_k.

        Raises:
            InvalidRequest: negative or above ``max_top_k``.
        """
        if top_k is None or top_k == 0:
            return self.limits.default_top_k
        if top_k < 0:
            raise InvalidRequest(
                f"top_k must be positive (0 means the default {self.limits.default_top_k}), got {top_k}"
            )
        if top_k > self.limits.max_top_k:
            raise InvalidRequest(f"top_k {top_k} exceeds this server's max_top_k of {self.limits.max_top_k}")
        return int(top_k)

    def validate_queries(self, queries: Sequence[str]) -> None:
        """Checks batch size and each query.

        Raises:
            InvalidRequest: no queries, more than ``max_batch_size``, an empty/blank or over-long query (the message
                names the index of the first offending query).
        """
        n = len(queries)
        if n == 0:
            raise InvalidRequest("queries must not be empty")
        if n > self.limits.max_batch_size:
            raise InvalidRequest(
                f"{n} queries in one request exceed this server's max_batch_size of {self.limits.max_batch_size}"
            )
        for i, q in enumerate(queries):
            if not isinstance(q, str):
                raise InvalidRequest(f"query {i} is not a string")
            if not q.strip():
                raise InvalidRequest(f"query {i} is empty")
            if len(q) > self.limits.max_query_chars:
                raise InvalidRequest(f"query {i} has {len(q)} characters; the limit is {self.limits.max_query_chars}")

    # ------------------------------------------------------------------ search
    def _fetch_k(self, top_k: int, filters: Filters) -> int:
        k = top_k
        if filters.exclude_ids:
            k += len(filters.exclude_ids)  # at most that many hits can be dropped
        if filters.titles:
            k = max(k, top_k * self.limits.filter_overfetch)
        return max(1, min(k, self.limits.max_fetch, self.index.size))

    async def search(
        self,
        queries: Sequence[str],
        top_k: int | None = None,
        filters: Filters | None = None,
        skip_cache: bool = False,
        api: str = "grpc",
    ) -> list[retrieval_pb2.QueryResult]:
        """Top-k passages per query, best first.

        Args:
            queries: 1..max_batch_size non-empty queries of at most max_query_chars characters.
            top_k: passages per query (``None``/0: the default).
            filters: titles to keep / ids to drop.
            skip_cache: neither read nor write the cache.
            api: label for the queries counter (empty: not counted).

        Returns:
            One ``QueryResult`` per query, in order; ``cache_hit`` marks results served from the cache.

        Raises:
            InvalidRequest: see :meth:`validate_queries` and :meth:`resolve_top_k`.
        """
        queries = list(queries)
        self.validate_queries(queries)
        k = self.resolve_top_k(top_k)
        filters = filters or Filters()
        if len(filters.titles) + len(filters.exclude_ids) > 10_000:
            raise InvalidRequest("filters hold more than 10,000 titles/ids")
        if api:
            QUERIES.labels(api).inc(len(queries))
        results: list[retrieval_pb2.QueryResult | None] = [None] * len(queries)
        keys: list[str] = []
        use_cache = self.cache is not None and not skip_cache
        if use_cache:
            make_key = self.cache.make_key  # type: ignore[union-attr]
            tag = filters.cache_tag()
            keys = [make_key(CACHE_BACKEND, self.index.version, q, k, conditioning=tag) for q in queries]
            try:
                cached = await self.cache.get_many(keys)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - the cache must never fail a search
                log.warning("search cache lookup failed (%s); searching", type(exc).__name__)
                cached = [None] * len(queries)
            for i, raw in enumerate(cached):
                if raw is not None:
                    try:
                        r = retrieval_pb2.QueryResult.FromString(raw)
                    except Exception:  # noqa: BLE001 - a corrupt entry is a miss
                        continue
                    r.query = queries[i]
                    r.cache_hit = True
                    results[i] = r
        miss = [i for i, r in enumerate(results) if r is None]
        if miss:
            job = _Job([queries[i] for i in miss], k, self._fetch_k(k, filters), filters)
            fresh = await self._batcher.submit(job)
            for i, r in zip(miss, fresh, strict=True):
                results[i] = r
            if use_cache:
                try:
                    await self.cache.set_many(
                        {keys[i]: r.SerializeToString() for i, r in zip(miss, fresh, strict=True)}
                    )  # type: ignore[union-attr]
                except Exception as exc:  # noqa: BLE001
                    log.warning("search cache store failed (%s)", type(exc).__name__)
        return results  # type: ignore[return-value]

    def _run_batch(self, jobs: list[_Job]) -> list[list[retrieval_pb2.QueryResult]]:
        """Worker thread: encode every query of every job once, search once with the largest k, cut per job."""
        all_q = [q for job in jobs for q in job.queries]
        t0 = time.perf_counter()
        vectors = self.index.encoder.encode_queries(all_q, batch_size=max(len(all_q), 1))
        t1 = time.perf_counter()
        kmax = max(job.fetch_k for job in jobs)
        scores, rows = self.index.search_vectors(vectors, kmax)
        t2 = time.perf_counter()
        out: list[list[retrieval_pb2.QueryResult]] = []
        pos = 0
        for job in jobs:
            res = []
            for q in job.queries:
                res.append(self._to_result(q, scores[pos], rows[pos], job))
                pos += 1
            out.append(res)
        t3 = time.perf_counter()
        STAGE_SECONDS.labels("encode").observe(t1 - t0)
        STAGE_SECONDS.labels("search").observe(t2 - t1)
        STAGE_SECONDS.labels("lookup").observe(t3 - t2)
        return out

    def _to_result(self, query: str, scores: np.ndarray, rows: np.ndarray, job: _Job) -> retrieval_pb2.QueryResult:
        store = self.index.store
        docs = []
        f = job.filters
        for score, row in zip(scores.tolist(), rows.tolist(), strict=True):
            if row < 0:
                continue
            if f:
                if f.titles and store.title_of(row) not in f.titles:
                    continue
                if f.exclude_ids and store.id_of(row) in f.exclude_ids:
                    continue
            p = store.get(row)
            docs.append(rollout_pb2.Document(id=p.id, title=p.title, text=p.text, score=score))
            if len(docs) == job.top_k:
                break
        return retrieval_pb2.QueryResult(query=query, documents=docs, cache_hit=False)

    def info(self) -> retrieval_pb2.GetIndexInfoResponse:
        """Description of the loaded index (``GetIndexInfo``)."""
        m = self.index.manifest
        return retrieval_pb2.GetIndexInfoResponse(
            embedding_model=m.embedding_model,
            dimension=self.index.dimension,
            size=self.index.size,
            index_type=m.index_type,
            corpus_checksum=m.corpus_checksum,
            on_gpu=self.index.on_gpu,
            query_dtype=self.index.encoder.query_dtype,
        )
