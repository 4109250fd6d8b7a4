"""The trainer's Prometheus metrics on the verl path (RayJob): one exporter on the Ray head, fed by every process.

On the local path the trainer process owns :class:`~searchrl.trainer.telemetry.TrainerGauges`. Under verl the work
is spread over Ray processes: the TaskRunner logs each step's metrics through verl's ``Tracking`` object, and the
agent-loop workers run the episodes (and so see every search). :class:`MetricsHub` gathers both in one place:

* it runs as the named Ray actor ``searchrl-metrics`` (:data:`HUB_NAME`), pinned to the head node
  (``node:__internal_head__``), and serves ``/metrics`` on ``SEARCHRL_METRICS_PORT`` (9095; the chart's PodMonitor
  scrapes the RayJob's head pod there);
* :func:`install_tracking_hook` wraps ``verl.utils.tracking.Tracking.log`` in the TaskRunner so every step's
  metrics also reach the hub (``searchrl_train_step``, ``searchrl_train_reward_mean`` from ``critic/score/mean``,
  ``searchrl_train_kl`` from ``actor/kl_loss``, ``searchrl_train_step_seconds{phase}`` from ``timing_s/*``);
* the ``searchrl_research`` agent loop reports each episode's searches with :func:`report_episode`
  (``searchrl_policy_searches_total{backend,outcome}``, and per step ``searchrl_train_searches_per_episode`` and
  ``searchrl_train_search_failure_ratio``).

The hub is a plain class; :func:`start_hub` makes it a Ray actor, and tests drive it directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from prometheus_client import Counter

from searchrl.trainer.telemetry import TrainerGauges

log = logging.getLogger(__name__)

HUB_NAME = "searchrl-metrics"
DEFAULT_PORT = 9095

# verl metric -> our step phase (searchrl_train_step_seconds{phase})
VERL_TIMINGS = {"timing_s/gen": "rollout", "timing_s/reward": "reward", "timing_s/update_actor": "update",
                "timing_s/step": "total"}  # fmt: skip


class MetricsHub:
    """Aggregates the verl path's metrics and serves them in the Prometheus format.

    Args:
        port: HTTP port of ``/metrics`` (0: do not serve; read :meth:`exposition`).
        host: bind address (``0.0.0.0`` in a pod so Prometheus can reach it).
    """

    def __init__(self, port: int = DEFAULT_PORT, host: str = "0.0.0.0") -> None:
        self.gauges = TrainerGauges(port, host)
        self.searches_total = Counter(
            "searchrl_policy_searches_total",
            "Searches made by the policy in agent-loop episodes, by backend and outcome (ok, empty, error, "
            "timeout, invalid_query, disabled).",
            ["backend", "outcome"],
            registry=self.gauges.registry,
        )
        self._episodes = 0
        self._searches = 0
        self._failed = 0

    def port(self) -> int:
        """The port ``/metrics`` is served on (0 when not served)."""
        return self.gauges.port

    def record_episode(self, outcomes: Mapping[str, int], searches: int, failed: int) -> None:
        """Adds one episode's searches.

        Args:
            outcomes: ``{"<backend>/<outcome>": count}``.
            searches: searches sent to a backend (valid queries).
            failed: how many of them failed (error or timeout).
        """
        for key, n in outcomes.items():
            backend, _, outcome = key.partition("/")
            self.searches_total.labels(backend, outcome or "unknown").inc(n)
        self._episodes += 1
        self._searches += int(searches)
        self._failed += int(failed)

    def log(self, data: Mapping[str, Any], step: int) -> None:
        """One verl step's metrics (what ``Tracking.log`` receives); closes the step's search tally."""
        metrics: dict[str, float] = {}
        for key, value in data.items():
            try:
                metrics[key] = float(value)
            except (TypeError, ValueError):
                continue
        mapped = {
            "reward/mean": metrics.get("critic/score/mean", 0.0),
            "actor/kl": metrics.get("actor/kl_loss", 0.0),
            "rollout/searches_per_episode": self._searches / self._episodes if self._episodes else 0.0,
            "rollout/search_failure_rate": self._failed / self._searches if self._searches else 0.0,
        }
        for verl_key, phase in VERL_TIMINGS.items():
            mapped[f"time/{phase}_s"] = metrics.get(verl_key, 0.0)
        tripped = {"search_failure": False}
        self.gauges.update(int(step), mapped, tripped)
        self._episodes = self._searches = self._failed = 0

    def exposition(self) -> str:
        """The metrics in the Prometheus text format."""
        return self.gauges.exposition()


def start_hub(port: int | None = None) -> Any:
    """Starts (or finds) the ``searchrl-metrics`` actor on the Ray head node; returns its handle.

    Args:
        port: the ``/metrics`` port (default ``SEARCHRL_METRICS_PORT``, else 9095).

    Raises:
        RuntimeError: Ray is not initialised in this process.
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("start_hub needs a running Ray (call it from the TaskRunner)")
    port = int(os.environ.get("SEARCHRL_METRICS_PORT", DEFAULT_PORT)) if port is None else port
    actor = ray.remote(MetricsHub).options(  # type: ignore[attr-defined]
        name=HUB_NAME, get_if_exists=True, num_cpus=0, resources={"node:__internal_head__": 0.001}
    )
    return actor.remote(port, os.environ.get("SEARCHRL_METRICS_HOST", "0.0.0.0"))


def install_tracking_hook(hub: Any) -> None:
    """Wraps ``verl.utils.tracking.Tracking.log`` in this process so each step's metrics also go to ``hub``."""
    from verl.utils.tracking import Tracking

    original = Tracking.log
    if getattr(original, "_searchrl_hook", False):
        return

    def hooked_log(self: Any, data: Any, step: Any, backend: Any = None) -> None:
        original(self, data=data, step=step, backend=backend)
        try:
            hub.log.remote(dict(data), int(step))
        except Exception as exc:  # noqa: BLE001 - metrics must never stop training
            log.warning("could not forward step metrics to %s: %s", HUB_NAME, exc)

    hooked_log._searchrl_hook = True  # type: ignore[attr-defined]
    Tracking.log = hooked_log  # type: ignore[method-assign]


_hub_handle: Any = None
_hub_missing = False


def report_episode(outcomes: Mapping[str, int], searches: int, failed: int) -> None:
    """Sends one episode's search tally to the hub when this process runs inside the RayJob (else does nothing)."""
    global _hub_handle, _hub_missing
    if _hub_missing:
        return
    if _hub_handle is None:
        try:
            import ray

            if not ray.is_initialized():
                _hub_missing = True
                return
            _hub_handle = ray.get_actor(HUB_NAME)
        except Exception:  # noqa: BLE001 - no hub (e.g. verl started without our entrypoint)
            _hub_missing = True
            log.info("no %s actor: episode search counts stay in this worker's log", HUB_NAME)
            return
    _hub_handle.record_episode.remote(dict(outcomes), int(searches), int(failed))
