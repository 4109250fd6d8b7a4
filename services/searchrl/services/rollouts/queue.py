"""The hand-off between rollout workers and the trainer: two Redis Streams with consumer groups.

* **Tasks** (``<prefix>-tasks``, consumer group ``workers``): the trainer adds one
  :class:`~searchrl.rollout.v1.rollout_pb2.RolloutTask` per GRPO group it wants (a question and the group size).
  Workers ``XREADGROUP`` them; a task read by a worker that died stays pending and another worker takes it over
  after ``reclaim_idle_ms`` (``XAUTOCLAIM``), so a task is never lost with its worker.
* **Groups** (``<prefix>-groups``, consumer group ``trainer``): a worker publishes the finished, scored
  :class:`~searchrl.rollout.v1.rollout_pb2.RolloutGroup` and acknowledges its task **in one MULTI/EXEC
  transaction**, so a task yields exactly one group even when a worker is killed at any instant: before the
  transaction nothing is visible and the task is re-claimed; after it the group is in the stream and the task is done.
  The trainer reads groups, acknowledges them only once the update that used them is in a checkpoint (see
  :mod:`searchrl.trainer.local.stream`), and re-claims what a dead trainer had read.
* **Policy version** (``<prefix>-policy-version``): the version the trainer last loaded into the PolicyService, for
  workers and dashboards.

Durability: Redis keeps what it acknowledged across a restart only with persistence on (the chart turns on AOF with
``appendfsync everysec``: at most the last second of writes is lost on a crash of the Redis host; ``always``: none).
With persistence off, a Redis restart loses every task and group in flight; the trainer then re-submits tasks for
what it has not trained (nothing is trained twice, some questions are sampled again).

Every method raises :class:`searchrl.errors.Unavailable` when Redis cannot be reached.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from google.protobuf.message import DecodeError, Message
from redis.exceptions import ResponseError

from searchrl.rollout.v1 import rollout_pb2
from searchrl.services.rollouts.store import as_str, redis_unavailable
from searchrl.serving.config import redis_password

log = logging.getLogger("searchrl.rollouts.queue")

DEFAULT_PREFIX = "searchrl:rollout"
WORKERS_GROUP = "workers"
TRAINER_GROUP = "trainer"

M = TypeVar("M", bound=Message)

# KEYS: task stream, group stream. ARGV: workers group, task entry id, group blob, task id, policy version.
# The group is written only when this call is the one that acknowledges the task.
_PUBLISH = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return false end
return redis.call('XADD', KEYS[2], '*', 'm', ARGV[3], 'task_id', ARGV[4], 'policy_version', ARGV[5])
"""


@dataclass(frozen=True)
class QueueStats:
    """Depth of the hand-off, in entries.

    Attributes:
        tasks_waiting: tasks no worker has read yet (the workers' stream lag).
        tasks_running: tasks a worker read and has not finished (pending in ``workers``).
        groups_waiting: finished groups the trainer has not read yet (the trainer's stream lag).
        groups_unacked: groups the trainer read and has not acknowledged (used since its last checkpoint).
    """

    tasks_waiting: int
    tasks_running: int
    groups_waiting: int
    groups_unacked: int


def version_step(version: str) -> int | None:
    """The trainer step of a policy version ``"step-<k>"`` or ``"step-<k>.<token>"`` (``None`` for any other name)."""
    head = version.split(".", 1)[0]
    if head.startswith("step-") and head[5:].isdigit():
        return int(head[5:])
    return None


class RolloutQueue:
    """Tasks to rollout workers and finished groups back to the trainer (see the module docstring).

    Args:
        redis_url: e.g. ``redis://127.0.0.1:6379/0``.
        prefix: key prefix of the two streams and the version key (one prefix per training run).
        password: Redis AUTH password apart from the URL; ``None`` reads ``SEARCHRL_REDIS_PASSWORD``.
        connect_timeout_s: socket connect timeout, in seconds.
    """

    def __init__(
        self,
        redis_url: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        password: str | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self.prefix = prefix
        self.task_stream = f"{prefix}-tasks"
        self.group_stream = f"{prefix}-groups"
        self.version_key = f"{prefix}-policy-version"
        self.dead_letter_stream = f"{prefix}:dead"
        self._client = aioredis.Redis.from_url(
            redis_url,
            password=redis_password(password),
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=None,  # XREADGROUP BLOCK may wait longer than any fixed read timeout
            protocol=2,
        )
        self._publish = self._client.register_script(_PUBLISH)

    async def __aenter__(self) -> RolloutQueue:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection pool."""
        await self._client.aclose()

    async def ensure(self) -> None:
        """Creates both streams and their consumer groups unless they exist (idempotent)."""
        for stream, group in ((self.task_stream, WORKERS_GROUP), (self.group_stream, TRAINER_GROUP)):
            with redis_unavailable("XGROUP CREATE"):
                try:
                    await self._client.xgroup_create(stream, group, id="0", mkstream=True)
                except ResponseError as exc:
                    if "BUSYGROUP" not in str(exc):
                        raise

    # ------------------------------------------------------------------------------------------ decoding
    async def _decode(self, stream: str, group: str, entries: Sequence[Any], cls: type[M]) -> list[tuple[str, M]]:
        """Decodes ``(id, fields)`` entries; an entry that does not decode goes to the dead-letter stream and is
        acknowledged, so it cannot wedge a consumer."""
        out: list[tuple[str, M]] = []
        bad: list[str] = []
        for raw_id, fields in entries:
            entry_id = as_str(raw_id)
            blob = fields.get(b"m") if fields else None
            try:
                if blob is None:
                    raise DecodeError("no 'm' field (entry deleted or not written by searchrl)")
                out.append((entry_id, cls.FromString(blob)))
            except DecodeError as exc:
                log.error(
                    "%s entry %s does not decode (%s); moved to %s", stream, entry_id, exc, self.dead_letter_stream
                )
                bad.append(entry_id)
                dead = {**(fields or {}), b"source": f"{stream}/{entry_id}".encode(), b"error": str(exc).encode()}
                with redis_unavailable("XADD dead letter"):
                    await self._client.xadd(self.dead_letter_stream, dead)
        if bad:
            with redis_unavailable("XACK"):
                await self._client.xack(stream, group, *bad)
        return out

    async def _read(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int | None, cls: type[M]
    ) -> list[tuple[str, M]]:
        for attempt in (0, 1):
            with redis_unavailable("XREADGROUP"):
                try:
                    reply: Any = await self._client.xreadgroup(
                        group, consumer, {stream: ">"}, count=count, block=block_ms
                    )
                    break
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc) or attempt:
                        raise
            await self.ensure()
        if not reply:
            return []
        return await self._decode(stream, group, reply[0][1], cls)

    async def _claim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int, cls: type[M]
    ) -> list[tuple[str, M]]:
        out: list[tuple[str, M]] = []
        cursor = "0-0"
        while len(out) < count:
            with redis_unavailable("XAUTOCLAIM"):
                try:
                    reply = await self._client.xautoclaim(
                        stream, group, consumer, min_idle_time=min_idle_ms, start_id=cursor, count=count - len(out)
                    )
                except ResponseError as exc:
                    if "NOGROUP" in str(exc):
                        return out
                    raise
            cursor = as_str(reply[0])
            out.extend(await self._decode(stream, group, [e for e in reply[1] if e is not None], cls))
            if cursor == "0-0":
                break
        return out

    # ------------------------------------------------------------------------------------------ trainer side
    async def submit(
        self, tasks: Sequence[rollout_pb2.RolloutTask], *, counter: tuple[str, int] | None = None
    ) -> list[str]:
        """Adds tasks for the workers in one MULTI/EXEC transaction.

        Args:
            tasks: the tasks, in order.
            counter: ``(key, value)`` to set in the same transaction (the trainer's count of batches fed, so that a
                restarted trainer knows exactly which tasks are already in the stream; read it with :meth:`counter`).

        Returns:
            Their stream entry ids, in order.
        """
        if not tasks:
            return []
        pipe = self._client.pipeline(transaction=True)
        for t in tasks:
            pipe.xadd(self.task_stream, {"m": t.SerializeToString(), "task_id": t.task_id})
        if counter is not None:
            pipe.set(counter[0], counter[1])
        with redis_unavailable(f"XADD to {self.task_stream!r}"):
            replies = await pipe.execute()
        return [as_str(i) for i in replies[: len(tasks)]]

    async def counter(self, key: str) -> int:
        """An integer key set by :meth:`submit` (0 when unset)."""
        with redis_unavailable("GET"):
            value = await self._client.get(key)
        return int(value or 0)

    async def read_groups(
        self, consumer: str, count: int, block_ms: int | None = None
    ) -> list[tuple[str, rollout_pb2.RolloutGroup]]:
        """Reads up to ``count`` groups no trainer has read (XREADGROUP ``>``); they stay pending until
        :meth:`ack_groups`.

        Args:
            consumer: the trainer's consumer name.
            count: most groups to return.
            block_ms: wait up to this long for one (``None``: do not wait).
        """
        return await self._read(self.group_stream, TRAINER_GROUP, consumer, count, block_ms, rollout_pb2.RolloutGroup)

    async def claim_groups(
        self, consumer: str, min_idle_ms: int = 0, count: int = 1000
    ) -> list[tuple[str, rollout_pb2.RolloutGroup]]:
        """Takes over groups read but not acknowledged by any trainer consumer (a trainer that died, or this one
        before a restart), oldest first (XAUTOCLAIM)."""
        return await self._claim(
            self.group_stream, TRAINER_GROUP, consumer, min_idle_ms, count, rollout_pb2.RolloutGroup
        )

    async def ack_groups(self, ids: Sequence[str]) -> int:
        """Acknowledges groups (their update is in a checkpoint, or they were skipped); returns how many were pending."""
        if not ids:
            return 0
        with redis_unavailable("XACK"):
            return int(await self._client.xack(self.group_stream, TRAINER_GROUP, *ids))

    async def set_policy_version(self, version: str) -> None:
        """Records the version the PolicyService now serves."""
        with redis_unavailable("SET"):
            await self._client.set(self.version_key, version)

    async def policy_version(self) -> str:
        """The version last recorded by :meth:`set_policy_version` (``""`` when none)."""
        with redis_unavailable("GET"):
            value = await self._client.get(self.version_key)
        return as_str(value) if value is not None else ""

    async def stats(self) -> QueueStats:
        """Backlog and in-flight counts of both streams (XINFO GROUPS; Redis >= 7 for the lag)."""
        found: dict[str, tuple[int, int]] = {}
        for stream, group in ((self.task_stream, WORKERS_GROUP), (self.group_stream, TRAINER_GROUP)):
            with redis_unavailable("XINFO GROUPS"):
                try:
                    infos = await self._client.xinfo_groups(stream)
                except ResponseError:
                    infos = []
            info = next((i for i in infos if as_str(i.get("name", b"")) == group), None)
            if info is None:
                found[stream] = (0, 0)
                continue
            lag = info.get("lag")
            if lag is None:  # Redis cannot tell (entries deleted from the middle): count from the stream length
                with redis_unavailable("XLEN"):
                    lag = max(0, int(await self._client.xlen(stream)) - int(info.get("entries-read") or 0))
            found[stream] = (int(lag), int(info.get("pending", 0)))
        (tw, tr), (gw, gu) = found[self.task_stream], found[self.group_stream]
        return QueueStats(tasks_waiting=tw, tasks_running=tr, groups_waiting=gw, groups_unacked=gu)

    # ------------------------------------------------------------------------------------------ worker side
    async def take_task(
        self, consumer: str, *, block_ms: int | None = 1000, reclaim_idle_ms: int = 60_000
    ) -> tuple[str, rollout_pb2.RolloutTask] | None:
        """The next task for this worker: first one a dead worker left (read, unacknowledged, idle at least
        ``reclaim_idle_ms``), else a new one, waiting up to ``block_ms``.

        Returns:
            ``(entry_id, task)``, or ``None`` when none came within ``block_ms``.
        """
        stale = await self._claim(
            self.task_stream, WORKERS_GROUP, consumer, reclaim_idle_ms, 1, rollout_pb2.RolloutTask
        )
        if stale:
            log.warning("took over task %s from a worker that did not finish it", stale[0][1].task_id)
            return stale[0]
        got = await self._read(self.task_stream, WORKERS_GROUP, consumer, 1, block_ms, rollout_pb2.RolloutTask)
        return got[0] if got else None

    async def publish_group(self, task_entry_id: str, group: rollout_pb2.RolloutGroup) -> str | None:
        """Publishes a finished group and acknowledges its task atomically (one Lua script: Redis runs it as a
        transaction, and AOF replays it whole or not at all).

        Args:
            task_entry_id: the task's entry id from :meth:`take_task`.
            group: the scored group.

        Returns:
            The group's entry id, or ``None`` when the task was no longer pending (a worker that took it over from
            this one, thought dead, finished first): nothing is written then, so a task never yields two groups.
        """
        fields = [group.SerializeToString(), group.task.task_id, group.policy_version]
        with redis_unavailable("EVALSHA publish"):
            entry_id = await self._publish(
                keys=[self.task_stream, self.group_stream], args=[WORKERS_GROUP, task_entry_id, *fields]
            )
        if entry_id is None:
            log.warning("task %s was already finished by another worker; dropped this copy", group.task.task_id)
            return None
        return as_str(entry_id)
