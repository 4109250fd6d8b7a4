"""Typed async client of ``searchrl.retrieval.v1.RetrievalService``.

>>> from searchrl.client import RetrievalClient
>>> async with RetrievalClient("127.0.0.1:50052") as rc:
...     docs = await rc.search(["who wrote hamlet"], top_k=3)
...     docs[0][0].title, docs.cache_hits[0]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from searchrl.client.base import BaseClient, ChannelOptions
from searchrl.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from searchrl.rollout.v1 import rollout_pb2


class SearchResults(list[list[rollout_pb2.Document]]):
    """The documents of each query (a plain ``list[list[Document]]``), plus per-query cache-hit flags.

    Attributes:
        cache_hits: ``cache_hits[i]`` is True when query ``i`` was answered from the search cache.
    """

    def __init__(self, docs: Iterable[list[rollout_pb2.Document]] = (), cache_hits: Sequence[bool] = ()) -> None:
        super().__init__(docs)
        self.cache_hits: list[bool] = list(cache_hits)


class RetrievalClient(BaseClient):
    """Client of the RetrievalService (retries its idempotent calls, optional TLS/token; see :class:`BaseClient`).

    Args:
        target: ``host:port`` or ``dns:///retriever.ns.svc:50052``.
        options: deadline, token, TLS.
    """

    service_name = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"].full_name

    def __init__(self, target: str, options: ChannelOptions | None = None) -> None:
        super().__init__(target, options)
        self._stub = retrieval_pb2_grpc.RetrievalServiceStub(self.channel)

    async def search_results(
        self,
        queries: Sequence[str],
        top_k: int = 5,
        filters: retrieval_pb2.SearchFilters | dict[str, Sequence[str]] | None = None,
        skip_cache: bool = False,
        timeout_s: float | None = None,
    ) -> list[retrieval_pb2.QueryResult]:
        """The raw ``QueryResult`` messages (query, documents best first, cache_hit), one per query.

        Args:
            queries: 1 to the server's max batch (default 1,024) non-empty queries.
            top_k: passages per query (0: the server default).
            filters: ``SearchFilters`` or ``{"titles": [...], "exclude_ids": [...]}``.
            skip_cache: bypass the server's search cache.
            timeout_s: deadline in seconds (default: the channel option).

        Raises:
            grpc.aio.AioRpcError: INVALID_ARGUMENT for bad input (empty/over-long query, top-k out of range, batch too
                large), UNAVAILABLE after retries, DEADLINE_EXCEEDED.
        """
        if isinstance(filters, dict):
            filters = retrieval_pb2.SearchFilters(
                titles=list(filters.get("titles", ())), exclude_ids=list(filters.get("exclude_ids", ()))
            )
        req = retrieval_pb2.SearchRequest(queries=list(queries), top_k=top_k, skip_cache=skip_cache)
        if filters is not None:
            req.filters.CopyFrom(filters)
        resp = await self._stub.Search(req, **self.call_kwargs(timeout_s))
        return list(resp.results)

    async def search(
        self,
        queries: Sequence[str],
        top_k: int = 5,
        filters: retrieval_pb2.SearchFilters | dict[str, Sequence[str]] | None = None,
        skip_cache: bool = False,
        timeout_s: float | None = None,
    ) -> SearchResults:
        """Top-k documents per query, best first (see :meth:`search_results` for the arguments and errors).

        Returns:
            A :class:`SearchResults`: ``result[i]`` is the list of documents of ``queries[i]``;
            ``result.cache_hits[i]`` says whether the cache answered it.
        """
        results = await self.search_results(queries, top_k, filters, skip_cache, timeout_s)
        return SearchResults([list(r.documents) for r in results], [r.cache_hit for r in results])

    async def index_info(self, timeout_s: float | None = None) -> retrieval_pb2.GetIndexInfoResponse:
        """Embedding model, dimension, size, index type, corpus checksum and GPU placement of the served index."""
        return await self._stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), **self.call_kwargs(timeout_s))
