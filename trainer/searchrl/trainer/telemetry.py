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
``searchrl_train_guard_tripped{guard}``      1 when the guard tripped on the last step, else 0
==========================================  ===========================================================

MLflow: :class:`MlflowRun` talks to the tracking store through an explicit ``MlflowClient`` (no process-global
``mlflow.set_tracking_uri`` / active run), so several trainers and tests can share a process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from searchrl.trainer.guards import GUARDS

log = logging.getLogger(__name__)

PHASES = ("rollout", "reward", "update", "total")


class TrainerGauges:
    """The trainer's Prometheus gauges in their own registry, optionally served on ``/metrics``.

    Args:
        port: serve the registry on this port (0: do not serve; read it with :meth:`exposition`).
        host: bind address (loopback by default).
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge("searchrl_train_step", "Last finished GRPO step.", registry=r)
        self.reward_mean = Gauge("searchrl_train_reward_mean", "Mean episode reward of the last step.", registry=r)
        self.f1_mean = Gauge("searchrl_train_f1_mean", "Mean answer F1 of the last step.", registry=r)
        self.searches = Gauge(
            "searchrl_train_searches_per_episode", "Mean searches per episode of the last step.", registry=r
        )
        self.kl = Gauge(
            "searchrl_train_kl", "Mean per-token KL to the reference policy of the last step (nats).", registry=r
        )
        self.noisy_share = Gauge(
            "searchrl_train_noisy_share",
            "Share of the last step's searches answered with noisy simulated documents.",
            registry=r,
        )
        self.search_failure_ratio = Gauge(
            "searchrl_train_search_failure_ratio",
            "Share of the last step's searches that failed or timed out (error observations instead of documents).",
            registry=r,
        )
        self.step_seconds = Gauge(
            "searchrl_train_step_seconds", "Seconds of the last step by phase.", ["phase"], registry=r
        )
        self.guard = Gauge(
            "searchrl_train_guard_tripped", "1 when the guard tripped on the last step, else 0.", ["guard"], registry=r
        )
        for g in GUARDS:
            self.guard.labels(g).set(0)
        for p in PHASES:
            self.step_seconds.labels(p).set(0)
        self._server: Any = None
        self.port = 0
        if port:
            self._server, _thread = start_http_server(port, addr=host, registry=r)
            self.port = int(self._server.server_port)

    def update(self, step: int, metrics: Mapping[str, float], tripped: Mapping[str, bool]) -> None:
        """Sets every gauge from one step's metrics."""
        self.step.set(step)
        self.reward_mean.set(metrics.get("reward/mean", 0.0))
        self.f1_mean.set(metrics.get("reward/f1", 0.0))
        self.searches.set(metrics.get("rollout/searches_per_episode", 0.0))
        self.kl.set(metrics.get("actor/kl", 0.0))
        self.noisy_share.set(metrics.get("rollout/noisy_share", 0.0))
        self.search_failure_ratio.set(metrics.get("rollout/search_failure_rate", 0.0))
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


def _mlflow_key(name: str) -> str:
    # MLflow keys allow alphanumerics, _ - . / and spaces; keep ours as they are otherwise.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


class MlflowRun:
    """One MLflow run of a training job (created, or re-opened on resume).

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///...``, ``file:...``, ``http://mlflow:5000``).
        experiment: experiment name (created when missing).
        run_name: run name for a new run.
        run_id: re-open this run (resume) instead of creating one.
        tags: tags of a new run.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        if run_id:
            try:
                self.run_id = self.client.get_run(run_id).info.run_id
            except Exception as exc:  # noqa: BLE001 - e.g. a checkpoint moved to another tracking store
                log.warning("MLflow run %s not found in %s (%s): starting a new run", run_id, tracking_uri, exc)
                run_id = None
            else:
                self.client.update_run(self.run_id, status="RUNNING")
        if not run_id:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
            self.run_id = run.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs parameters (values stringified, MLflow's 6,000-character limit respected)."""
        from mlflow.entities import Param

        items = [Param(_mlflow_key(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Logs one step's metrics in one batch call."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(_mlflow_key(k), float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads a file or folder; failures are logged, never raised (artifacts are a convenience)."""
        try:
            p = Path(path)
            if p.is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(p), artifact_path)
        except Exception as exc:  # noqa: BLE001 - a full artifact store must not stop training
            log.warning("could not upload %s to MLflow: %s", path, exc)

    def set_tag(self, key: str, value: str) -> None:
        """Sets a run tag."""
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        """Marks the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self.client.set_terminated(self.run_id, status=status)
