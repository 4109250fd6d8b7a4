"""Search cache on a real Redis (and the in-process LRU): keys, one-round-trip MGET, TTL, metrics, Redis down."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import REGISTRY

from searchrl.retrieval.v1 import retrieval_pb2
from searchrl.rollout.v1 import rollout_pb2
from searchrl.serving.cache import InProcessCache, SearchCache, make_cache, make_key
from searchrl.testing import free_port


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def result_bytes(query: str) -> bytes:
    doc = rollout_pb2.Document(id="d1", title="Paris", text=f"about {query}", score=0.5)
    return retrieval_pb2.QueryResult(documents=[doc]).SerializeToString()


def test_make_key_is_canonical_and_sensitive_to_every_argument() -> None:
    base = ("retriever", "corpus-abc+minilm", "capital of France", 5, "", "")
    key = make_key(*base)
    prefix, digest = key.split(":")
    assert prefix == "retriever" and len(digest) == 64 and int(digest, 16) >= 0
    assert make_key(*base) == key
    # static on both classes, callable on an instance or the class
    assert SearchCache.make_key(*base) == InProcessCache.make_key(*base) == InProcessCache().make_key(*base) == key
    variants = [
        ("simulator", *base[1:]),
        (base[0], "corpus-abd+minilm", *base[2:]),
        (base[0], base[1], "capital of france", *base[3:]),
        (*base[:3], 3, "", ""),
        (*base[:4], "noisy", ""),
        (*base[:5], "question: x | answer: y"),
    ]
    keys = {make_key(*v) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    # the JSON is canonical: no separator ambiguity between fields
    assert make_key("r", "v", "a", 1, "b", "") != make_key("r", "v", "a", 1, "", "b")
    assert make_key("a:b", "v", "q", 1).startswith("a_b:")


async def test_redis_cache_miss_then_hit_with_ttl_and_metrics(redis_url: str, redis_client: Any) -> None:
    cache = SearchCache(redis_url, ttl_s=120)
    keys = [make_key("retriever", "v1", q, 5) for q in ("q1", "q2", "q3")]
    sim_key = make_key("simulator", "m1", "q1", 5, "useful", "Q? A.")
    hits0, misses0 = (
        metric("searchrl_search_cache_requests_total", backend="retriever", result="hit"),
        metric("searchrl_search_cache_requests_total", backend="retriever", result="miss"),
    )
    try:
        assert await cache.get_many(keys) == [None, None, None]
        await cache.set_many({keys[0]: result_bytes("q1"), keys[2]: result_bytes("q3"), sim_key: b"sim"})
        mget_before = redis_client.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
        got = await cache.get_many(keys + [sim_key])
        mget_after = redis_client.info("commandstats")["cmdstat_mget"]["calls"]
        assert mget_after - mget_before == 1  # one MGET for the whole batch
        assert got[1] is None and got[3] == b"sim"
        assert retrieval_pb2.QueryResult.FromString(got[0]).documents[0].text == "about q1"
        assert retrieval_pb2.QueryResult.FromString(got[2]).documents[0].text == "about q3"
        ttl = redis_client.ttl(f"searchrl:search:{keys[0]}")
        assert 0 < ttl <= 120
        assert metric("searchrl_search_cache_requests_total", backend="retriever", result="hit") - hits0 == 2
        assert metric("searchrl_search_cache_requests_total", backend="retriever", result="miss") - misses0 == 4
        assert metric("searchrl_search_cache_requests_total", backend="simulator", result="hit") >= 1
        assert await cache.get_many([]) == []
        assert await cache.ping()
    finally:
        await cache.close()


async def test_redis_entries_expire(redis_url: str) -> None:
    cache = SearchCache(redis_url, ttl_s=1, namespace="searchrl:test-expiry")
    key = make_key("retriever", "v", "short-lived", 1)
    try:
        await cache.set_many({key: b"x"})
        assert await cache.get_many([key]) == [b"x"]
        await asyncio.sleep(1.3)
        assert await cache.get_many([key]) == [None]
    finally:
        await cache.close()


async def test_redis_down_is_a_logged_counted_miss(caplog: pytest.LogCaptureFixture) -> None:
    dead = SearchCache(f"redis://:hunter2@127.0.0.1:{free_port()}/0", ttl_s=60, retry_after_s=0.3)
    key = make_key("retriever", "v", "q", 5)
    errors0 = metric("searchrl_search_cache_errors_total", backend="retriever")
    misses0 = metric("searchrl_search_cache_requests_total", backend="retriever", result="miss")
    try:
        start = time.monotonic()
        assert await dead.get_many([key, key]) == [None, None]
        await dead.set_many({key: b"v"})  # no exception
        assert await dead.get_many([key]) == [None]  # inside the cool-down: Redis is not even tried
        assert time.monotonic() - start < 5  # no retry storm with long backoffs (redis-py's default is 10 retries)
        await asyncio.sleep(0.4)
        assert await dead.get_many([key]) == [None]  # tried again after the cool-down, still down
        assert not await dead.ping()
    finally:
        await dead.close()
    assert metric("searchrl_search_cache_errors_total", backend="retriever") - errors0 == 5
    assert metric("searchrl_search_cache_requests_total", backend="retriever", result="miss") - misses0 == 4
    warnings = [r for r in caplog.records if r.name == "searchrl.cache"]
    assert warnings and all("hunter2" not in r.getMessage() for r in warnings)


async def test_in_process_cache_lru_ttl_and_metrics() -> None:
    cache = InProcessCache(ttl_s=60, max_entries=2)
    a, b, c = (make_key("simulator", "m", q, 5) for q in "abc")
    hits0 = metric("searchrl_search_cache_requests_total", backend="simulator", result="hit")
    await cache.set_many({a: b"A", b: b"B"})
    assert await cache.get_many([a]) == [b"A"]  # a is now most recently used
    await cache.set_many({c: b"C"})  # evicts b, the least recently used
    assert await cache.get_many([a, b, c]) == [b"A", None, b"C"]
    assert len(cache) == 2
    assert metric("searchrl_search_cache_requests_total", backend="simulator", result="hit") - hits0 == 3
    short = InProcessCache(ttl_s=1)
    await short.set_many({a: b"A"})
    await asyncio.sleep(1.1)
    assert await short.get_many([a]) == [None] and len(short) == 0
    await cache.close()
    assert len(cache) == 0


def test_make_cache_choice(redis_url: str) -> None:
    assert isinstance(make_cache(redis_url, 10), SearchCache)
    assert isinstance(make_cache("", 10, in_process=True), InProcessCache)
    assert make_cache("", 10) is None
    with pytest.raises(ValueError):
        SearchCache(redis_url, ttl_s=0)
