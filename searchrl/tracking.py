"""MLflow tracking of training and evaluation runs, through an explicit :class:`mlflow.MlflowClient` (no process-global
``mlflow.set_tracking_uri`` or active run, so several trainers, evaluations and tests can share a process).

Tracking URI precedence (:func:`resolve_tracking_uri`): an explicit URI (``--mlflow-uri``,
``logging.mlflow_tracking_uri``), then ``$MLFLOW_TRACKING_URI``, then a local SQLite store ``<out_dir>/mlflow.db``.
A new experiment in a SQLite store keeps its artifacts next to the database (``<db folder>/mlartifacts``), not under
the current directory. Needs the ``mlflow`` package (the ``trainer`` and ``evaluator`` extras).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


def resolve_tracking_uri(out_dir: str | Path, tracking_uri: str | None = None) -> str:
    """The tracking URI to use (see the module docstring); ``out_dir`` hosts the default store."""
    if tracking_uri:
        return tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{(Path(out_dir).expanduser() / 'mlflow.db').resolve()}"


def mlflow_client(tracking_uri: str) -> Any:
    """An ``MlflowClient`` on ``tracking_uri``, with the SQLite store's migration chatter silenced."""
    from mlflow import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri)


def mlflow_key(name: str) -> str:
    """``name`` with every character MLflow rejects in a param or metric key replaced by ``_``."""
    return "".join(c if c.isalnum() or c in "_-./ :" else "_" for c in name)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"a.b.c": leaf}``."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MlflowRun:
    """One MLflow run (created, or re-opened on resume). As a context manager it finishes the run ``FINISHED``, or
    ``FAILED`` when the block raises.

    Args:
        tracking_uri: MLflow tracking URI (``sqlite:///...``, ``file:...``, ``http://mlflow:5000``); see
            :func:`resolve_tracking_uri`.
        experiment: experiment name (created when missing).
        run_name: run name for a new run.
        run_id: re-open this run (resume) instead of creating one; a run the store does not know (e.g. a checkpoint
            moved to another tracking store) is logged and a new run is created.
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
        self.client = mlflow_client(tracking_uri)
        self.tracking_uri = tracking_uri
        if run_id:
            try:
                self.run_id: str = self.client.get_run(run_id).info.run_id
            except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException / OSError variants
                log.warning("MLflow run %s not found in %s (%s): starting a new run", run_id, tracking_uri, exc)
                run_id = None
            else:
                self.client.update_run(self.run_id, status="RUNNING")
        if not run_id:
            run = self.client.create_run(self._experiment_id(experiment), run_name=run_name, tags=dict(tags or {}))
            self.run_id = str(run.info.run_id)

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return str(exp.experiment_id)
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            location = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        return str(self.client.create_experiment(name, artifact_location=location))

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Logs parameters; nested mappings are flattened to dotted keys, values stringified and cut to MLflow's
        6,000-character limit."""
        from mlflow.entities import Param

        items = [Param(mlflow_key(k), str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's per-batch limit: 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Logs metrics at ``step`` in as few batch calls as MLflow allows."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(mlflow_key(k), float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_datasets(self, datasets: Sequence[tuple[str, str, str]]) -> None:
        """Logs ``(name, digest, source)`` triples as MLflow dataset inputs (digests cut to MLflow's 36 characters)."""
        from mlflow.entities import Dataset, DatasetInput

        inputs = [DatasetInput(Dataset(name=n, digest=d[:36], source_type="local", source=s)) for n, d, s in datasets]
        if inputs:
            self.client.log_inputs(self.run_id, datasets=inputs)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Uploads a file or folder; failures are logged, never raised (artifacts are a convenience)."""
        try:
            p = Path(path)
            if p.is_dir():
                self.client.log_artifacts(self.run_id, str(p), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(p), artifact_path)
        except Exception as exc:  # noqa: BLE001 - a full artifact store must not stop the job
            log.warning("could not upload %s to MLflow: %s", path, exc)

    def set_tag(self, key: str, value: str) -> None:
        """Sets a run tag."""
        self.client.set_tag(self.run_id, key, value)

    def finish(self, status: str = "FINISHED") -> None:
        """Marks the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self.client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> MlflowRun:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.finish("FAILED" if exc_type is not None else "FINISHED")
