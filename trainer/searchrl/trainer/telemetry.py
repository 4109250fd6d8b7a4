"""Where the local trainer reports: Prometheus gauges (scraped from the trainer) and an MLflow run.

Prometheus metric names are fixed (the chart's PrometheusRule and Grafana dashboards use them):

==========================================  ===========================================================
``searchrl_train_step``                      last finished step
``searchrl_train_reward_mean``               mean episode reward of the last step
``searchrl_train_f1_mean``                   mean answer F1 of the last step
``searchrl_train_searches_per_episode``      mean searches per episode of the last step
``searchrl_train_kl``                        mean per-token KL to the reference (nats)
``searchrl_train_noisy_share``               share of searches answered with noisy simulated documents
``searchrl_train_step_seconds{phase}``       seconds of the last step in rollout / reward / update / total
``searchrl_train_idle_share``                share of the last step outside the update
``searchrl_train_episodes_per_second``       episodes trained per second of the last step
``searchrl_train_stream_lag``                async: tasks waiting + tasks running + groups not yet read
``searchrl_train_group_age_versions``        async: mean version lag of the groups trained in the last step
``searchrl_train_group_age_seconds``         async: mean seconds from task creation to training
``searchrl_train_stale_groups``              async: groups skipped as too stale so far
``searchrl_train_guard_tripped{guard}``      1 when the guard tripped on the last step, else 0
==========================================  ===========================================================

MLflow runs: :class:`searchrl.tracking.MlflowRun`. :func:`rollout_metrics` computes the ``reward/*`` and ``rollout/*``
metrics of one step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from searchrl.trainer.guards import GUARDS

PHASES = ("rollout", "reward", "update", "total")


#: The scalar gauges: name -> (help text, the step metric it shows).
SCALARS = {
    "searchrl_train_reward_mean": ("Mean episode reward of the last step.", "reward/mean"),
    "searchrl_train_f1_mean": ("Mean answer F1 of the last step.", "reward/f1"),
    "searchrl_train_searches_per_episode": (
        "Mean searches per episode of the last step.",
        "rollout/searches_per_episode",
    ),
    "searchrl_train_kl": ("Mean per-token KL to the reference policy of the last step (nats).", "actor/kl"),
    "searchrl_train_noisy_share": (
        "Share of the last step's searches answered with noisy simulated documents.",
        "rollout/noisy_share",
    ),
    "searchrl_train_search_failure_ratio": (
        "Share of the last step's searches that failed or timed out (error observations instead of documents).",
        "rollout/search_failure_rate",
    ),
    "searchrl_train_idle_share": (
        "Share of the last step's wall time the trainer spent outside the update (sampling or waiting for groups, "
        "pushing weights).",
        "time/trainer_idle_share",
    ),
    "searchrl_train_episodes_per_second": ("Episodes trained per second of the last step.", "time/episodes_per_s"),
    "searchrl_train_stream_lag": (
        "rollout.mode=async: tasks not started, tasks being sampled and groups not yet read (0 in sync mode).",
        "stream/lag",
    ),
    "searchrl_train_group_age_versions": (
        "rollout.mode=async: mean policy versions between the weights that sampled the last step's groups and the "
        "weights they trained.",
        "stream/group_age_versions",
    ),
    "searchrl_train_group_age_seconds": (
        "rollout.mode=async: mean seconds from a task's creation to the update that trained its group.",
        "stream/group_age_s",
    ),
    "searchrl_train_stale_groups": (
        "rollout.mode=async: groups skipped so far for lagging more than rollout.max_staleness versions.",
        "stream/stale_groups_total",
    ),
}


class TrainerGauges:
    """The trainer's Prometheus gauges in their own registry, optionally served on ``/metrics``.

    Args:
        port: serve the registry on this port (0: do not serve; read it with :meth:`exposition`).
        host: bind address (loopback by default).
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.registry = r = CollectorRegistry()
        self.step = Gauge("searchrl_train_step", "Last finished GRPO step.", registry=r)
        self.scalars = {key: Gauge(name, doc, registry=r) for name, (doc, key) in SCALARS.items()}
        self.step_seconds = Gauge(
            "searchrl_train_step_seconds", "Seconds of the last step by phase.", ["phase"], registry=r
        )
        self.guard = Gauge(
            "searchrl_train_guard_tripped", "1 when the guard tripped on the last step, else 0.", ["guard"], registry=r
        )
        self.update(0, {}, {})
        self._server: Any = None
        self.port = 0
        if port:
            self._server, _thread = start_http_server(port, addr=host, registry=r)
            self.port = int(self._server.server_port)

    def update(self, step: int, metrics: Mapping[str, float], tripped: Mapping[str, bool]) -> None:
        """Sets every gauge from one step's metrics (missing ones: 0)."""
        self.step.set(step)
        for key, gauge in self.scalars.items():
            gauge.set(metrics.get(key, 0.0))
        for p in PHASES:
            self.step_seconds.labels(p).set(metrics.get(f"time/{p}_s", 0.0))
        for g in GUARDS:
            self.guard.labels(g).set(1.0 if tripped.get(g) else 0.0)

    def exposition(self) -> str:
        """The registry in the Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()

    def close(self) -> None:
        """Stops the HTTP server, if any."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def rollout_metrics(episodes: Sequence[Any], scores: Sequence[Any]) -> dict[str, float]:
    """The ``reward/*`` and ``rollout/*`` metrics of one step's :class:`~searchrl.agent.loop.Episode` list and their
    :class:`~searchrl.reward.scoring.ScoreResult` list (same order); groups are keyed by ``question_id``."""
    from searchrl.rollout.v1 import rollout_pb2

    rewards = [s.reward for s in scores]
    n = max(len(episodes), 1)
    searches = [len(ep.searches) for ep in episodes]
    calls = [s for ep in episodes for s in ep.searches]
    with_docs = [s for s in calls if s.documents]
    noisy = [s for s in with_docs if any(d.quality == rollout_pb2.DOCUMENT_QUALITY_NOISY for d in s.documents)]
    # Groups whose rewards are all equal give zero advantage: no learning signal from them.
    groups: dict[str, list[float]] = {}
    for ep, r in zip(episodes, rewards, strict=True):
        groups.setdefault(ep.question_id, []).append(r)
    flat = sum(1 for g in groups.values() if len(set(g)) == 1)
    return {
        "reward/mean": float(np.mean(rewards)),
        "reward/std": float(np.std(rewards)),
        "reward/max": float(np.max(rewards)),
        "reward/min": float(np.min(rewards)),
        "reward/f1": float(np.mean([s.f1 for s in scores])),
        "reward/em": float(np.mean([s.em for s in scores])),
        "reward/format_rate": float(np.mean([1.0 if s.format_ok else 0.0 for s in scores])),
        "reward/answer_rate": float(np.mean([1.0 if s.answer else 0.0 for s in scores])),
        "reward/flat_group_share": flat / max(len(groups), 1),
        "rollout/searches_per_episode": float(np.mean(searches)),
        "rollout/search_error_rate": (sum(1 for s in calls if s.error) / len(calls)) if calls else 0.0,
        # service failures only (errors, timeouts), not the policy's invalid queries: guards.search_failure
        "rollout/searches": float(sum(s.sent for s in calls)),
        "rollout/search_failures": float(sum(s.failed for s in calls)),
        "rollout/search_failure_rate": sum(s.failed for s in calls) / max(sum(s.sent for s in calls), 1),
        "rollout/search_cache_hit_rate": (sum(1 for s in calls if s.cache_hit) / len(calls)) if calls else 0.0,
        "rollout/noisy_share": (len(noisy) / len(with_docs)) if with_docs else 0.0,
        # ZeroSearch's simulated search engine's share of the searches sent (backend=mixed: about 1 - mix_ratio)
        "rollout/simulator_search_share": sum(1 for s in calls if s.sent and s.backend == "simulator")
        / max(sum(s.sent for s in calls), 1),
        "rollout/response_length": float(np.mean([len(ep.response_ids) for ep in episodes])),
        "rollout/prompt_length": float(np.mean([len(ep.prompt_ids) for ep in episodes])),
        "rollout/generated_tokens": float(np.mean([sum(ep.loss_mask) for ep in episodes])),
        "rollout/turns": float(np.mean([len(ep.turns) for ep in episodes])),
        "rollout/ended_with_eos": sum(1 for ep in episodes if ep.ended_with_eos) / n,
        "rollout/episodes": float(len(episodes)),
    }
