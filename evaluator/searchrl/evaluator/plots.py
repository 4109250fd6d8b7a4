"""PNG plots of an evaluation (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from searchrl.evaluator.metrics import SummaryRow, method_rank


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_metrics(
    rows: Sequence[SummaryRow], path: str | Path, metrics: Sequence[str] = ("em", "f1", "accuracy")
) -> Path:
    """Grouped bars of each metric (in %) by dataset, one bar per method; one panel per metric.

    Args:
        rows: summary rows.
        path: PNG file to write.
        metrics: summary fields to plot.

    Returns:
        ``path``.
    """
    plt = _pyplot()
    datasets = list(dict.fromkeys(r.dataset for r in rows))
    methods = sorted(dict.fromkeys(r.method for r in rows), key=method_rank)
    cell = {(r.dataset, r.method): r for r in rows}
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    x = np.arange(len(datasets))
    width = 0.8 / max(1, len(methods))
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, m in enumerate(methods):
            vals = [100.0 * float(getattr(cell[(d, m)], metric)) if (d, m) in cell else 0.0 for d in datasets]
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, vals, width, label=m)
        ax.set_xticks(x, datasets, rotation=20, ha="right")
        ax.set_title(
            {"em": "EM", "f1": "F1", "accuracy": "accuracy", "format_valid": "format valid"}.get(metric, metric)
            + " (%)"
        )
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(title="method", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_searches(records: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Distribution of the number of searches per question: one bar group per count, one bar per dataset of the
    ``agent`` method (``direct`` and ``rag`` always make 0 and 1 searches; they are drawn only without agent records).

    Returns:
        ``path``.
    """
    plt = _pyplot()
    counts: dict[tuple[str, str], list[int]] = {}
    for r in records:
        counts.setdefault((str(r["dataset"]), str(r["method"])), []).append(int(r.get("num_searches", 0)))
    series = {k: v for k, v in counts.items() if k[1] == "agent"} or counts
    max_n = max((max(v) for v in series.values() if v), default=0)
    bins = np.arange(max_n + 1)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(bins)), 3.6))
    width = 0.8 / max(1, len(series))
    for i, ((ds, m), vals) in enumerate(series.items()):
        share = np.bincount(np.asarray(vals, dtype=int), minlength=max_n + 1) / max(1, len(vals))
        ax.bar(bins + (i - (len(series) - 1) / 2) * width, 100.0 * share, width, label=f"{ds} / {m}")
    ax.set_xticks(bins)
    ax.set_xlabel("searches per question")
    ax.set_ylabel("% of questions")
    ax.set_title("Searches per question")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
