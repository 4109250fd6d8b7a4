"""Benchmark runs: datasets, EM/F1/accuracy, search statistics, baselines, tables, plots, MLflow.

The Python API (what ``searchrl eval`` and the demo call)::

    from searchrl.evaluator import EvalConfig, evaluate, summary_table_markdown

    result = await evaluate(policy_backend, search_backend, ["bench:bamboogle"], ["direct", "rag", "agent"],
                            "runs/eval", config=EvalConfig(max_new_tokens_per_turn=128), limit=20)
    print(summary_table_markdown(result.rows), result.run_id)

Modules: :mod:`~searchrl.data.datasets` (FlashRAG jsonl, bundled benchmarks, FanOutQA),
:mod:`~searchrl.evaluator.methods` (direct, rag, agent), :mod:`~searchrl.evaluator.driver` (the resumable driver and
its MLflow run), :mod:`~searchrl.evaluator.metrics` (summaries, tables, paired bootstrap),
:mod:`~searchrl.evaluator.compare`, :mod:`~searchrl.evaluator.plots` and :mod:`~searchrl.evaluator.cli`.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "evaluate": "searchrl.evaluator.driver",
    "EvalConfig": "searchrl.evaluator.methods",
    "EvalResult": "searchrl.evaluator.driver",
    "EvalAborted": "searchrl.evaluator.driver",
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
