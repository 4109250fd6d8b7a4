"""The rollout store: finished trajectories on a Redis Stream, read by consumer groups (``searchrl rollouts``).

Producers (the PolicyService, the local trainer, verl's agent loop) ``XADD`` one entry per
:class:`~searchrl.rollout.v1.rollout_pb2.Trajectory`: field ``t`` holds the serialized proto, and a few small fields
(``id``, ``question_id``, ``reward``, ``policy_version``, ``finish_reason``, ``group_index``) can be read without
decoding it. Consumers in a group (default ``trainer``) ``XREADGROUP`` new entries and ``XACK`` them once used. An entry
read but never acknowledged stays in the group's pending list, so when a consumer dies between read and ack another one
takes it over with ``XAUTOCLAIM`` (:meth:`RolloutStore.claim_stale`): no trajectory is lost. Entries that do not decode
are moved to ``<stream>:dead`` and acknowledged, so one bad entry cannot wedge a consumer.

CLI (``searchrl rollouts``):

    searchrl rollouts tail [-n 20] [--follow] [--redis-url URL] [--stream NAME]
    searchrl rollouts export --format jsonl|parquet --out FILE [--limit N]
    searchrl rollouts info
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.json_format import MessageToDict
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


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        try:
            entry_id = await self._client.xadd(
                self.stream, self._fields(trajectory), maxlen=self.maxlen, approximate=self._approx
            )
        except (RedisError, OSError) as exc:
            raise Unavailable(f"rollout store: XADD to {self.stream!r} failed: {exc}") from exc
        return _s(entry_id)

    async def add_many(self, trajectories: Iterable[rollout_pb2.Trajectory]) -> list[str]:
        """Appends several trajectories in one pipelined round trip.

        Returns:
            The entry ids, in order.

        Raises:
            Unavailable: Redis is down.
        """
        pipe = self._client.pipeline(transaction=False)
        n = 0
        for trajectory in trajectories:
            pipe.xadd(self.stream, self._fields(trajectory), maxlen=self.maxlen, approximate=self._approx)
            n += 1
        if not n:
            return []
        try:
            ids = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise Unavailable(f"rollout store: XADD to {self.stream!r} failed: {exc}") from exc
        return [_s(i) for i in ids]

    async def ensure_group(self, start_id: str = "0") -> bool:
        """Creates the consumer group (and the stream) unless it exists.

        Args:
            start_id: where a new group starts: ``"0"`` (every entry already in the stream) or ``"$"`` (only new ones).

        Returns:
            True when the group was created, False when it already existed.

        Raises:
            Unavailable: Redis is down.
        """
        try:
            await self._client.xgroup_create(self.stream, self.group, id=start_id, mkstream=True)
            return True
        except ResponseError as exc:
            if "BUSYGROUP" in str(exc):
                return False
            raise Unavailable(f"rollout store: XGROUP CREATE failed: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise Unavailable(f"rollout store: XGROUP CREATE failed: {exc}") from exc

    async def _decode_all(self, entries: Sequence[Any], ack_bad: bool) -> list[Entry]:
        out: list[Entry] = []
        bad: list[str] = []
        for raw_id, fields in entries:
            entry_id = _s(raw_id)
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
                    try:
                        await self._client.xadd(self.dead_letter_stream, dead)
                    except (RedisError, OSError) as err:
                        raise Unavailable(f"rollout store: XADD to {self.dead_letter_stream!r} failed: {err}") from err
        if ack_bad and bad:
            try:
                await self._client.xack(self.stream, self.group, *bad)
            except (RedisError, OSError) as err:
                raise Unavailable(f"rollout store: XACK failed: {err}") from err
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
            try:
                reply: Any = await self._client.xreadgroup(
                    self.group, consumer, {self.stream: ">"}, count=count, block=block_ms
                )
                break
            except ResponseError as exc:
                if "NOGROUP" in str(exc) and attempt == 0:
                    await self.ensure_group()
                    continue
                raise Unavailable(f"rollout store: XREADGROUP failed: {exc}") from exc
            except (RedisError, OSError) as exc:
                raise Unavailable(f"rollout store: XREADGROUP failed: {exc}") from exc
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
        try:
            return int(await self._client.xack(self.stream, self.group, *ids))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"rollout store: XACK failed: {exc}") from exc

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
        try:
            while len(out) < count:
                reply = await self._client.xautoclaim(
                    self.stream,
                    self.group,
                    consumer,
                    min_idle_time=min_idle_ms,
                    start_id=cursor,
                    count=count - len(out),
                )
                cursor = _s(reply[0])
                out.extend(await self._decode_all(reply[1], ack_bad=True))
                if cursor == "0-0":
                    break
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return out
            raise Unavailable(f"rollout store: XAUTOCLAIM failed: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise Unavailable(f"rollout store: XAUTOCLAIM failed: {exc}") from exc
        return out

    async def pending_count(self) -> int:
        """Entries delivered to the group and not yet acknowledged (0 when the group does not exist)."""
        try:
            summary = await self._client.xpending(self.stream, self.group)
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise Unavailable(f"rollout store: XPENDING failed: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise Unavailable(f"rollout store: XPENDING failed: {exc}") from exc
        return int(summary["pending"])

    async def length(self) -> int:
        """Entries in the stream (XLEN)."""
        try:
            return int(await self._client.xlen(self.stream))
        except (RedisError, OSError) as exc:
            raise Unavailable(f"rollout store: XLEN failed: {exc}") from exc

    async def groups(self) -> list[dict[str, Any]]:
        """Consumer groups of the stream with their consumers, pending counts and last delivered ids (XINFO GROUPS)."""
        try:
            infos = await self._client.xinfo_groups(self.stream)
        except ResponseError:
            return []
        except (RedisError, OSError) as exc:
            raise Unavailable(f"rollout store: XINFO GROUPS failed: {exc}") from exc
        return [{_s(k): (_s(v) if isinstance(v, bytes) else v) for k, v in g.items()} for g in infos]

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
            try:
                page = await self._client.xrange(self.stream, min=lo, max=end, count=batch)
            except (RedisError, OSError) as exc:
                raise Unavailable(f"rollout store: XRANGE failed: {exc}") from exc
            if not page:
                return
            for item in await self._decode_all(page, ack_bad=False):
                yield item
            if len(page) < batch:
                return
            lo = "(" + _s(page[-1][0])

    def __aiter__(self) -> AsyncIterator[Entry]:
        return self.iter_all()

    async def last(self, n: int) -> list[Entry]:
        """The newest ``n`` entries, oldest first (XREVRANGE)."""
        try:
            page: Any = await self._client.xrevrange(self.stream, count=n)
        except (RedisError, OSError) as exc:
            raise Unavailable(f"rollout store: XREVRANGE failed: {exc}") from exc
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
            last_id = _s(newest[0][0]) if newest else "0-0"
        while True:
            try:
                reply: Any = await self._client.xread({self.stream: last_id}, count=count, block=block_ms)
            except (RedisError, OSError) as exc:
                raise Unavailable(f"rollout store: XREAD failed: {exc}") from exc
            if not reply:
                continue
            entries = reply[0][1]
            last_id = _s(entries[-1][0])
            for item in await self._decode_all(entries, ack_bad=False):
                yield item


# ----------------------------------------------------------------------------------------------------------- export


def trajectory_row(entry_id: str, trajectory: rollout_pb2.Trajectory) -> dict[str, Any]:
    """One flat row for tables (parquet): ids, loss mask, reward, searches, timings; ``turns`` as a JSON string."""
    return {
        "stream_id": entry_id,
        "id": trajectory.id,
        "question_id": trajectory.question_id,
        "question": trajectory.question,
        "golden_answers": list(trajectory.golden_answers),
        "prompt_ids": list(trajectory.prompt_ids),
        "response_ids": list(trajectory.response_ids),
        "loss_mask": list(trajectory.loss_mask),
        "response_logprobs": list(trajectory.response_logprobs),
        "response_text": trajectory.response_text,
        "reward": float(trajectory.reward),
        "answer": trajectory.answer,
        "finish_reason": trajectory.finish_reason,
        "policy_version": trajectory.policy_version,
        "group_index": int(trajectory.group_index),
        "num_turns": len(trajectory.turns),
        "num_searches": num_searches(trajectory),
        "search_queries": [t.search.query for t in trajectory.turns if t.HasField("search")],
        "generation_ms": trajectory.timings.generation_ms,
        "search_ms": trajectory.timings.search_ms,
        "reward_ms": trajectory.timings.reward_ms,
        "total_ms": trajectory.timings.total_ms,
        "turns_json": json.dumps([MessageToDict(t, preserving_proto_field_name=True) for t in trajectory.turns]),
    }


def _parquet_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("stream_id", pa.string()),
            ("id", pa.string()),
            ("question_id", pa.string()),
            ("question", pa.string()),
            ("golden_answers", pa.list_(pa.string())),
            ("prompt_ids", pa.list_(pa.int32())),
            ("response_ids", pa.list_(pa.int32())),
            ("loss_mask", pa.list_(pa.int8())),
            ("response_logprobs", pa.list_(pa.float32())),
            ("response_text", pa.string()),
            ("reward", pa.float32()),
            ("answer", pa.string()),
            ("finish_reason", pa.string()),
            ("policy_version", pa.string()),
            ("group_index", pa.int32()),
            ("num_turns", pa.int32()),
            ("num_searches", pa.int32()),
            ("search_queries", pa.list_(pa.string())),
            ("generation_ms", pa.float64()),
            ("search_ms", pa.float64()),
            ("reward_ms", pa.float64()),
            ("total_ms", pa.float64()),
            ("turns_json", pa.string()),
        ]
    )


async def export(
    store: RolloutStore, out: str, fmt: str = "jsonl", limit: int | None = None, progress: bool = False
) -> int:
    """Writes every trajectory of the stream (oldest first) to ``out``.

    ``jsonl``: one ``MessageToDict`` object per line (proto field names, default values included) plus ``stream_id``
    and ``num_searches``. ``parquet``: the flat columns of :func:`trajectory_row` (pyarrow), written in row groups.

    Args:
        store: the rollout store.
        out: output file path.
        fmt: ``"jsonl"`` or ``"parquet"``.
        limit: stop after this many trajectories.
        progress: show a progress bar on stderr.

    Returns:
        The number of trajectories written.

    Raises:
        ValueError: unknown format.
        Unavailable: Redis is down.
    """
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"unknown export format {fmt!r}; use jsonl or parquet")
    from rich.progress import Progress

    total = await store.length()
    if limit is not None:
        total = min(total, limit)
    written = 0
    with Progress(disable=not progress, transient=True, console=_console(stderr=True)) as bar:
        task = bar.add_task(f"exporting {store.stream}", total=total)
        if fmt == "jsonl":
            with open(out, "w", encoding="utf-8") as fh:
                async for entry_id, traj in store.iter_all():
                    if limit is not None and written >= limit:
                        break
                    row = MessageToDict(
                        traj, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
                    )
                    row["stream_id"] = entry_id
                    row["num_searches"] = num_searches(traj)
                    fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    written += 1
                    bar.advance(task)
            return written
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = _parquet_schema()
        rows: list[dict[str, Any]] = []
        with pq.ParquetWriter(out, schema) as writer:
            async for entry_id, traj in store.iter_all():
                if limit is not None and written >= limit:
                    break
                rows.append(trajectory_row(entry_id, traj))
                written += 1
                bar.advance(task)
                if len(rows) >= 1000:
                    writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                    rows = []
            if rows or written == 0:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return written


# -------------------------------------------------------------------------------------------------------------- CLI


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, width=None if sys.stdout.isatty() else 160)


def _table(entries: Sequence[Entry], title: str | None, header: bool = True) -> Any:
    from rich.table import Table

    table = Table(title=title, show_header=header)
    table.add_column("id", no_wrap=True, min_width=12)
    table.add_column("question", max_width=60, overflow="ellipsis", no_wrap=True)
    table.add_column("reward", justify="right", min_width=6)
    table.add_column("searches", justify="right", min_width=8)
    table.add_column("finish reason", min_width=13)
    table.add_column("policy version", min_width=14)
    for _entry_id, t in entries:
        table.add_row(t.id, t.question, f"{t.reward:.3f}", str(num_searches(t)), t.finish_reason, t.policy_version)
    return table


async def _tail(store: RolloutStore, n: int, follow: bool, max_new: int | None, block_ms: int) -> int:
    console = _console()
    entries = await store.last(n)
    console.print(_table(entries, f"{store.stream}: last {len(entries)} of {await store.length()}"))
    if not follow:
        return 0
    seen = 0
    after = entries[-1][0] if entries else "$"
    async for entry in store.follow(after, block_ms=block_ms):
        console.print(_table([entry], None, header=False))
        seen += 1
        if max_new is not None and seen >= max_new:
            break
    return 0


async def _info(store: RolloutStore) -> int:
    console = _console()
    console.print(f"stream {store.stream}: {await store.length()} entries")
    for g in await store.groups():
        console.print(
            f"  group {g.get('name')}: consumers={g.get('consumers')} pending={g.get('pending')} "
            f"last-delivered={g.get('last-delivered-id')} lag={g.get('lag')}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``searchrl rollouts tail|export|info``; returns the exit code (1 when Redis is unreachable)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url",
        default=os.environ.get("SEARCHRL_REDIS_URL") or DEFAULT_REDIS_URL,
        help=f"Redis URL [env SEARCHRL_REDIS_URL; default {DEFAULT_REDIS_URL}]",
    )
    common.add_argument("--stream", default=DEFAULT_STREAM, help=f"stream key [default {DEFAULT_STREAM}]")
    parser = argparse.ArgumentParser(
        prog="searchrl rollouts", description="Inspect and export the Redis rollout stream."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_tail = sub.add_parser("tail", parents=[common], help="print the newest trajectories")
    p_tail.add_argument("-n", type=int, default=20, help="how many of the newest trajectories to show [20]")
    p_tail.add_argument("--follow", "-f", action="store_true", help="keep printing new trajectories as they arrive")
    p_tail.add_argument("--max-new", type=int, default=None, help="with --follow: stop after this many new ones")
    p_tail.add_argument("--block-ms", type=int, default=1000, help="with --follow: XREAD block time per poll [1000]")
    p_exp = sub.add_parser("export", parents=[common], help="write every trajectory to a file")
    p_exp.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    p_exp.add_argument("--out", required=True, help="output file")
    p_exp.add_argument("--limit", type=int, default=None, help="export at most this many (oldest first)")
    sub.add_parser("info", parents=[common], help="stream length and consumer groups")
    args = parser.parse_args(argv)

    async def run() -> int:
        async with RolloutStore(args.redis_url, args.stream) as store:
            if args.command == "tail":
                return await _tail(store, args.n, args.follow, args.max_new, args.block_ms)
            if args.command == "export":
                n = await export(store, args.out, args.format, args.limit, progress=sys.stderr.isatty())
                print(f"wrote {n} trajectories to {args.out}")
                return 0
            return await _info(store)

    try:
        return asyncio.run(run())
    except Unavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
