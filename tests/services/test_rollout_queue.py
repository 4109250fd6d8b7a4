"""The task/group hand-off on a real Redis: a task yields one group however many workers race for it, a dead
worker's task is taken over, the trainer re-claims what it read and did not acknowledge, lag is reported, and a
bad entry is dead-lettered instead of wedging a consumer."""

from __future__ import annotations

import uuid

import pytest

from searchrl.errors import Unavailable
from searchrl.rollout.v1 import rollout_pb2
from searchrl.services.rollouts.queue import RolloutQueue, version_step


def task(i: int) -> rollout_pb2.RolloutTask:
    return rollout_pb2.RolloutTask(
        task_id=f"run:{i}", question_id=f"q{i}", question=f"Question {i}?", golden_answers=["Paris"], group_size=2
    )


def group(t: rollout_pb2.RolloutTask, version: str = "step-0", worker: str = "w1") -> rollout_pb2.RolloutGroup:
    trajs = [rollout_pb2.Trajectory(id=f"{t.task_id}/{j}", question_id=t.question_id, reward=0.5 * j) for j in range(2)]
    return rollout_pb2.RolloutGroup(task=t, policy_version=version, trajectories=trajs, worker=worker)


@pytest.fixture
async def queue(redis_url: str):  # type: ignore[no-untyped-def]
    q = RolloutQueue(redis_url, prefix=f"test:{uuid.uuid4().hex[:8]}")
    await q.ensure()
    yield q
    await q.close()


async def test_task_to_group_round_trip_and_stats(queue: RolloutQueue) -> None:
    ids = await queue.submit([task(0), task(1)])
    assert len(ids) == 2
    stats = await queue.stats()
    assert (stats.tasks_waiting, stats.tasks_running, stats.groups_waiting) == (2, 0, 0)
    entry_id, t = await queue.take_task("w1", block_ms=None)  # type: ignore[misc]
    assert t.task_id == "run:0" and entry_id == ids[0]
    stats = await queue.stats()
    assert (stats.tasks_waiting, stats.tasks_running) == (1, 1)
    gid = await queue.publish_group(entry_id, group(t))
    assert gid is not None
    stats = await queue.stats()
    assert (stats.tasks_waiting, stats.tasks_running, stats.groups_waiting, stats.groups_unacked) == (1, 0, 1, 0)
    got = await queue.read_groups("trainer-a", count=10, block_ms=None)
    assert [(i, g.task.task_id, len(g.trajectories)) for i, g in got] == [(gid, "run:0", 2)]
    assert (await queue.stats()).groups_unacked == 1
    assert await queue.ack_groups([gid]) == 1
    assert (await queue.stats()).groups_unacked == 0
    await queue.set_policy_version("step-3")
    assert await queue.policy_version() == "step-3" and version_step("step-3") == 3 and version_step("base") is None
    assert version_step("step-12.5f3a9c01") == 12 and version_step("step-x.1") is None


async def test_a_task_yields_one_group_when_two_workers_race(queue: RolloutQueue) -> None:
    await queue.submit([task(0)])
    entry_id, t = await queue.take_task("slow", block_ms=None)  # type: ignore[misc]
    assert await queue.take_task("other", block_ms=None, reclaim_idle_ms=60_000) is None  # not idle long enough
    # "slow" looks dead: another worker takes the task over and finishes first.
    claimed = await queue.take_task("other", block_ms=None, reclaim_idle_ms=0)
    assert claimed is not None and claimed[0] == entry_id
    assert await queue.publish_group(claimed[0], group(t, worker="other")) is not None
    # The slow worker's copy is dropped: one group in the stream.
    assert await queue.publish_group(entry_id, group(t, worker="slow")) is None
    got = await queue.read_groups("trainer", count=10, block_ms=None)
    assert [g.worker for _i, g in got] == ["other"]


async def test_trainer_reclaims_what_it_read_and_did_not_ack(queue: RolloutQueue) -> None:
    await queue.submit([task(i) for i in range(3)])
    for _ in range(3):
        entry_id, t = await queue.take_task("w", block_ms=None)  # type: ignore[misc]
        await queue.publish_group(entry_id, group(t))
    first = await queue.read_groups("trainer-pid1", count=2, block_ms=None)
    await queue.ack_groups([first[0][0]])
    # trainer-pid1 dies; its successor takes over the unacknowledged one, then reads the rest.
    again = await queue.claim_groups("trainer-pid2")
    assert [i for i, _g in again] == [first[1][0]]
    rest = await queue.read_groups("trainer-pid2", count=10, block_ms=None)
    assert [g.task.task_id for _i, g in rest] == ["run:2"]
    assert await queue.read_groups("trainer-pid2", count=10, block_ms=10) == []


async def test_an_entry_that_does_not_decode_is_dead_lettered(redis_client, queue: RolloutQueue) -> None:  # type: ignore[no-untyped-def]
    redis_client.xadd(queue.task_stream, {"m": b"\xff\xff not a proto"})
    await queue.submit([task(7)])
    got = await queue.take_task("w", block_ms=None)
    assert got is None  # the bad entry was read, dead-lettered and acknowledged
    got = await queue.take_task("w", block_ms=None)
    assert got is not None and got[1].task_id == "run:7"
    assert redis_client.xlen(queue.dead_letter_stream) == 1
    assert (await queue.stats()).tasks_running == 1


async def test_a_dead_redis_is_unavailable() -> None:
    from searchrl.testing import free_port

    q = RolloutQueue(f"redis://127.0.0.1:{free_port()}/0", connect_timeout_s=0.5)
    with pytest.raises(Unavailable, match="rollout store"):
        await q.submit([task(0)])
    await q.close()
