"""``searchrl rollouts tail|export|info``: inspect and export the Redis rollout stream.

searchrl rollouts tail [-n 20] [--follow] [--redis-url URL] [--stream NAME]
searchrl rollouts export --format jsonl|parquet --out FILE [--limit N]
searchrl rollouts info
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

from searchrl.errors import Unavailable
from searchrl.services.rollouts.export import export
from searchrl.services.rollouts.store import DEFAULT_REDIS_URL, DEFAULT_STREAM, Entry, RolloutStore, num_searches


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
