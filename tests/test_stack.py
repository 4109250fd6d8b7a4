"""``searchrl up``'s supervisor with real processes: health wait, crash restart with backoff, clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from searchrl.stack import StackConfig, start_stack
from searchrl.testing import wait_for_health


def test_reward_stack_restarts_a_crashed_child_and_stops_cleanly(tmp_path: Path) -> None:
    sup, endpoints = start_stack(StackConfig(state_dir=str(tmp_path), services=("reward",)), progress=lambda m: None)
    try:
        assert endpoints["redis"].startswith("redis://127.0.0.1:")
        wait_for_health(endpoints["reward"], timeout_s=10)
        assert (tmp_path / "stack.json").exists()
        old = sup.procs["reward"]
        os.kill(old.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while sup.procs["reward"] is old and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sup.procs["reward"] is not old, "crashed child was not restarted"
        assert sup.restarts["reward"] == 1
        wait_for_health(endpoints["reward"], timeout_s=60)
    finally:
        sup.stop()
    assert all(p.poll() is not None for p in sup.procs.values())
    assert not (tmp_path / "stack.json").exists()


def test_up_down_status_cli(tmp_path: Path) -> None:
    env = {**os.environ}
    up = subprocess.Popen(
        [sys.executable, "-m", "searchrl", "up", "--services", "reward", "--state-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if up.poll() is not None:
                pytest.fail(f"searchrl up exited: {up.stdout.read() if up.stdout else ''}")
            if time.monotonic() > deadline:
                pytest.fail("stack did not come up")
            time.sleep(0.3)
            if (tmp_path / "stack.json").exists() and '"reward"' in (tmp_path / "stack.json").read_text():
                break
        st = subprocess.run(
            [sys.executable, "-m", "searchrl", "status", "--state-dir", str(tmp_path)], capture_output=True, text=True
        )
        assert st.returncode == 0, st.stdout + st.stderr
        assert "SERVING" in st.stdout
        down = subprocess.run(
            [sys.executable, "-m", "searchrl", "down", "--state-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
    st = subprocess.run(
        [sys.executable, "-m", "searchrl", "status", "--state-dir", str(tmp_path)], capture_output=True, text=True
    )
    assert st.returncode == 1 and "no stack running" in st.stdout


def test_missing_redis_binary_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no redis-server on PATH
    with pytest.raises(FileNotFoundError, match="apt-get install redis-server"):
        start_stack(StackConfig(state_dir=str(tmp_path / "s"), services=("reward",)), progress=lambda m: None)


def test_rollout_workers_need_the_policy_service_and_point_at_the_stack(tmp_path: Path) -> None:
    from searchrl.stack import worker_overrides
    from searchrl.trainer.config import load_config

    cfg = StackConfig(state_dir=str(tmp_path), services=("reward",), rollout_workers=1)
    with pytest.raises(ValueError, match="policy service"):
        start_stack(cfg, progress=lambda m: None)
    assert not (tmp_path / "stack.json").exists()  # nothing left running
    endpoints = {"redis": "redis://127.0.0.1:7000/0", "policy": "127.0.0.1:7001", "retriever": "127.0.0.1:7002"}
    # what the workers and the printed `searchrl train` line get is a valid async configuration on those endpoints
    train = load_config(None, worker_overrides(endpoints))
    assert (train.rollout.mode, train.rollout.engine) == ("async", "remote")
    assert train.rollout.policy_target == "127.0.0.1:7001" and train.rollout.queue.redis_url == endpoints["redis"]
    assert train.rollout.search.retriever_target == "127.0.0.1:7002"


def test_the_stack_redis_persists_with_aof(tmp_path: Path) -> None:
    sup, endpoints = start_stack(StackConfig(state_dir=str(tmp_path), services=()), progress=lambda m: None)
    try:
        import redis

        client = redis.Redis.from_url(endpoints["redis"])
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        client.close()
    finally:
        sup.stop()
