"""rollout.mode=async with real processes: a PolicyService, ``searchrl rollout-worker`` processes, the trainer as
``searchrl train``, a real Redis. Faults are SIGKILLs: a worker in the middle of a group (its task is taken over and
yields one group), the trainer after it trained groups but before the checkpoint that holds them (they are
delivered again and trained exactly once in the run that survives), Redis with AOF on (no acknowledged group lost).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from searchrl.rollout.v1 import rollout_pb2
from searchrl.services.rollouts.queue import RolloutQueue, version_step
from searchrl.trainer.config import load_config

pytestmark = pytest.mark.slow

# Tiny groups (1 question x 2 samples, 2 turns of <= 16 tokens) so that a step takes seconds on two busy cores.
OVERRIDES = [
    "seed=3",
    "data.train=[fanoutqa-sub]",
    "data.limit=16",
    "data.batch_size=1",
    "data.group_size=2",
    "rollout.engine=remote",
    "rollout.mode=async",
    "rollout.max_staleness=1",
    "rollout.search.backend=inprocess",
    # every episode searches first (the environment writes the question as the query), as in the demo
    'rollout.agent.response_prefix="<think> I need to search for this. </think>\\n<search> {question} </search>"',
    "rollout.agent.max_turns=2",
    "rollout.agent.max_new_tokens_per_turn=16",
    "rollout.agent.max_response_tokens=200",
    "rollout.agent.top_k=2",
    "rollout.agent.max_doc_chars=120",
    "rollout.queue.reclaim_idle_s=3",
    "rollout.queue.wait_timeout_s=240",
    "algorithm.lr=5e-5",
    "algorithm.micro_batch_size=2",
    "logging.metrics_port=0",
]


@pytest.fixture(scope="module")
def policy(policy_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from searchrl.testing import ServiceProcess

    roots = str(tmp_path_factory.getbasetemp())  # every test's run folder (trainer.output_dir) is below it
    args = ["--model", policy_path, "--max-batch-size", "4", "--weights-roots", roots]
    with ServiceProcess("policy", args, timeout_s=300) as svc:
        yield svc


def write_config(tmp_path: Path, redis_url: str, policy: Any, index_dir: Path, *extra: str) -> Path:
    cfg = load_config(
        None,
        [*OVERRIDES, f"rollout.policy_target={policy.target}", f"rollout.queue.redis_url={redis_url}",
         f"rollout.queue.prefix=test:{uuid.uuid4().hex[:8]}", f"rollout.search.index_dir={index_dir}",
         f"trainer.output_dir={tmp_path / 'run'}", f"logging.mlflow_tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
         *extra],
    )  # fmt: skip
    path = tmp_path / f"config-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "searchrl", *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def kill9(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str, logs: list[Path] = ()) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
    raise AssertionError(f"timed out waiting for {what}\n{tails}")


def queue_call(cfg_path: Path, fn: Callable[[RolloutQueue], Any]) -> Any:
    cfg = load_config(cfg_path)

    async def run() -> Any:
        async with RolloutQueue(cfg.rollout.queue.redis_url, cfg.rollout.queue.prefix) as q:
            return await fn(q)

    return asyncio.run(run())


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_killed_worker_s_task_is_taken_over_and_yields_one_group(
    tmp_path: Path, redis_url: str, policy: Any, small_wiki_index: Path
) -> None:
    slow = write_config(
        tmp_path,
        redis_url,
        policy,
        small_wiki_index,
        "rollout.search.added_latency_s=60",
        "rollout.search.timeout_s=120",
    )
    cfg = load_config(slow)
    fast = tmp_path / "fast.yaml"
    fast.write_text(load_config(slow, ["rollout.search.added_latency_s=0"]).to_yaml())
    task = rollout_pb2.RolloutTask(
        task_id="t-1", question_id="q-1", question="Where is the Eiffel Tower?", golden_answers=["Paris"], group_size=2
    )

    async def submit(q: RolloutQueue) -> None:
        await q.ensure()
        await q.submit([task])

    queue_call(slow, submit)
    logs = [tmp_path / "w1.log", tmp_path / "w2.log"]
    w1 = spawn(["rollout-worker", "--config", str(slow), "--name", "w1"], logs[0])
    try:
        # w1 holds the task and is inside the group (its searches wait 30 s)
        wait_until(lambda: queue_call(slow, lambda q: q.stats()).tasks_running == 1, 180, "w1 to take the task", logs)
        time.sleep(2)
        kill9(w1)
        assert queue_call(slow, lambda q: q.stats()).groups_waiting == 0
        w2 = spawn(["rollout-worker", "--config", str(fast), "--name", "w2"], logs[1])
        try:
            wait_until(lambda: queue_call(slow, lambda q: q.stats()).groups_waiting == 1, 240, "w2's group", logs)
            time.sleep(1)
        finally:
            w2.send_signal(signal.SIGTERM)
            assert w2.wait(60) == 0
    finally:
        if w1.poll() is None:
            kill9(w1)

    async def read(q: RolloutQueue) -> list[tuple[str, rollout_pb2.RolloutGroup]]:
        return await q.read_groups("check", count=10)

    groups = queue_call(slow, read)
    assert len(groups) == 1
    g = groups[0][1]
    assert g.task.task_id == "t-1" and g.worker == "w2" and len(g.trajectories) == 2
    assert len({t.policy_version for t in g.trajectories}) == 1 and g.policy_version == g.trajectories[0].policy_version
    assert all(t.question == task.question and list(t.golden_answers) == ["Paris"] for t in g.trajectories)
    assert not any(t.mixed_policy_versions for t in g.trajectories)
    assert all(t.format_ok == (t.format_error == "") for t in g.trajectories)
    stats = queue_call(slow, lambda q: q.stats())
    assert (stats.tasks_waiting, stats.tasks_running) == (0, 0)
    assert "took over task t-1" in logs[1].read_text()
    assert cfg.rollout.queue.reclaim_idle_s == 3


def test_async_training_survives_a_killed_trainer_and_trains_each_group_once(
    tmp_path: Path, redis_url: str, policy: Any, small_wiki_index: Path
) -> None:
    cfg_path = write_config(
        tmp_path, redis_url, policy, small_wiki_index, "trainer.max_steps=4", "checkpoint.every_steps=2"
    )
    out = tmp_path / "run"
    logs = [tmp_path / "worker.log", tmp_path / "trainer1.log", tmp_path / "trainer2.log"]
    worker = spawn(["rollout-worker", "--config", str(cfg_path), "--name", "w"], logs[0])
    try:
        t1 = spawn(["train", "--config", str(cfg_path)], logs[1])
        try:
            # step 3 trained (its groups read and used), the checkpoint that would hold them (step 4) not written
            wait_until(lambda: any(r["step"] == 3 for r in rows(out / "metrics.jsonl")), 400, "step 3", logs)
            kill9(t1)
        finally:
            if t1.poll() is None:
                kill9(t1)
        first = rows(out / "groups.jsonl")
        pending = queue_call(cfg_path, lambda q: q.stats()).groups_unacked
        assert pending >= 1  # step 3's group (and maybe step 4's) read, not acknowledged
        t2 = spawn(["train", "--config", str(cfg_path)], logs[2])
        assert t2.wait(600) == 0, logs[2].read_text()[-3000:]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    second = rows(out / "groups.jsonl")[len(first) :]
    assert "took over" in logs[2].read_text() and "resumed from" in logs[2].read_text()
    # The surviving run: steps 1-2 from the first trainer (in the checkpoint), steps 3-4 from the second.
    lineage = [r for r in first if r["step"] <= 2] + second
    assert sorted(r["step"] for r in lineage) == [1, 2, 3, 4]
    tasks = [r["task_id"] for r in lineage]
    assert len(set(tasks)) == len(tasks), tasks  # no group trained twice
    entries = [r["entry_id"] for r in lineage]
    assert len(set(entries)) == len(entries)
    killed_step3 = [r["entry_id"] for r in first if r["step"] == 3]
    assert set(killed_step3) <= {r["entry_id"] for r in second}  # delivered again, trained in the surviving run
    # bounded staleness: each group's version lags the weights it trained by at most max_staleness (1)
    for r in lineage:
        assert 0 <= (r["step"] - 1) - version_step(r["policy_version"]) <= 1, r  # type: ignore[operator]
    stats = queue_call(cfg_path, lambda q: q.stats())
    assert stats.groups_unacked == 0  # everything trained is in the final checkpoint and acknowledged
    metrics = rows(out / "metrics.jsonl")[-1]
    assert metrics["step"] == 4 and metrics["stream/group_age_versions"] <= 1
    for key in ("time/trainer_idle_share", "time/episodes_per_s", "stream/lag", "time/wait_s"):
        assert key in metrics
    assert queue_call(cfg_path, lambda q: q.policy_version()).startswith("step-4.")


def test_acknowledged_groups_survive_a_killed_redis_with_aof(tmp_path: Path) -> None:
    from searchrl.serving.process import start_redis, stop_process_group
    from searchrl.testing import free_port

    port = free_port()
    proc, url = start_redis(port, tmp_path, appendfsync="always")

    async def fill() -> list[str]:
        async with RolloutQueue(url, "aof") as q:
            await q.ensure()
            await q.submit(
                [rollout_pb2.RolloutTask(task_id=f"t{i}", group_size=1) for i in range(3)], counter=("aof-fed", 3)
            )
            for _ in range(3):
                entry, task = await q.take_task("w", block_ms=None)  # type: ignore[misc]
                await q.publish_group(entry, rollout_pb2.RolloutGroup(task=task, policy_version="step-0"))
            read = await q.read_groups("trainer", count=3)
            await q.ack_groups([read[0][0]])
            return [e for e, _g in read]

    try:
        ids = asyncio.run(fill())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc, url = start_redis(port, tmp_path, appendfsync="always")

    async def check() -> tuple[Any, list[tuple[str, rollout_pb2.RolloutGroup]], int]:
        async with RolloutQueue(url, "aof") as q:
            stats = await q.stats()
            claimed = await q.claim_groups("trainer-2")
            return stats, claimed, await q.counter("aof-fed")

    try:
        stats, claimed, fed = asyncio.run(check())
    finally:
        stop_process_group(proc, 10, group=False)
    assert (stats.tasks_waiting, stats.tasks_running, stats.groups_waiting, stats.groups_unacked) == (0, 0, 0, 2)
    assert [e for e, _g in claimed] == ids[1:] and [g.task.task_id for _e, g in claimed] == ["t1", "t2"]
    assert fed == 3


def test_async_training_rides_out_redis_killed_mid_step(tmp_path: Path, policy: Any, small_wiki_index: Path) -> None:
    """#17 fault test, async mode: Redis (AOF, fsync always) is SIGKILLed while the trainer trains step 2 and a worker
    samples, and restarted 2 s later on the same port. A process that exits meanwhile is started again, as Kubernetes
    restarts a crashed pod. The run reaches step 4; every step trained one group, no task twice; nothing is left
    unacknowledged; the final checkpoint's weights are the ones the PolicyService serves."""
    from searchrl.serving.process import start_redis, stop_process_group
    from searchrl.testing import free_port

    port = free_port()
    (tmp_path / "redis").mkdir()
    redis, url = start_redis(port, tmp_path / "redis", appendfsync="always")
    cfg_path = write_config(tmp_path, url, policy, small_wiki_index, "trainer.max_steps=4", "checkpoint.every_steps=1")
    out = tmp_path / "run"
    logs = {"worker": tmp_path / "worker.log", "trainer": tmp_path / "trainer.log"}
    cmds = {"worker": ["rollout-worker", "--config", str(cfg_path), "--name", "w"],
            "trainer": ["train", "--config", str(cfg_path)]}  # fmt: skip
    procs = {name: spawn(cmd, logs[name]) for name, cmd in cmds.items()}
    restarts = {"worker": 0, "trainer": 0}

    def supervise() -> bool:
        """True once the trainer exited 0; restarts whatever else exited."""
        for name, proc in list(procs.items()):
            rc = proc.poll()
            if rc is None or (name == "trainer" and rc == 0):
                continue
            assert restarts[name] < 5, f"{name} keeps exiting:\n{logs[name].read_text()[-3000:]}"
            restarts[name] += 1
            procs[name] = spawn(cmds[name], logs[name])
        return procs["trainer"].poll() == 0

    try:
        wait_until(lambda: any(r["step"] == 1 for r in rows(out / "metrics.jsonl")), 400, "step 1", list(logs.values()))
        redis.send_signal(signal.SIGKILL)  # step 2 is being sampled and trained
        redis.wait(10)
        time.sleep(2)
        redis, _ = start_redis(port, tmp_path / "redis", appendfsync="always")
        wait_until(supervise, 900, "the trainer to finish", list(logs.values()))
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    kill9(proc)
        final = queue_call(cfg_path, lambda q: q.stats()) if redis.poll() is None else None
        stop_process_group(redis, group=False)
    metrics = rows(out / "metrics.jsonl")
    assert metrics[-1]["step"] == 4
    groups = rows(out / "groups.jsonl")
    # The lineage that survived: the last record of each step (a step re-run after a crash is recorded again).
    last: dict[int, dict[str, Any]] = {}
    for r in groups:
        last[r["step"]] = r
    assert sorted(last) == [1, 2, 3, 4]
    tasks = [r["task_id"] for r in last.values()]
    assert len(set(tasks)) == len(tasks), tasks
    assert final is not None and final.groups_unacked == 0, final
    # A process that lost Redis says so in one line and exits 1 (the pod restarts), without a traceback.
    for name, log in logs.items():
        if restarts[name]:
            assert "Traceback" not in log.read_text(), f"{name}:\n{log.read_text()[-3000:]}"
    print(f"restarts after the Redis kill: {restarts}")


def test_async_training_rides_out_search_simulator_and_policy_killed_mid_rollout(
    tmp_path: Path, small_wiki_index: Path
) -> None:
    """#17 fault test, async mode, real processes: `searchrl up`'s supervisor runs a RetrievalService, the
    SimulatedSearchService, a PolicyService and one rollout worker that searches both services
    (rollout.search.backend=mixed); the trainer runs as `searchrl train`. Once step 1 is trained, the three services
    are SIGKILLed while the worker samples the next groups. The supervisor restarts each once; the worker's calls wait
    for them (gRPC wait-for-ready) instead of failing; a group sampled by the restarted policy's start-up weights is
    skipped, and the trainer loads its newest weights into the service again (RemotePolicyBackend.restore_pinned).
    The run reaches step 4 with one group per step, no task trained twice, nothing left unacknowledged and no failed
    search in any trained step."""
    from types import SimpleNamespace

    from searchrl.stack import StackConfig, start_rollout_workers, start_stack

    sup, endpoints = start_stack(
        StackConfig(
            state_dir=str(tmp_path / "stack"),
            services=("retriever", "simulator", "policy"),
            index_dir=str(small_wiki_index),
            weights_roots=(str(tmp_path),),
        ),
        progress=lambda _m: None,
    )
    names = ("retriever", "simulator", "policy")
    log = tmp_path / "trainer.log"
    try:
        cfg_path = write_config(
            tmp_path, endpoints["redis"], SimpleNamespace(target=endpoints["policy"]), small_wiki_index,
            "trainer.max_steps=4", "checkpoint.every_steps=1", "rollout.search.backend=mixed",
            "rollout.search.mix_ratio=0.5", "rollout.search.timeout_s=180",
            f"rollout.search.retriever_target={endpoints['retriever']}",
            f"rollout.search.simulator_target={endpoints['simulator']}",
        )  # fmt: skip
        start_rollout_workers(sup, endpoints, 1, str(cfg_path))
        trainer = spawn(["train", "--config", str(cfg_path)], log)
        try:
            wait_until(lambda: any(r["step"] == 1 for r in rows(tmp_path / "run" / "metrics.jsonl")), 600, "step 1", [log])
            for name in names:  # the worker is sampling the next groups
                os.kill(sup.procs[name].pid, signal.SIGKILL)
            assert trainer.wait(900) == 0, log.read_text()[-3000:]
        finally:
            if trainer.poll() is None:
                kill9(trainer)
        final = queue_call(cfg_path, lambda q: q.stats())
        restarts = dict(sup.restarts)
    finally:
        sup.stop()
    assert [restarts[n] for n in names] == [1, 1, 1], restarts
    metrics = rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [1, 2, 3, 4]
    assert all(r["rollout/search_failures"] == 0 for r in metrics), [r["rollout/search_failures"] for r in metrics]
    assert any(0 < r["rollout/simulator_search_share"] < 1 for r in metrics[1:]), "both search services must answer"
    last: dict[int, dict[str, Any]] = {}
    for r in rows(tmp_path / "run" / "groups.jsonl"):
        last[r["step"]] = r
    assert sorted(last) == [1, 2, 3, 4]
    tasks = [r["task_id"] for r in last.values()]
    assert len(set(tasks)) == len(tasks), tasks
    assert final.groups_unacked == 0, final
    restored = log.read_text().count("(restarted?)")
    stale = metrics[-1]["stream/stale_groups_total"]
    print(f"weights loaded again into the restarted policy service: {restored} time(s); groups skipped: {stale:g}")
