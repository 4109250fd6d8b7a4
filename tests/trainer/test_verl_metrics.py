"""The trainer's Prometheus metrics on the verl path: the ``searchrl-metrics`` hub fed by verl's step metrics and by
the agent loop's episodes, served over HTTP; and, in a real local Ray cluster, our TaskRunner starting it on the head
and an agent-loop worker process reporting to it."""

from __future__ import annotations

import time
import urllib.request
from typing import Any

import pytest

from searchrl.testing import free_port

pytest.importorskip("verl")


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def test_hub_maps_verl_step_metrics_and_episode_searches() -> None:
    from searchrl.trainer.verl_plugins.metrics import MetricsHub

    port = free_port()
    hub = MetricsHub(port, "127.0.0.1")
    try:
        hub.record_episode({"retriever/ok": 2, "retriever/error": 1}, searches=3, failed=1)
        hub.record_episode({"retriever/timeout": 1, "retriever/invalid_query": 1}, searches=1, failed=1)
        # what verl's trainer hands Tracking.log (keys from verl/trainer/ppo/metric_utils.py)
        hub.log({"critic/score/mean": 0.42, "actor/kl_loss": 0.003, "timing_s/step": 31.5, "timing_s/gen": 20.0,
                 "timing_s/update_actor": 9.0, "training/global_step": 12, "note": "not a number"}, step=12)  # fmt: skip
        body = _scrape(port)
    finally:
        hub.gauges.close()
    assert "searchrl_train_step 12.0" in body
    assert "searchrl_train_reward_mean 0.42" in body and "searchrl_train_kl 0.003" in body
    assert 'searchrl_train_step_seconds{phase="rollout"} 20.0' in body
    assert 'searchrl_train_step_seconds{phase="total"} 31.5' in body
    assert "searchrl_train_searches_per_episode 2.0" in body  # 4 searches over 2 episodes
    assert "searchrl_train_search_failure_ratio 0.5" in body  # 2 of 4 failed
    assert 'searchrl_policy_searches_total{backend="retriever",outcome="error"} 1.0' in body
    assert 'searchrl_policy_searches_total{backend="retriever",outcome="timeout"} 1.0' in body
    # the tally closes with the step
    hub.log({"critic/score/mean": 0.5}, step=13)
    assert "searchrl_train_search_failure_ratio 0.0" in hub.exposition()


@pytest.mark.slow  # starts a local Ray cluster
def test_task_runner_starts_the_hub_on_the_head_and_workers_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """verl's TaskRunner class extended by ours, in real Ray: the hub actor comes up on the head node, the Tracking
    hook forwards a step, and an episode reported from another Ray worker process reaches the same hub."""
    import ray

    from searchrl.trainer import rayjob_entrypoint
    from searchrl.trainer.verl_plugins import metrics

    port = free_port()
    monkeypatch.setenv("SEARCHRL_METRICS_PORT", str(port))
    monkeypatch.setenv("SEARCHRL_METRICS_HOST", "127.0.0.1")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"SEARCHRL_METRICS_PORT": str(port), "SEARCHRL_METRICS_HOST": "127.0.0.1"}})  # fmt: skip
    try:
        runner_cls = rayjob_entrypoint.task_runner_class(use_v1=True)

        # Our run() override in a Ray worker process, with verl's training (GPUs) replaced by one logged step.
        @ray.remote
        def in_task_runner_process() -> int:
            from verl.utils.tracking import Tracking

            base = runner_cls.__ray_actor_class__.__mro__[1]

            def fake_verl_run(self: Any, config: Any) -> int:
                tracking = Tracking.__new__(Tracking)
                tracking.logger = {}
                tracking.log({"critic/score/mean": 0.75, "actor/kl_loss": 0.01}, step=3)
                return 3

            base.run = fake_verl_run
            obj = runner_cls.__ray_actor_class__.__new__(runner_cls.__ray_actor_class__)
            return int(runner_cls.__ray_actor_class__.run(obj, None))

        assert ray.get(in_task_runner_process.remote(), timeout=240) == 3

        @ray.remote
        def agent_loop_worker() -> None:
            metrics.report_episode({"retriever/ok": 1, "retriever/error": 1}, searches=2, failed=1)

        ray.get(agent_loop_worker.remote(), timeout=240)  # generous: a worker process starts on 2 busy cores
        hub = ray.get_actor(metrics.HUB_NAME)
        assert ray.get(hub.port.remote(), timeout=240) == port
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline:
            body = _scrape(port)
            if 'outcome="error"} 1.0' in body:
                break
            time.sleep(0.5)
        assert "searchrl_train_step 3.0" in body and "searchrl_train_reward_mean 0.75" in body
        assert 'searchrl_policy_searches_total{backend="retriever",outcome="error"} 1.0' in body
    finally:
        ray.shutdown()
