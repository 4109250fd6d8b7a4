"""MLflow logging of evaluation runs, through an explicit :class:`mlflow.MlflowClient` (no global fluent state, so
an evaluation inside a training process does not disturb the trainer's active run).

Tracking URI precedence: the ``tracking_uri`` argument (``--mlflow-uri``), then ``MLFLOW_TRACKING_URI``, then a local
SQLite store ``<out_dir>/mlflow.db`` with artifacts under ``<out_dir>/mlartifacts``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "searchrl-eval"


def resolve_tracking_uri(out_dir: str | Path, tracking_uri: str | None = None) -> str:
    """The tracking URI to use (see the module docstring)."""
    if tracking_uri:
        return tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


def _client(tracking_uri: str) -> Any:
    import logging

    from mlflow import MlflowClient

    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri)


def _experiment_id(client: Any, name: str, tracking_uri: str, out_dir: Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    artifact_location = None
    if tracking_uri.startswith("sqlite:///") or tracking_uri.startswith("file:") or "://" not in tracking_uri:
        # A local store: keep artifacts next to the run rather than under the current directory.
        artifact_location = (out_dir / "mlartifacts").resolve().as_uri()
    return str(client.create_experiment(name, artifact_location=artifact_location))


def log_evaluation(
    *,
    out_dir: str | Path,
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    artifacts: Sequence[str | Path],
    datasets: Sequence[tuple[str, str, str]] = (),
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, str]:
    """Logs one finished evaluation as an MLflow run.

    Args:
        out_dir: the evaluation's output directory (hosts the default store).
        params: run parameters (model, datasets and their versions, method, search backend, sampling ...); values
            are stringified and cut to MLflow's 6000-character limit.
        metrics: metric name -> value, e.g. ``bamboogle/agent/em``.
        artifacts: files logged at the artifact root (records, tables, plots).
        datasets: ``(name, digest, source)`` of every dataset, logged as MLflow dataset inputs.
        tracking_uri: overrides ``MLFLOW_TRACKING_URI`` and the default store.
        experiment: experiment name (created when missing).
        run_name: display name of the run.
        tags: extra run tags.

    Returns:
        ``(run_id, tracking_uri)``.
    """
    from mlflow.entities import Dataset, DatasetInput, Metric, Param, RunTag

    out = Path(out_dir)
    uri = resolve_tracking_uri(out, tracking_uri)
    client = _client(uri)
    exp_id = _experiment_id(client, experiment, uri, out)
    run = client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
    run_id = str(run.info.run_id)
    try:
        now = int(time.time() * 1000)
        plist = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        mlist = [Metric(str(k), float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, max(len(plist), len(mlist)), 100):  # MLflow's per-batch limit is 100 params / 1000 metrics
            client.log_batch(
                run_id,
                metrics=mlist[i : i + 100],
                params=plist[i : i + 100],
                tags=[RunTag("searchrl.kind", "eval")] if i == 0 else [],
            )
        if datasets:
            client.log_inputs(
                run_id,
                datasets=[
                    DatasetInput(Dataset(name=n, digest=d[:36], source_type="local", source=s)) for n, d, s in datasets
                ],
            )
        for a in artifacts:
            if Path(a).is_file():
                client.log_artifact(run_id, str(a))
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id, uri


def download_records(run_id: str, dst_dir: str | Path, tracking_uri: str | None = None) -> Path:
    """Fetches ``records.jsonl`` of an evaluation run into ``dst_dir``.

    Raises:
        searchrl.errors.InvalidRequest: no such run, or it has no ``records.jsonl`` artifact.
    """
    from searchrl.errors import InvalidRequest

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise InvalidRequest(
            f"{run_id!r} is not an eval output directory, and no MLflow tracking URI is set (--mlflow-uri)"
        )
    client = _client(uri)
    try:
        client.get_run(run_id)
        return Path(client.download_artifacts(run_id, "records.jsonl", str(dst_dir)))
    except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException / OSError variants
        raise InvalidRequest(f"cannot load records of MLflow run {run_id!r} from {uri}: {exc}") from None
