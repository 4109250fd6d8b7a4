"""Benchmark runs: datasets, EM/F1/accuracy, search statistics, baselines, tables, plots, MLflow.

The Python API (what ``searchrl eval`` and the demo call)::

    from searchrl.evaluator import EvalConfig, evaluate, summary_table_markdown

    result = await evaluate(policy_backend, search_backend, ["bench:bamboogle"], ["direct", "rag", "agent"],
                            "runs/eval", config=EvalConfig(max_new_tokens=128), limit=20)
    print(summary_table_markdown(result.rows), result.run_id)

Modules: :mod:`~searchrl.data.datasets` (FlashRAG jsonl, bundled benchmarks, FanOutQA),
:mod:`~searchrl.evaluator.runner` (the methods and the resumable driver), :mod:`~searchrl.evaluator.metrics`
(summaries, tables, paired bootstrap), :mod:`~searchrl.evaluator.compare`, :mod:`~searchrl.evaluator.plots`,
:mod:`~searchrl.evaluator.tracking` (MLflow) and :mod:`~searchrl.evaluator.cli`.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "evaluate": "searchrl.evaluator.runner",
    "evaluate_sync": "searchrl.evaluator.runner",
    "EvalConfig": "searchrl.evaluator.runner",
    "EvalResult": "searchrl.evaluator.runner",
    "EvalAborted": "searchrl.evaluator.runner",
    "summary_table_markdown": "searchrl.evaluator.metrics",
    "pivot_table_markdown": "searchrl.evaluator.metrics",
    "summarize": "searchrl.evaluator.metrics",
    "SummaryRow": "searchrl.evaluator.metrics",
    "paired_bootstrap": "searchrl.evaluator.metrics",
    "load_dataset": "searchrl.data.datasets",
    "Dataset": "searchrl.data.datasets",
    "compare_records": "searchrl.evaluator.compare",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # lazy: importing the package does not import torch / mlflow / matplotlib
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(name)
