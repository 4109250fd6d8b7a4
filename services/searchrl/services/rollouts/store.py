"""The rollout store: finished trajectories on a Redis Stream, read by consumer groups.

Producers (the PolicyService, the local trainer, verl's agent loop) ``XADD`` one entry per
:class:`~searchrl.rollout.v1.rollout_pb2.Trajectory`: field ``t`` holds the serialized proto, and a few small fields
(``id``, ``question_id``, ``reward``, ``policy_version``, ``finish_reason``, ``group_index``) can be read without
decoding it.

Public consumer API (for trainers that learn from the stream; kept stable): :meth:`RolloutStore.ensure_group`,
:meth:`~RolloutStore.read`, :meth:`~RolloutStore.ack`, :meth:`~RolloutStore.claim_stale` and
:meth:`~RolloutStore.pending_count`. Consumers in a group (default ``trainer``) ``XREADGROUP`` new entries and
``XACK`` them once used. An entry read but never acknowledged stays in the group's pending list, so when a consumer
dies between read and ack another one takes it over with ``XAUTOCLAIM`` (:meth:`RolloutStore.claim_stale`): no
trajectory is lost. Entries that do not decode are moved to ``<stream>:dead`` and acknowledged, so one bad entry cannot
wedge a consumer. Reading without a group: :meth:`~RolloutStore.iter_all`, :meth:`~RolloutStore.last`,
:meth:`~RolloutStore.follow` (what :mod:`.export` and ``searchrl rollouts`` (:mod:`.cli`) use).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError
from redis.exceptions import RedisError, ResponseError

from searchrl.errors import Unavailable
from searchrl.rollout.v1 import rollout_pb2
from searchrl.serving.config import redis_password

log = logging.getLogger("searchrl.rollouts")

DEFAULT_STREAM = "searchrl:rollouts"
DEFAULT_GROUP = "trainer"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

Entry = tuple[str, rollout_pb2.Trajectory]


def as_str(value: Any) -> str:
    """A Redis reply field (``bytes`` from redis-py without ``decode_responses``) as ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def redis_unavailable(command: str) -> Iterator[None]:
    """Turns a Redis or socket error of ``command`` into :class:`~searchrl.errors.Unavailable`."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise Unavailable(f"rollout store: {command} failed: {exc}") from exc


def num_searches(trajectory: rollout_pb2.Trajectory) -> int:
    """Number of turns of ``trajectory`` that made a search."""
    return sum(1 for t in trajectory.turns if t.HasField("search"))


class RolloutStore:
    """Trajectories on a Redis Stream with consumer groups (redis-py asyncio client).

    Args:
        redis_url: e.g. ``redis://127.0.0.1:6379/0``.
        stream: the stream key.
        group: the consumer group that :meth:`read`, :meth:`ack`, :meth:`claim_stale` and :meth:`pending_count` use.
        maxlen: cap the stream at this many entries (``XADD MAXLEN``); ``None`` keeps everything. Trimmed entries that
            were pending are dropped from the pending list by Redis.
        trim_approximate: trim with ``MAXLEN ~`` (cheap; Redis keeps somewhat more than ``maxlen``) rather than
            exactly.
        connect_timeout_s: socket connect timeout, in seconds.
        password: Redis AUTH password, apart from the URL; ``None`` reads ``SEARCHRL_REDIS_PASSWORD``
            (:func:`searchrl.serving.config.redis_password`).

    Every method raises :class:`searchrl.errors.Unavailable` when Redis cannot be reached.
    """

    def __init__(
        self,
        redis_url: str,
        stream: str = DEFAULT_STREAM,
        group: str = DEFAULT_GROUP,
        maxlen: int | None = None,
        *,
        trim_approximate: bool = True,
        connect_timeout_s: float = 5.0,
        password: str | None = None,
    ) -> None:
        if maxlen is not None and maxlen <= 0:
            raise ValueError(f"maxlen must be positive or None, got {maxlen}")
        self.stream = stream
        self.group = group
        self.maxlen = maxlen
        self._approx = trim_approximate and maxlen is not None
        self.dead_letter_stream = f"{stream}:dead"
        # no read timeout: XREADGROUP/XREAD BLOCK may legitimately wait longer than any fixed socket timeout
        # RESP2 pinned: the reply shapes parsed below (lists of [stream, [(id, fields)]]) do not depend on redis-py's
        # default protocol.
        self._client = aioredis.Redis.from_url(
            redis_url,
            password=redis_password(password),
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=None,
            protocol=2,
        )

    async def __aenter__(self) -> RolloutStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection pool."""
        await self._client.aclose()

    @staticmethod
    def _fields(trajectory: rollout_pb2.Trajectory) -> dict[Any, Any]:
        return {
            "t": trajectory.SerializeToString(),
            "id": trajectory.id,
            "question_id": trajectory.question_id,
            "reward": repr(float(trajectory.reward)),
            "policy_version": trajectory.policy_version,
            "finish_reason": trajectory.finish_reason,
            "group_index": str(trajectory.group_index),
        }

    async def add(self, trajectory: rollout_pb2.Trajectory) -> str:
        """Appends one trajectory (XADD).

        Returns:
            The stream entry id, e.g. ``"1700000000000-0"``.

        Raises:
            Unavailable: Redis is down.
        """
        with redis_unavailable(f"XADD to {self.stream!r}"):
            entry_id = await self._client.xadd(
                self.stream, self._fields(trajectory), maxlen=self.maxlen, approximate=self._approx
            )
        return as_str(entry_id)

    async def add_many(
        self, trajectories: Iterable[rollout_pb2.Trajectory], *, retry_s: float = 0.0, dedupe: bool = False
    ) -> list[str]:
        """Appends several trajectories in one round trip, atomically (``MULTI``/``EXEC``: all of them or none).

        Args:
            trajectories: the batch; each needs a unique ``id`` when ``retry_s`` > 0.
            retry_s: keep retrying for this long while Redis is down (exponential backoff with jitter, 0.2 s to
                5 s). Before each retry the tail of the stream is searched for the batch's last trajectory id, so a
                batch whose ``EXEC`` landed but whose reply was lost is not written twice.
            dedupe: look for the batch in the stream's tail first too, and write nothing when it is there: with
                deterministic trajectory ids, a step that a resumed trainer runs again is published once.

        Returns:
            The entry ids, in order.

        Raises:
            Unavailable: Redis is down (still, after ``retry_s``).
        """
        batch = list(trajectories)
        if not batch:
            return []
        deadline = time.monotonic() + retry_s
        delay = 0.2
        ids = [t.id for t in batch]
        look_first = dedupe  # after a failed attempt, always: its EXEC may have landed with the reply lost
        while True:
            try:
                if look_first and (landed := await self._find_tail_ids(ids, tail=10 * len(batch) + 100)):
                    return landed
                look_first = True
                pipe = self._client.pipeline(transaction=True)
                for trajectory in batch:
                    pipe.xadd(self.stream, self._fields(trajectory), maxlen=self.maxlen, approximate=self._approx)
                with redis_unavailable(f"XADD to {self.stream!r}"):
                    return [as_str(i) for i in await pipe.execute()]
            except Unavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("%s; retrying the batch of %d for %.0f s more", exc, len(batch),
                            deadline - time.monotonic())  # fmt: skip
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 5.0)

    async def _find_tail_ids(self, trajectory_ids: list[str], tail: int) -> list[str] | None:
        """The entry ids of ``trajectory_ids`` when the last of them is among the stream's last ``tail`` entries
        (an atomic batch is there whole or not at all), else None.

        Raises:
            Unavailable: Redis is down.
        """
        with redis_unavailable(f"XREVRANGE {self.stream!r}"):
            entries = await self._client.xrevrange(self.stream, count=tail)
        by_id = {as_str(fields.get(b"id", b"")): as_str(entry_id) for entry_id, fields in entries}
        if trajectory_ids[-1] not in by_id:
            return None
        return [by_id.get(t, "") for t in trajectory_ids]

    async def ensure_group(self, start_id: str = "0") -> bool:
        """Creates the consumer group (and the stream) unless it exists.

        Args:
            start_id: where a new group starts: ``"0"`` (every entry already in the stream) or ``"$"`` (only new ones).

        Returns:
            True when the group was created, False when it already existed.

        Raises:
            Unavailable: Redis is down.
        """
        with redis_unavailable("XGROUP CREATE"):
            try:
                await self._client.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" in str(exc):
                    return False
                raise
        return True

    async def _decode_all(self, entries: Sequence[Any], ack_bad: bool) -> list[Entry]:
        out: list[Entry] = []
        bad: list[str] = []
        for raw_id, fields in entries:
            entry_id = as_str(raw_id)
            if fields is None:  # deleted while pending (Redis < 7 reports these as nil)
                bad.append(entry_id)
                continue
            blob = fields.get(b"t")
            try:
                if blob is None:
                    raise DecodeError("no 't' field")
                out.append((entry_id, rollout_pb2.Trajectory.FromString(blob)))
            except DecodeError as exc:
                log.error(
                    "rollout entry %s of %s does not decode (%s); moved to %s",
                    entry_id,
                    self.stream,
                    exc,
                    self.dead_letter_stream,
                )
                bad.append(entry_id)
                if ack_bad:
                    dead = dict(fields)
                    dead[b"source_id"] = entry_id.encode()
                    dead[b"error"] = str(exc).encode()
                    with redis_unavailable(f"XADD to {self.dead_letter_stream!r}"):
                        await self._client.xadd(self.dead_letter_stream, dead)
        if ack_bad and bad:
            with redis_unavailable("XACK"):
                await self._client.xack(self.stream, self.group, *bad)
        return out

    async def read(self, consumer: str, count: int = 16, block_ms: int | None = None) -> list[Entry]:
        """Reads up to ``count`` entries never delivered to the group (XREADGROUP ``>``); they stay pending until acked.

        Creates the group first when it does not exist.

        Args:
            consumer: this consumer's name (unique per process, e.g. ``trainer-<hostname>-<pid>``).
            count: most entries to return.
            block_ms: wait up to this many milliseconds for new entries (``None``: do not wait; ``0``: forever).

        Returns:
            ``(entry_id, trajectory)`` pairs, oldest first.

        Raises:
            Unavailable: Redis is down.
        """
        for attempt in (0, 1):
            with redis_unavailable("XREADGROUP"):
                try:
                    reply: Any = await self._client.xreadgroup(
                        self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
                    )
                    break
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc) or attempt:
                        raise
            await self.ensure_group()
        if not reply:
            return []
        return await self._decode_all(reply[0][1], ack_bad=True)

    async def ack(self, ids: Sequence[str]) -> int:
        """Acknowledges entries (XACK): they leave the group's pending list.

        Returns:
            How many were pending and are now acknowledged.

        Raises:
            Unavailable: Redis is down.
        """
        if not ids:
            return 0
        with redis_unavailable("XACK"):
            return int(await self._client.xack(self.stream, self.group, *ids))

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int = 16) -> list[Entry]:
        """Takes over entries another consumer read but did not ack within ``min_idle_ms`` (XAUTOCLAIM).

        Call it periodically (e.g. before each :meth:`read`) with ``min_idle_ms`` well above the time a consumer
        needs to process and ack an entry.

        Args:
            consumer: the consumer that takes the entries over.
            min_idle_ms: only entries idle (delivered, not acked) at least this long, in milliseconds.
            count: most entries to claim.

        Returns:
            ``(entry_id, trajectory)`` pairs now pending for ``consumer``.

        Raises:
            Unavailable: Redis is down.
        """
        out: list[Entry] = []
        cursor = "0-0"
        while len(out) < count:
            with redis_unavailable("XAUTOCLAIM"):
                try:
                    reply = await self._client.xautoclaim(
                        self.stream,
                        self.group,
                        consumer,
                        min_idle_time=min_idle_ms,
                        start_id=cursor,
                        count=count - len(out),
                    )
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        return out
                    raise
            cursor = as_str(reply[0])
            out.extend(await self._decode_all(reply[1], ack_bad=True))
            if cursor == "0-0":
                break
        return out

    async def pending_count(self) -> int:
        """Entries delivered to the group and not yet acknowledged (0 when the group does not exist)."""
        with redis_unavailable("XPENDING"):
            try:
                summary = await self._client.xpending(self.stream, self.group)
            except ResponseError as exc:
                if "NOGROUP" in str(exc):
                    return 0
                raise
        return int(summary["pending"])

    async def length(self) -> int:
        """Entries in the stream (XLEN)."""
        with redis_unavailable("XLEN"):
            return int(await self._client.xlen(self.stream))

    async def groups(self) -> list[dict[str, Any]]:
        """Consumer groups of the stream with their consumers, pending counts and last delivered ids (XINFO GROUPS)."""
        with redis_unavailable("XINFO GROUPS"):
            try:
                infos = await self._client.xinfo_groups(self.stream)
            except ResponseError:  # no such stream
                return []
        return [{as_str(k): (as_str(v) if isinstance(v, bytes) else v) for k, v in g.items()} for g in infos]

    async def iter_all(self, start: str = "-", end: str = "+", batch: int = 500) -> AsyncIterator[Entry]:
        """Every entry from ``start`` to ``end`` in order (XRANGE, paged), without touching any consumer group.

        Undecodable entries are logged and skipped.

        Args:
            start: first entry id (inclusive; ``"-"`` for the oldest).
            end: last entry id (inclusive; ``"+"`` for the newest).
            batch: entries per round trip.

        Raises:
            Unavailable: Redis is down.
        """
        lo = start
        while True:
            with redis_unavailable("XRANGE"):
                page = await self._client.xrange(self.stream, min=lo, max=end, count=batch)
            if not page:
                return
            for item in await self._decode_all(page, ack_bad=False):
                yield item
            if len(page) < batch:
                return
            lo = "(" + as_str(page[-1][0])

    def __aiter__(self) -> AsyncIterator[Entry]:
        return self.iter_all()

    async def last(self, n: int) -> list[Entry]:
        """The newest ``n`` entries, oldest first (XREVRANGE)."""
        with redis_unavailable("XREVRANGE"):
            page: Any = await self._client.xrevrange(self.stream, count=n)
        return await self._decode_all(list(reversed(page)), ack_bad=False)

    async def follow(self, after_id: str = "$", block_ms: int = 1000, count: int = 100) -> AsyncIterator[Entry]:
        """Yields entries added after ``after_id`` as they arrive (XREAD BLOCK), forever; no consumer group involved.

        Args:
            after_id: last id already seen (``"$"``: only entries added from now on).
            block_ms: how long each XREAD waits, in milliseconds.
            count: most entries per round trip.
        """
        last_id = after_id
        if last_id == "$":  # pin "$" to a concrete id so nothing added between two XREADs is missed
            newest: Any = await self._client.xrevrange(self.stream, count=1)
            last_id = as_str(newest[0][0]) if newest else "0-0"
        while True:
            with redis_unavailable("XREAD"):
                reply: Any = await self._client.xread({self.stream: last_id}, count=count, block=block_ms)
            if not reply:
                continue
            entries = reply[0][1]
            last_id = as_str(entries[-1][0])
            for item in await self._decode_all(entries, ack_bad=False):
                yield item
