"""Search-result cache: Redis (:class:`SearchCache`) or in-process LRU (:class:`InProcessCache`), same interface.

Both the RetrievalService and the SimulatedSearchService put this in front of their backend; rollouts repeat many
queries (a GRPO group asks the same question n times), and real search APIs cost money per query (REFERENCE.md,
user complaint 8).

Keys come from :meth:`SearchCache.make_key`: ``"<backend>:<sha256 of a canonical JSON>"`` of everything that changes
the answer (backend, index or model version, query, top-k, document quality, conditioning). The backend prefix keeps
keys readable and feeds the metrics' ``backend`` label; the cache adds its namespace (``searchrl:search:``) in Redis.
Values are opaque bytes (serialized protobuf such as ``retrieval_pb2.QueryResult``); the caller picks the type.

A Redis that is down never fails a search: the call is logged, counted in
``searchrl_search_cache_errors_total{backend}`` and answered as all misses; after a failure the cache skips Redis for
``retry_after_s`` seconds (counted the same way) instead of paying a connection timeout on every search.

Metrics: ``searchrl_search_cache_requests_total{backend,result="hit"|"miss"}``,
``searchrl_search_cache_errors_total{backend}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter as _Tally
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError

from searchrl.serving.config import redis_password

log = logging.getLogger("searchrl.cache")

CACHE_REQUESTS = Counter(
    "searchrl_search_cache_requests_total",
    "Search-cache lookups by backend and result (hit|miss).",
    ["backend", "result"],
)
CACHE_ERRORS = Counter(
    "searchrl_search_cache_errors_total",
    "Search-cache operations that could not use Redis (treated as misses).",
    ["backend"],
)

DEFAULT_NAMESPACE = "searchrl:search"
DEFAULT_TTL_S = 7 * 24 * 3600


def make_key(backend: str, version: str, query: str, top_k: int, quality: str = "", conditioning: str = "") -> str:
    """Cache key of one search: ``"<backend>:<hex sha256>"`` of the canonical JSON of every argument.

    Args:
        backend: which backend answers, e.g. ``"retriever"`` or ``"simulator"`` (``:`` is replaced by ``_``).
        version: index/corpus checksum and embedding model, or the simulator model and prompt version.
        query: the query text, verbatim (no normalisation: different text can retrieve different documents).
        top_k: number of documents asked for.
        quality: document quality (``"useful"``/``"noisy"`` for the simulator; ``""`` for a real retriever).
        conditioning: anything else the answer depends on (the question and gold answer the simulator sees ...).

    Returns:
        The key (without the cache namespace).
    """
    canonical = json.dumps(
        {"b": backend, "v": version, "q": query, "k": int(top_k), "quality": quality, "c": conditioning},
        sort_keys=True,
        ensure_ascii=False,
        separators=(",", ":"),
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{backend.replace(':', '_') or 'unknown'}:{digest}"


def _backend_of(key: str) -> str:
    return key.split(":", 1)[0] if ":" in key else "unknown"


def _count(keys: Sequence[str], values: Sequence[bytes | None]) -> None:
    tally: _Tally[tuple[str, str]] = _Tally()
    for key, value in zip(keys, values, strict=True):
        tally[(_backend_of(key), "miss" if value is None else "hit")] += 1
    for (backend, result), n in tally.items():
        CACHE_REQUESTS.labels(backend, result).inc(n)


class Cache(Protocol):
    """What the search services need from a cache."""

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Mapping[str, bytes]) -> None: ...

    async def close(self) -> None: ...


class SearchCache:
    """Redis-backed search cache (redis-py asyncio client).

    Args:
        redis_url: e.g. ``redis://127.0.0.1:6379/0`` (``rediss://`` for TLS; a password in the URL is never logged).
        password: Redis AUTH password, apart from the URL; ``None`` reads ``SEARCHRL_REDIS_PASSWORD``
            (:func:`searchrl.serving.config.redis_password`).
        ttl_s: time to live of an entry, in seconds (> 0).
        namespace: prefix of every Redis key.
        timeout_s: socket connect/read timeout, in seconds; keep it well under the search deadline.
        retry_after_s: after a Redis failure, skip Redis (answer misses) for this many seconds.

    Raises:
        ValueError: ``ttl_s`` is not positive.
    """

    make_key = staticmethod(make_key)

    def __init__(
        self,
        redis_url: str,
        ttl_s: int = DEFAULT_TTL_S,
        namespace: str = DEFAULT_NAMESPACE,
        *,
        timeout_s: float = 0.5,
        retry_after_s: float = 2.0,
        password: str | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_s = int(ttl_s)
        self.namespace = namespace.rstrip(":") + ":"
        self.retry_after_s = retry_after_s
        # One quick retry (a pooled connection gone stale after a Redis restart), not redis-py's default 10 with
        # backoff: a search must not wait seconds for a cache.
        self._client = aioredis.Redis.from_url(
            redis_url,
            password=redis_password(password),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
            protocol=2,
        )
        self._down_until = 0.0

    def _usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, op: str, keys: Sequence[str], exc: BaseException | None) -> None:
        for backend, n in _Tally(_backend_of(k) for k in keys).items():
            CACHE_ERRORS.labels(backend).inc(n)
        if exc is not None:
            # redis-py messages name host and port, never the password of the URL
            log.warning(
                "search cache %s failed (%s: %s); serving misses for %.1fs",
                op,
                type(exc).__name__,
                exc,
                self.retry_after_s,
            )
            self._down_until = time.monotonic() + self.retry_after_s

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Looks up ``keys`` in one round trip (MGET).

        Args:
            keys: keys from :meth:`make_key`.

        Returns:
            One value (bytes) or ``None`` (miss) per key, in order; all ``None`` when Redis is unreachable.
        """
        if not keys:
            return []
        values: list[bytes | None]
        if not self._usable():
            self._failed("get", keys, None)
            values = [None] * len(keys)
        else:
            try:
                raw: Any = await self._client.mget([self.namespace + k for k in keys])
                values = list(raw)
            except (RedisError, OSError) as exc:
                self._failed("get", keys, exc)
                values = [None] * len(keys)
        _count(keys, values)
        return values

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        """Stores ``items`` with the TTL in one pipelined round trip (SET ... EX); a Redis failure is logged only.

        Args:
            items: key -> serialized value.
        """
        if not items:
            return
        if not self._usable():
            self._failed("set", list(items), None)
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(self.namespace + key, value, ex=self.ttl_s)
            await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("set", list(items), exc)

    async def ping(self) -> bool:
        """True when Redis answers PING."""
        try:
            return bool(await self._client.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        """Closes the connection pool."""
        await self._client.aclose()


class InProcessCache:
    """In-process LRU cache with the :class:`SearchCache` interface, for callers that opt out of Redis.

    Entries live in this process only (not shared between replicas, lost on restart).

    Args:
        ttl_s: time to live of an entry, in seconds (> 0).
        max_entries: capacity; the least recently used entry is evicted first.

    Raises:
        ValueError: non-positive ``ttl_s`` or ``max_entries``.
    """

    make_key = staticmethod(make_key)

    def __init__(self, ttl_s: int = DEFAULT_TTL_S, max_entries: int = 100_000) -> None:
        if ttl_s <= 0 or max_entries <= 0:
            raise ValueError("ttl_s and max_entries must be positive")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Looks up ``keys``; expired entries count as misses and are dropped.

        Returns:
            One value or ``None`` per key, in order.
        """
        now = time.monotonic()
        out: list[bytes | None] = []
        for key in keys:
            hit = self._data.get(key)
            if hit is None or hit[0] <= now:
                if hit is not None:
                    del self._data[key]
                out.append(None)
            else:
                self._data.move_to_end(key)
                out.append(hit[1])
        _count(keys, out)
        return out

    async def set_many(self, items: Mapping[str, bytes]) -> None:
        """Stores ``items`` (most recently used), evicting the least recently used beyond ``max_entries``."""
        expires = time.monotonic() + self.ttl_s
        for key, value in items.items():
            self._data[key] = (expires, bytes(value))
            self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        """Drops every entry."""
        self._data.clear()


def make_cache(
    redis_url: str, ttl_s: int = DEFAULT_TTL_S, *, in_process: bool = False, password: str | None = None
) -> SearchCache | InProcessCache | None:
    """The cache a service should use: Redis when ``redis_url`` is set, else an :class:`InProcessCache` when the
    caller opts in with ``in_process``, else ``None`` (no caching). ``password``: as in :class:`SearchCache`."""
    if redis_url:
        return SearchCache(redis_url, ttl_s, password=password)
    if in_process:
        return InProcessCache(ttl_s)
    return None
