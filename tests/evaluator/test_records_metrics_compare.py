"""Model-free parts: records store and resume, summaries, answer metrics, paired bootstrap, compare, MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from searchrl.errors import InvalidRequest
from searchrl.evaluator.compare import compare_records, comparison_table_markdown, load_run_records
from searchrl.evaluator.metrics import (
    answer_accuracy,
    answer_scores,
    paired_bootstrap,
    pivot_table_markdown,
    summarize,
    summary_csv,
    summary_table_markdown,
)
from searchrl.evaluator.records import RecordStore, read_records


def _rec(ds: str, method: str, i: int, em: float, f1: float | None = None, **kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "dataset": ds, "method": method, "id": f"q{i}", "em": em, "f1": em if f1 is None else f1, "accuracy": em,
        "format_valid": True, "num_searches": 0, "turns": 1, "generated_tokens": 10, "latency_ms": 100.0,
    }  # fmt: skip
    base.update(kw)
    return base


def test_record_store_appends_durably_and_survives_a_torn_line(tmp_path: Path) -> None:
    with RecordStore(tmp_path) as st:
        st.append(_rec("d", "direct", 0, 1.0))
        st.append(_rec("d", "direct", 1, 0.0))
    # A crash in the middle of a write leaves a partial line.
    with open(tmp_path / "records.jsonl", "a", encoding="utf-8") as fh:
        fh.write('{"dataset": "d", "method": "direct", "id": "q2", "em"')
    assert [r["id"] for r in read_records(tmp_path)] == ["q0", "q1"]
    with RecordStore(tmp_path) as st:
        assert st.done_keys() == {("d", "direct", "q0"), ("d", "direct", "q1")}
        st.append(_rec("d", "direct", 2, 1.0))
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["dataset"] == "d" for x in lines)
    with pytest.raises(InvalidRequest, match="no records file"):
        read_records(tmp_path / "missing")


def test_answer_metrics() -> None:
    assert answer_scores("The Titan IIIE", ["Titan IIIE"]) == {"em": 1.0, "f1": 1.0, "accuracy": 1.0}
    s = answer_scores("Titan IIIE rocket", ["Titan IIIE"])
    assert s["em"] == 0.0 and s["accuracy"] == 1.0 and math.isclose(s["f1"], 0.8)
    # accuracy wants whole words: "1" is not inside "1999"
    assert answer_accuracy("1999", ["1"]) == 0.0
    assert answer_accuracy("in 1999 I think", ["1999"]) == 1.0
    assert answer_accuracy("", ["x"]) == 0.0


def test_summary_matches_hand_computation() -> None:
    recs = [
        _rec("a", "agent", 0, 1.0, f1=1.0, num_searches=2, turns=3, format_valid=True),
        _rec("a", "agent", 1, 0.0, f1=0.5, num_searches=0, turns=1, format_valid=False, accuracy=1.0),
        _rec("a", "direct", 0, 0.0, f1=0.0),
        _rec("b", "direct", 0, 1.0),
    ]
    rows = summarize(recs)
    assert [(r.dataset, r.method, r.n) for r in rows] == [("a", "direct", 1), ("a", "agent", 2), ("b", "direct", 1)]
    ag = rows[1]
    assert (ag.em, ag.f1, ag.accuracy, ag.format_valid, ag.searches_per_question, ag.mean_turns) == (
        0.5,
        0.75,
        1.0,
        0.5,
        1.0,
        2.0,
    )
    md = summary_table_markdown(rows)
    assert "| a | agent | 2 | 50.0 | 75.0 | 100.0 | 50.0 | 1.00 | 2.00 |" in md
    piv = pivot_table_markdown(rows, "em")
    assert (
        "| method | a | b | avg |" in piv
        and "| direct | 0.0 | 100.0 | 50.0 |" in piv
        and "| agent | 50.0 | - | 50.0 |" in piv
    )
    assert summary_csv(rows).splitlines()[0].startswith("dataset,method,n,em,f1,accuracy,format_valid")


def test_paired_bootstrap_known_difference() -> None:
    rng = np.random.default_rng(1)
    n = 400
    a = (rng.random(n) < 0.3).astype(float)
    b = a.copy()
    flip = np.flatnonzero(a == 0)[:80]  # B fixes 80 of A's errors and breaks none: diff = +0.2 exactly
    b[flip] = 1.0
    r = paired_bootstrap(a, b, n_resamples=5000, seed=0)
    assert r.n == n and math.isclose(r.diff, 0.2)
    assert r.ci_low < 0.2 < r.ci_high and r.significant
    # The percentile interval agrees with the normal approximation of a mean of paired differences.
    se = np.std(b - a, ddof=1) / math.sqrt(n)
    assert math.isclose(r.ci_high - r.ci_low, 2 * 1.96 * se, rel_tol=0.15)
    assert paired_bootstrap(a, b, n_resamples=5000, seed=0) == r  # seeded: reproducible
    same = paired_bootstrap(a, a)
    assert (same.diff, same.ci_low, same.ci_high, same.significant) == (0.0, 0.0, 0.0, False)
    # Two systems with the same accuracy, errors on different items: no significant difference.
    c = rng.permutation(a)
    null = paired_bootstrap(a, c, n_resamples=5000, seed=0)
    assert null.ci_low < 0 < null.ci_high and not null.significant
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.0])


def _write_run(d: Path, records: list[dict[str, object]]) -> Path:
    d.mkdir(parents=True)
    with RecordStore(d) as st:
        for r in records:
            st.append(r)
    return d


def test_compare_two_synthetic_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    n = 200
    a = [_rec("bamboogle", "agent", i, 1.0 if i % 4 == 0 else 0.0) for i in range(n)]  # EM 25%
    b = [_rec("bamboogle", "agent", i, 1.0 if i % 4 == 0 or i % 4 == 1 else 0.0) for i in range(n)]  # EM 50%
    b += [_rec("bamboogle", "agent", n + i, 1.0) for i in range(10)]  # only in B: left out of the pairing
    b += [_rec("nq", "agent", i, 1.0) for i in range(5)]  # a dataset A lacks: no row
    run_a, run_b = _write_run(tmp_path / "a", a), _write_run(tmp_path / "b", b)
    rows = compare_records(load_run_records(str(run_a)), load_run_records(str(run_b)), n_resamples=2000)
    assert len(rows) == 1
    row = rows[0]
    assert (row.dataset, row.method_a, row.em.n, row.only_a, row.only_b) == ("bamboogle", "agent", n, 0, 10)
    assert math.isclose(row.em.diff, 0.25) and row.em.ci_low > 0.15 and row.em.ci_high < 0.35
    assert "| bamboogle | agent | 200 | 25.0 | 50.0 | +25.0 [" in comparison_table_markdown(rows)

    from searchrl.evaluator.cli import main

    assert main(["compare", str(run_a), str(run_b), "--resamples", "2000"]) == 0
    out = capsys.readouterr().out
    assert "bamboogle" in out and "+25.0" in out
    # Comparing two methods of one run.
    mixed = _write_run(tmp_path / "m", [*a, *[dict(r, method="direct", em=0.0, f1=0.0) for r in a]])
    rows = compare_records(
        read_records(mixed), read_records(mixed), method_a="direct", method_b="agent", n_resamples=2000
    )
    assert rows[0].method_a == "direct" and rows[0].method_b == "agent" and math.isclose(rows[0].em.diff, 0.25)
    # Nothing shared: a clear error, exit code 2.
    other = _write_run(tmp_path / "o", [_rec("popqa", "agent", 0, 1.0)])
    with pytest.raises(InvalidRequest, match="share no"):
        compare_records(read_records(run_a), read_records(other))
    assert main(["compare", str(run_a), str(other)]) == 2
    assert "share no" in capsys.readouterr().err


def test_compare_by_mlflow_run_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from searchrl.evaluator.cli import main
    from searchrl.evaluator.driver import log_evaluation

    a = _write_run(tmp_path / "a", [_rec("hotpotqa", "rag", i, float(i % 2)) for i in range(50)])
    b = _write_run(tmp_path / "b", [_rec("hotpotqa", "rag", i, 1.0) for i in range(50)])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, got_uri = log_evaluation(
        out_dir=tmp_path, params={"model": "m"}, metrics={"hotpotqa/rag/em": 0.5}, artifacts=[a / "records.jsonl"],
        datasets=[("hotpotqa", "ab" * 32, "x.jsonl")], tracking_uri=uri,
    )  # fmt: skip
    assert got_uri == uri
    from mlflow import MlflowClient

    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["model"] == "m" and run.data.metrics["hotpotqa/rag/em"] == 0.5
    assert main(["compare", run_id, str(b), "--mlflow-uri", uri, "--resamples", "1000"]) == 0
    out = capsys.readouterr().out
    assert "hotpotqa" in out and "+50.0" in out
    assert main(["compare", "0123456789abcdef", str(b), "--mlflow-uri", uri]) == 2
    assert "cannot load records of MLflow run" in capsys.readouterr().err
