"""The engine in-process and behind a real in-process gRPC server: validation, filters, top-k, Redis cache."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from searchrl.errors import InvalidRequest
from searchrl.retrieval.v1 import retrieval_pb2
from searchrl.retriever.engine import EngineLimits, Filters, RetrievalEngine

QUESTION = "What is the population of Macau?"


def _docs(result: retrieval_pb2.QueryResult) -> list[tuple[str, str, str, float]]:
    return [(d.id, d.title, d.text, round(d.score, 5)) for d in result.documents]


@pytest.fixture
async def engine(flat_index):  # noqa: ANN001, ANN201
    eng = RetrievalEngine(flat_index, EngineLimits(micro_batch_wait_ms=5))
    await eng.start()
    yield eng
    await eng.close()


BAD_REQUESTS = [
    ([], 5, "queries must not be empty"),
    ([""], 5, "query 0 is empty"),
    (["ok", "   "], 5, "query 1 is empty"),
    (["x" * 100_000], 5, "query 0 has 100000 characters; the limit is 4096"),
    ([QUESTION], -1, "top_k must be positive"),
    ([QUESTION], 10_000, "top_k 10000 exceeds this server's max_top_k of 100"),
    (["q"] * 5000, 5, "5000 queries in one request exceed this server's max_batch_size of 1024"),
]


@pytest.mark.parametrize("queries,top_k,message", BAD_REQUESTS)
async def test_bad_requests_are_rejected(engine, queries, top_k, message) -> None:  # noqa: ANN001
    with pytest.raises(InvalidRequest, match=message):
        await engine.search(queries, top_k)


async def test_top_k_zero_means_default_and_results_are_ranked(engine) -> None:  # noqa: ANN001
    (r,) = await engine.search([QUESTION], 0)
    assert len(r.documents) == 5 and r.query == QUESTION and not r.cache_hit
    assert r.documents[0].title == "Macau"
    scores = [d.score for d in r.documents]
    assert scores == sorted(scores, reverse=True)


async def test_concurrent_requests_with_different_top_k(engine) -> None:  # noqa: ANN001
    ks = [1, 7, 3, 12, 5, 2, 9, 4]
    outs = await asyncio.gather(*(engine.search([QUESTION, "Mount Everest height"], k) for k in ks))
    assert [len(o[0].documents) for o in outs] == ks
    full = _docs(outs[3][0])
    for k, o in zip(ks, outs, strict=True):
        assert _docs(o[0]) == full[:k]  # each request gets its prefix of the same ranking
        assert o[1].documents[0].title == "Mount Everest"
    assert engine._batcher.batches < 1 + len(ks)  # coalesced (the first request may run alone)


async def test_filters_drop_ids_and_keep_titles(engine) -> None:  # noqa: ANN001
    (base,) = await engine.search([QUESTION], 6)
    top = base.documents[0]
    (r,) = await engine.search([QUESTION], 5, Filters(exclude_ids=frozenset({top.id})))
    assert _docs(r) == _docs(base)[1:6]  # the excluded passage is gone and the next one moves up
    wanted = base.documents[3].title
    (r,) = await engine.search([QUESTION], 5, Filters(titles=frozenset({wanted})))
    assert [d.title for d in r.documents] == [wanted]


async def test_redis_cache_returns_what_a_miss_returns(flat_index, redis_url, redis_client) -> None:  # noqa: ANN001
    from searchrl.serving.cache import SearchCache

    eng = RetrievalEngine(flat_index, EngineLimits(), SearchCache(redis_url, ttl_s=60))
    await eng.start()
    try:
        qs = [QUESTION, "Who wrote Hamlet?"]
        miss = await eng.search(qs, 4)
        assert [r.cache_hit for r in miss] == [False, False]
        assert len(redis_client.keys("searchrl:search:retriever:*")) == 2
        hit = await eng.search(qs, 4)
        assert [r.cache_hit for r in hit] == [True, True]
        assert [_docs(r) for r in hit] == [_docs(r) for r in miss]
        assert [r.query for r in hit] == qs
        # another top-k or filter is another entry; skip_cache neither reads nor writes
        (other,) = await eng.search([QUESTION], 2)
        assert not other.cache_hit and _docs(other) == _docs(miss[0])[:2]
        (skipped,) = await eng.search([QUESTION], 4, skip_cache=True)
        assert not skipped.cache_hit and _docs(skipped) == _docs(miss[0])
        (filtered,) = await eng.search([QUESTION], 4, Filters(exclude_ids=frozenset({"x"})))
        assert not filtered.cache_hit
        assert len(redis_client.keys("searchrl:search:retriever:*")) == 4
    finally:
        await eng.close()


async def test_grpc_status_codes_and_server_keeps_serving(flat_index) -> None:  # noqa: ANN001
    from searchrl.client.retrieval import RetrievalClient
    from searchrl.retrieval.v1 import retrieval_pb2_grpc
    from searchrl.retriever.server import SERVICE_NAME, RetrievalServicer
    from searchrl.serving.runtime import GrpcServer, ServerConfig, ServiceSpec

    eng = RetrievalEngine(flat_index, EngineLimits())
    await eng.start()
    spec = ServiceSpec(SERVICE_NAME, RetrievalServicer(eng), retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server)
    server = GrpcServer(ServerConfig(grpc_port=0, metrics_port=-1), [spec], "retriever-test")
    await server.start()
    try:
        async with RetrievalClient(f"127.0.0.1:{server.port}") as client:
            for queries, top_k, message in BAD_REQUESTS:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await client.search(queries, top_k)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in err.value.details()
            docs = await client.search([QUESTION, "Mount Everest"], top_k=3, filters={"exclude_ids": ["none"]})
            assert len(docs) == 2 and [len(d) for d in docs] == [3, 3] and docs.cache_hits == [False, False]
            assert docs[0][0].title == "Macau"
            info = await client.index_info()
            assert (info.embedding_model, info.dimension, info.size, info.index_type) == (
                "all-minilm-l6-v2",
                384,
                1000,
                "flat",
            )
            assert info.corpus_checksum == flat_index.manifest.corpus_checksum and not info.on_gpu
            assert info.query_dtype == flat_index.encoder.query_dtype and info.query_dtype in ("float32", "bfloat16")
    finally:
        await server.stop(0)
        await eng.close()
