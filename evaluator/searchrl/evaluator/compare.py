"""``searchrl eval compare RUN_A RUN_B``: per-dataset EM/F1 differences with paired bootstrap confidence intervals.

A run is an evaluation output directory (holding ``records.jsonl``), a ``records.jsonl`` file, or an MLflow run id
(its ``records.jsonl`` artifact is downloaded). Examples are paired by ``(dataset, id)``; only ids both runs hold
count, so a partial run can be compared with a full one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchrl.errors import InvalidRequest
from searchrl.evaluator.metrics import BootstrapResult, method_rank, paired_bootstrap
from searchrl.evaluator.records import read_records


@dataclass
class ComparisonRow:
    """B minus A on one dataset and method pair.

    Attributes:
        dataset: dataset name.
        method_a, method_b: the methods compared (equal unless asked otherwise).
        em, f1: bootstrap results of the per-example EM and F1 differences.
        only_a, only_b: examples present in just one run (not compared).
    """

    dataset: str
    method_a: str
    method_b: str
    em: BootstrapResult
    f1: BootstrapResult
    only_a: int
    only_b: int


def load_run_records(run: str, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Records of a run given as a directory, a jsonl file or an MLflow run id (its ``records.jsonl`` artifact, from
    ``tracking_uri``, default ``$MLFLOW_TRACKING_URI``).

    Raises:
        InvalidRequest: nothing usable at that path / id, or a run id without a tracking URI.
    """
    p = Path(run).expanduser()
    if p.exists():
        records: list[dict[str, Any]] = read_records(p)
        return records
    from searchrl.tracking import mlflow_client

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not uri:
        raise InvalidRequest(
            f"{run!r} is not an eval output directory, and no MLflow tracking URI is set (--mlflow-uri)"
        )
    with tempfile.TemporaryDirectory(prefix="searchrl-compare-") as d:
        try:
            path = mlflow_client(uri).download_artifacts(run, "records.jsonl", d)
        except Exception as exc:  # noqa: BLE001 - MLflow raises MlflowException / OSError variants
            raise InvalidRequest(f"cannot load records of MLflow run {run!r} from {uri}: {exc}") from None
        records = read_records(path)
    return records


def _index(records: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, Mapping[str, Any]]]:
    out: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for r in records:
        out.setdefault((str(r["dataset"]), str(r["method"])), {})[str(r["id"])] = r
    return out


def compare_records(
    records_a: Sequence[Mapping[str, Any]],
    records_b: Sequence[Mapping[str, Any]],
    *,
    method_a: str | None = None,
    method_b: str | None = None,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[ComparisonRow]:
    """Paired comparison of two sets of records, per dataset (and method).

    Args:
        records_a, records_b: per-example records (``dataset``, ``method``, ``id``, ``em``, ``f1``).
        method_a, method_b: compare method ``method_a`` of A with ``method_b`` of B (e.g. ``direct`` vs ``agent``
            of one run); by default every method both runs hold, like with like.
        n_resamples, confidence, seed: of :func:`searchrl.evaluator.metrics.paired_bootstrap`.

    Returns:
        One row per dataset/method pair with at least one shared example.

    Raises:
        InvalidRequest: the two runs share no example.
    """
    ia, ib = _index(records_a), _index(records_b)
    if (method_a is None) != (method_b is None):
        method_a = method_a or method_b
        method_b = method_b or method_a
    pairs: list[tuple[str, str, str]] = []
    datasets = list(dict.fromkeys([d for d, _ in ia] + [d for d, _ in ib]))
    for ds in datasets:
        if method_a is not None and method_b is not None:
            if (ds, method_a) in ia and (ds, method_b) in ib:
                pairs.append((ds, method_a, method_b))
            continue
        methods = [m for (d, m) in ia if d == ds and (d, m) in ib]
        methods.sort(key=method_rank)
        pairs += [(ds, m, m) for m in methods]
    rows: list[ComparisonRow] = []
    for ds, ma, mb in pairs:
        a, b = ia[(ds, ma)], ib[(ds, mb)]
        shared = [i for i in a if i in b]
        if not shared:
            continue
        em, f1 = (
            paired_bootstrap(
                [float(a[i][metric]) for i in shared],
                [float(b[i][metric]) for i in shared],
                n_resamples=n_resamples,
                confidence=confidence,
                seed=seed,
            )
            for metric in ("em", "f1")
        )
        rows.append(ComparisonRow(ds, ma, mb, em, f1, only_a=len(a) - len(shared), only_b=len(b) - len(shared)))
    if not rows:
        raise InvalidRequest("the two runs share no (dataset, method, id) examples to compare")
    return rows


def _cells(r: ComparisonRow) -> list[str]:
    """The table cells of one row, in points of %."""

    def diff(b: BootstrapResult) -> str:
        return f"{100 * b.diff:+.1f} [{100 * b.ci_low:+.1f}, {100 * b.ci_high:+.1f}]" + (" *" if b.significant else "")

    method = r.method_a if r.method_a == r.method_b else f"{r.method_a} → {r.method_b}"
    em, f1 = r.em, r.f1
    return [r.dataset, method, str(em.n), f"{100 * em.mean_a:.1f}", f"{100 * em.mean_b:.1f}", diff(em),
            f"{100 * f1.mean_a:.1f}", f"{100 * f1.mean_b:.1f}", diff(f1)]  # fmt: skip


def _legend(rows: Sequence[ComparisonRow], label_a: str, label_b: str) -> tuple[int, str]:
    conf = int(round(100 * rows[0].em.confidence)) if rows else 95
    return conf, f"A = {label_a}, B = {label_b}; paired bootstrap {conf}% CI, points of %; * = CI excludes 0"


def comparison_table_markdown(rows: Sequence[ComparisonRow], label_a: str = "A", label_b: str = "B") -> str:
    """Rows as a markdown table, B minus A in points of %; ``*`` marks an interval that excludes 0."""
    conf, legend = _legend(rows, label_a, label_b)
    lines = [
        legend,
        "",
        f"| dataset | method | n | EM A | EM B | ΔEM [{conf}% CI] | F1 A | F1 B | ΔF1 [{conf}% CI] |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *("| " + " | ".join(_cells(r)) + " |" for r in rows),
    ]
    return "\n".join(lines) + "\n"


def print_comparison(
    rows: Sequence[ComparisonRow], label_a: str = "A", label_b: str = "B", console: Any = None
) -> None:
    """Prints the comparison as a rich table."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    t = Table(title=f"B - A  ({_legend(rows, label_a, label_b)[1]})")
    for col in ("dataset", "method", "n", "EM A", "EM B", "ΔEM [CI]", "F1 A", "F1 B", "ΔF1 [CI]"):
        t.add_column(col, justify="left" if col in ("dataset", "method") else "right")
    for r in rows:
        t.add_row(*_cells(r))
    con.print(t)
    skipped = [(r.dataset, r.only_a, r.only_b) for r in rows if r.only_a or r.only_b]
    for ds, oa, ob in skipped:
        con.print(f"[dim]{ds}: {oa} examples only in A and {ob} only in B were left out[/dim]")
