"""Per-example scores, per-dataset/method summaries, markdown/CSV tables and the paired bootstrap.

Answer metrics follow the QA evaluations of FlashRAG, Search-R1, ZeroSearch and ReSearch (SQuAD normalisation:
lower-case, strip punctuation, the articles a/an/the and extra whitespace; max over the gold answers):

* **EM**: normalised answer equals a normalised gold answer (the metric of the ZeroSearch tables).
* **F1**: token-level F1 between answer and gold, max over gold answers.
* **accuracy**: a normalised gold answer appears in the normalised answer as a whole-word span ("cover EM", the
  substring accuracy Search-R1 and FanOutQA report); kinder than EM to correct but verbose answers.

EM, F1 and normalisation come from the reward library (:mod:`searchrl.reward.scoring`), so evaluation and
training rewards agree.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Order of methods in tables: the baselines first, as the papers' tables do.
METHOD_ORDER = ("direct", "rag", "agent")


def method_rank(method: str) -> int:
    """Sort key of a method in tables: its place in :data:`METHOD_ORDER`, other methods after."""
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def answer_accuracy(answer: str, golden_answers: Sequence[str]) -> float:
    """1.0 when a normalised gold answer occurs in the normalised answer on word boundaries, else 0.0.

    Args:
        answer: the extracted answer (empty: 0.0).
        golden_answers: accepted answers.
    """
    from searchrl.reward.scoring import normalize_answer

    pred = normalize_answer(answer)
    if not pred:
        return 0.0
    for gold in golden_answers:
        g = normalize_answer(gold)
        if g and re.search(rf"(?<!\S){re.escape(g)}(?!\S)", pred):
            return 1.0
    return 0.0


def answer_scores(answer: str, golden_answers: Sequence[str]) -> dict[str, float]:
    """EM, F1 and accuracy of one extracted answer against its gold answers (each in [0, 1])."""
    from searchrl.reward.scoring import exact_match, f1_score

    golds = list(golden_answers)
    return {
        "em": float(exact_match(answer, golds)),
        "f1": float(f1_score(answer, golds)),
        "accuracy": answer_accuracy(answer, golds),
    }


@dataclass
class SummaryRow:
    """Aggregate of one (dataset, method) pair; rates are fractions in [0, 1].

    Attributes:
        dataset: dataset name.
        method: ``direct``, ``rag`` or ``agent``.
        n: number of examples.
        em, f1, accuracy: mean exact match, token F1 and accuracy.
        format_valid: share of responses that pass the ReSearch format rules.
        searches_per_question: mean number of searches made per question.
        mean_turns: mean number of assistant turns.
        mean_generated_tokens: mean number of tokens the policy sampled per question.
        mean_latency_ms: mean wall-clock time per question, in milliseconds.
    """

    dataset: str
    method: str
    n: int
    em: float
    f1: float
    accuracy: float
    format_valid: float
    searches_per_question: float
    mean_turns: float
    mean_generated_tokens: float
    mean_latency_ms: float


SUMMARY_FIELDS = tuple(SummaryRow.__dataclass_fields__)


def summarize(records: Iterable[Mapping[str, Any]]) -> list[SummaryRow]:
    """Means per (dataset, method) over per-example records (as written to ``records.jsonl``).

    Args:
        records: dicts with at least ``dataset``, ``method``, ``em``, ``f1``, ``accuracy``, ``format_valid``,
            ``num_searches``, ``turns``, ``generated_tokens`` and ``latency_ms``.

    Returns:
        One row per pair, datasets in first-seen order and methods in the order direct, rag, agent.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    order: dict[str, int] = {}
    for r in records:
        order.setdefault(r["dataset"], len(order))
        groups.setdefault((r["dataset"], r["method"]), []).append(r)

    def mean(rows: list[Mapping[str, Any]], key: str) -> float:
        return float(np.mean([float(x[key]) for x in rows])) if rows else 0.0

    out = []
    for ds, method in sorted(groups, key=lambda pair: (order[pair[0]], method_rank(pair[1]), pair[1])):
        rows = groups[(ds, method)]
        out.append(
            SummaryRow(
                dataset=ds,
                method=method,
                n=len(rows),
                em=mean(rows, "em"),
                f1=mean(rows, "f1"),
                accuracy=mean(rows, "accuracy"),
                format_valid=mean(rows, "format_valid"),
                searches_per_question=mean(rows, "num_searches"),
                mean_turns=mean(rows, "turns"),
                mean_generated_tokens=mean(rows, "generated_tokens"),
                mean_latency_ms=mean(rows, "latency_ms"),
            )
        )
    return out


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}"


def summary_table_markdown(rows: Sequence[SummaryRow]) -> str:
    """The summary as a GitHub markdown table: EM/F1/accuracy/format-valid in %, searches, turns, tokens, latency."""
    head = "| dataset | method | n | EM | F1 | Acc | format ok | searches/q | turns | gen tokens | latency s |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r.dataset} | {r.method} | {r.n} | {_pct(r.em)} | {_pct(r.f1)} | {_pct(r.accuracy)} | {_pct(r.format_valid)} "
            f"| {r.searches_per_question:.2f} | {r.mean_turns:.2f} | {r.mean_generated_tokens:.0f} | {r.mean_latency_ms / 1000:.2f} |"
        )
    return "\n".join(lines) + "\n"


def pivot_table_markdown(rows: Sequence[SummaryRow], metric: str = "em") -> str:
    """One metric (in %) with a row per method and a column per dataset plus the unweighted average, as in the
    ZeroSearch / Search-R1 result tables.

    Raises:
        ValueError: ``metric`` is not a summary field.
    """
    if metric not in SUMMARY_FIELDS or metric in ("dataset", "method", "n"):
        raise ValueError(f"unknown metric {metric!r}")
    datasets: list[str] = []
    methods: list[str] = []
    cell: dict[tuple[str, str], float] = {}
    for r in rows:
        if r.dataset not in datasets:
            datasets.append(r.dataset)
        if r.method not in methods:
            methods.append(r.method)
        cell[(r.method, r.dataset)] = float(getattr(r, metric))
    methods.sort(key=method_rank)
    lines = ["| method | " + " | ".join(datasets) + " | avg |", "|---|" + "---:|" * (len(datasets) + 1)]
    for m in methods:
        vals = [cell.get((m, d)) for d in datasets]
        present = [v for v in vals if v is not None]
        avg = _pct(float(np.mean(present))) if present else "-"
        lines.append(f"| {m} | " + " | ".join("-" if v is None else _pct(v) for v in vals) + f" | {avg} |")
    return "\n".join(lines) + "\n"


def summary_csv(rows: Sequence[SummaryRow]) -> str:
    """The summary as CSV text (header = :data:`SUMMARY_FIELDS`, rates as fractions)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SUMMARY_FIELDS), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(asdict(r))
    return buf.getvalue()


@dataclass
class BootstrapResult:
    """Difference of means of paired scores, ``mean(b - a)``, with a percentile bootstrap confidence interval.

    Attributes:
        n: number of paired examples.
        mean_a, mean_b: the two means.
        diff: ``mean_b - mean_a``.
        ci_low, ci_high: the bootstrap interval of ``diff`` at ``confidence``.
        confidence: e.g. 0.95.
    """

    n: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    confidence: float

    @property
    def significant(self) -> bool:
        """True when the interval excludes 0."""
        return self.ci_low > 0 or self.ci_high < 0


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, n_resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> BootstrapResult:
    """Paired bootstrap of the mean difference ``b - a`` (Efron & Tibshirani 1993; Koehn 2004 for NLP metrics).

    Resamples the examples (the per-example differences) with replacement ``n_resamples`` times and takes the
    percentile interval, via :func:`scipy.stats.bootstrap` with ``method="percentile"``.

    Args:
        a, b: per-example scores of the two systems on the same examples, same order (length n).
        n_resamples: bootstrap resamples.
        confidence: confidence level in (0, 1).
        seed: seed of the resampling (same seed, same interval).

    Raises:
        ValueError: different lengths, no examples, or confidence outside (0, 1).
    """
    from scipy import stats

    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape or xa.ndim != 1:
        raise ValueError(f"paired scores must be two 1-D sequences of equal length, got {xa.shape} and {xb.shape}")
    if xa.size == 0:
        raise ValueError("no paired examples to compare")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    d = xb - xa
    diff = float(d.mean())
    if d.size < 2 or np.all(d == d[0]):
        lo = hi = diff  # every resample has the same mean
    else:
        res = stats.bootstrap(
            (d,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=confidence,
            method="percentile",
            batch=1000,
            rng=np.random.default_rng(seed),
        )
        lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isnan(lo) or math.isnan(hi):
        lo = hi = diff
    return BootstrapResult(
        n=int(d.size),
        mean_a=float(xa.mean()),
        mean_b=float(xb.mean()),
        diff=diff,
        ci_low=lo,
        ci_high=hi,
        confidence=confidence,
    )
