"""Rollout store on a real Redis: XADD/XREADGROUP/XACK, a consumer SIGKILLed before XACK loses nothing (XAUTOCLAIM),
dead-lettering, trimming, and the ``searchrl rollouts tail|export|info`` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from searchrl.errors import Unavailable
from searchrl.rollout.v1 import rollout_pb2
from searchrl.services.rollouts.cli import main
from searchrl.services.rollouts.store import RolloutStore, num_searches
from searchrl.testing import free_port


def trajectory(i: int, reward: float = 0.5) -> rollout_pb2.Trajectory:
    search = rollout_pb2.SearchCall(
        query=f"query {i}",
        documents=[rollout_pb2.Document(id=f"d{i}", title="T", text="text", score=0.9)],
        backend="retriever",
        latency_ms=3.5,
    )
    return rollout_pb2.Trajectory(
        id=f"traj-{i}",
        question_id=f"q{i // 5}",
        question=f"Question number {i}?",
        golden_answers=["Paris", "City of Light"],
        prompt_ids=[1, 2, 3],
        response_ids=[10, 11, 12, 13, 14],
        loss_mask=[1, 1, 0, 0, 1],
        response_logprobs=[-0.5, -0.25, 0.0, 0.0, -1.0],
        response_text="<think>x</think><search>q</search><result>d</result><answer>\\boxed{Paris}</answer>",
        reward=reward,
        turns=[
            rollout_pb2.Turn(
                index=0, generated_text="<think>x</think><search>q</search>", search=search, finish_reason="search"
            ),
            rollout_pb2.Turn(index=1, generated_text="<answer>\\boxed{Paris}</answer>", finish_reason="answer"),
        ],
        finish_reason="answer",
        policy_version=f"step-{i}",
        group_index=i % 5,
        timings=rollout_pb2.Timings(generation_ms=10, search_ms=3.5, reward_ms=0.1, total_ms=14),
        answer="Paris",
    )


def stream_name() -> str:
    return f"test:rollouts:{uuid.uuid4().hex[:8]}"


async def test_add_read_ack_and_export_iterators(redis_url: str) -> None:
    async with RolloutStore(redis_url, stream_name()) as store:
        assert await store.ensure_group() is True
        assert await store.ensure_group() is False  # idempotent
        ids = [await store.add(trajectory(i, reward=i / 10)) for i in range(3)]
        ids += await store.add_many([trajectory(i) for i in range(3, 6)])
        assert len(set(ids)) == 6 and await store.length() == 6
        got = await store.read("c1", count=4)
        assert [e for e, _ in got] == ids[:4]
        assert got[0][1] == trajectory(0, reward=0.0) and got[2][1].reward == pytest.approx(0.2)
        assert await store.pending_count() == 4
        rest = await store.read("c2", count=10)
        assert [e for e, _ in rest] == ids[4:]
        assert await store.read("c1", count=10) == []  # nothing new
        assert await store.ack([e for e, _ in got]) == 4
        assert await store.ack([e for e, _ in got]) == 0  # already acknowledged
        assert await store.pending_count() == 2
        # export iterators do not touch the group
        every = [e async for e, _ in store.iter_all(batch=4)]  # paged XRANGE
        assert every == ids
        assert [e async for e, _ in store] == ids
        assert [e for e, _ in await store.last(2)] == ids[-2:]
        groups = await store.groups()
        assert groups[0]["name"] == "trainer" and groups[0]["pending"] == 2


async def test_read_creates_the_group_and_blocks_for_new_entries(redis_url: str) -> None:
    async with RolloutStore(redis_url, stream_name(), group="fresh") as store:
        assert await store.read("c", count=1) == []  # NOGROUP -> group created (from id 0)

        async def produce() -> None:
            await asyncio.sleep(0.3)
            async with RolloutStore(redis_url, store.stream) as producer:
                await producer.add(trajectory(7))

        task = asyncio.create_task(produce())
        got = await store.read("c", count=1, block_ms=5000)
        await task
        assert [t.id for _, t in got] == ["traj-7"]


CONSUMER = textwrap.dedent(
    """
    import asyncio, sys, time
    from searchrl.services.rollouts.store import RolloutStore

    async def main(url, stream):
        store = RolloutStore(url, stream)
        entries = await store.read("doomed", count=1)
        print("READ", entries[0][0], entries[0][1].id, flush=True)
        time.sleep(600)  # processing... killed before XACK

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


async def test_consumer_killed_between_read_and_ack_loses_nothing(redis_url: str) -> None:
    stream = stream_name()
    async with RolloutStore(redis_url, stream) as store:
        await store.ensure_group()
        first = await store.add(trajectory(1))
        second = await store.add(trajectory(2))
        proc = subprocess.Popen(
            [sys.executable, "-c", CONSUMER, redis_url, stream],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)  # type: ignore[union-attr]
            assert line.split() == ["READ", first, "traj-1"]
            os.kill(proc.pid, signal.SIGKILL)  # dies holding the entry, never acks it
            assert proc.wait(10) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
        # the survivor gets only the undelivered entry from a normal read ...
        assert [e for e, _ in await store.read("survivor", count=10)] == [second]
        await store.ack([second])
        assert await store.pending_count() == 1
        # ... and takes the dead consumer's entry over once it has been idle long enough
        assert await store.claim_stale("survivor", min_idle_ms=60_000) == []  # not idle that long yet
        await asyncio.sleep(0.25)
        claimed = await store.claim_stale("survivor", min_idle_ms=200, count=10)
        assert [(e, t.id) for e, t in claimed] == [(first, "traj-1")]
        assert claimed[0][1] == trajectory(1)
        assert await store.ack([first]) == 1
        assert await store.pending_count() == 0
        assert await store.length() == 2  # nothing lost, nothing duplicated


async def test_undecodable_entries_go_to_the_dead_letter_stream(redis_url: str, redis_client: Any) -> None:
    async with RolloutStore(redis_url, stream_name()) as store:
        await store.ensure_group()
        good1 = await store.add(trajectory(1))
        redis_client.xadd(store.stream, {"t": b"\xff\x00garbage", "id": "bad"})
        redis_client.xadd(store.stream, {"reward": "1.0"})  # no payload at all
        good2 = await store.add(trajectory(2))
        got = await store.read("c", count=10)
        assert [e for e, _ in got] == [good1, good2]
        assert await store.pending_count() == 2  # the bad ones were acknowledged
        dead = redis_client.xrange(store.dead_letter_stream)
        assert len(dead) == 2 and dead[0][1][b"id"] == b"bad" and b"error" in dead[0][1]
        assert [e async for e, _ in store.iter_all()] == [good1, good2]


async def test_maxlen_trims_the_stream(redis_url: str) -> None:
    async with RolloutStore(redis_url, stream_name(), maxlen=5, trim_approximate=False) as store:
        ids = await store.add_many([trajectory(i) for i in range(12)])
        assert await store.length() == 5
        assert [e async for e, _ in store.iter_all()] == ids[-5:]
    with pytest.raises(ValueError):
        RolloutStore(redis_url, maxlen=0)


async def test_redis_down_raises_unavailable() -> None:
    async with RolloutStore(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=1) as store:
        with pytest.raises(Unavailable, match="XADD"):
            await store.add(trajectory(1))
        with pytest.raises(Unavailable):
            await store.read("c", count=1)
        with pytest.raises(Unavailable):
            await store.length()


async def test_a_batch_published_while_redis_restarts_lands_once_and_whole(tmp_path: Path) -> None:
    """#17: the trainer publishes each step's batch with ``retry_s``: Redis SIGKILLed (AOF on) and restarted on the
    same port a second later; the batch lands once, all of it, and survives another kill (appendfsync always)."""
    from searchrl.serving.process import start_redis, stop_process_group

    port = free_port()
    (tmp_path / "redis").mkdir()
    proc, url = start_redis(port, tmp_path / "redis", appendfsync="always")
    batch = [trajectory(i) for i in range(20)]
    try:
        async with RolloutStore(url, "s", connect_timeout_s=1) as store:
            await store.add_many([trajectory(100)])
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            publish = asyncio.ensure_future(store.add_many(batch, retry_s=60))
            await asyncio.sleep(1.5)
            assert not publish.done(), "the publish must wait for Redis, not give up"
            proc, _ = start_redis(port, tmp_path / "redis", appendfsync="always")
            ids = await asyncio.wait_for(publish, 60)
            assert len(ids) == 20 and all(ids)
            assert await store.add_many(batch, dedupe=True) == ids  # already there: nothing written
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc, _ = start_redis(port, tmp_path / "redis", appendfsync="always")
        async with RolloutStore(url, "s", connect_timeout_s=1) as store:
            got = [t.id async for _entry_id, t in store.iter_all()]
        assert got == [trajectory(100).id] + [t.id for t in batch]
    finally:
        stop_process_group(proc, group=False)
    async with RolloutStore(url, "s", connect_timeout_s=1) as store:
        with pytest.raises(Unavailable):  # Redis stays down: the retries end at retry_s
            await store.add_many(batch, retry_s=1)


# ------------------------------------------------------------------------------------------------------------ CLI


def _fill(redis_url: str, stream: str, n: int) -> list[str]:
    async def go() -> list[str]:
        async with RolloutStore(redis_url, stream) as store:
            return await store.add_many([trajectory(i, reward=i / 10) for i in range(n)])

    return asyncio.run(go())


def test_cli_tail_and_info(redis_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    stream = stream_name()
    _fill(redis_url, stream, 4)
    assert main(["tail", "-n", "2", "--redis-url", redis_url, "--stream", stream]) == 0
    out = capsys.readouterr().out
    assert "last 2 of 4" in out
    assert "traj-2" in out and "traj-3" in out and "traj-1" not in out
    assert "Question number 3?" in out and "0.300" in out and "step-3" in out and "answer" in out
    assert main(["info", "--redis-url", redis_url, "--stream", stream]) == 0
    assert "4 entries" in capsys.readouterr().out
    assert main(["tail", "--redis-url", f"redis://127.0.0.1:{free_port()}/0", "--stream", stream]) == 1
    assert "error:" in capsys.readouterr().err


def test_cli_export_jsonl_and_parquet(redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pyarrow.parquet as pq

    stream = stream_name()
    ids = _fill(redis_url, stream, 7)
    out = tmp_path / "r.jsonl"
    assert main(["export", "--format", "jsonl", "--out", str(out), "--redis-url", redis_url, "--stream", stream]) == 0
    assert "wrote 7 trajectories" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["stream_id"] for r in rows] == ids
    assert rows[0]["reward"] == 0.0  # default values are written, not dropped
    assert rows[3]["loss_mask"] == [1, 1, 0, 0, 1] and rows[3]["num_searches"] == 1
    assert rows[3]["turns"][0]["search"]["query"] == "query 3"
    pq_path = tmp_path / "r.parquet"
    args = [
        "export",
        "--format",
        "parquet",
        "--out",
        str(pq_path),
        "--limit",
        "5",
        "--redis-url",
        redis_url,
        "--stream",
        stream,
    ]
    assert main(args) == 0
    table = pq.read_table(pq_path).to_pylist()
    assert [r["stream_id"] for r in table] == ids[:5]
    t3 = table[3]
    assert t3["id"] == "traj-3" and t3["loss_mask"] == [1, 1, 0, 0, 1] and t3["response_ids"] == [10, 11, 12, 13, 14]
    assert t3["reward"] == pytest.approx(0.3) and t3["num_searches"] == 1 and t3["search_queries"] == ["query 3"]
    assert t3["golden_answers"] == ["Paris", "City of Light"] and t3["total_ms"] == 14
    assert json.loads(t3["turns_json"])[1]["finish_reason"] == "answer"
    assert num_searches(trajectory(0)) == 1


def test_cli_tail_follow_prints_new_trajectories(redis_url: str) -> None:
    stream = stream_name()
    _fill(redis_url, stream, 1)
    cmd = [
        sys.executable,
        "-m",
        "searchrl",
        "rollouts",
        "tail",
        "-n",
        "1",
        "--follow",
        "--max-new",
        "2",
        "--block-ms",
        "200",
    ]
    proc = subprocess.Popen([*cmd, "--redis-url", redis_url, "--stream", stream], stdout=subprocess.PIPE, text=True)
    try:
        header = ""
        deadline = time.monotonic() + 60
        while "traj-0" not in header and time.monotonic() < deadline:
            header += proc.stdout.readline()  # type: ignore[union-attr]

        async def add_two() -> None:
            async with RolloutStore(redis_url, stream) as store:
                await store.add(trajectory(41))
                await store.add(trajectory(42))

        asyncio.run(add_two())
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "traj-41" in rest and "traj-42" in rest
