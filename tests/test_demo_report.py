"""The demo's learning-effect table: paired by question, after minus before, with a bootstrap CI that excludes 0
only when the gain is consistent."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from searchrl.demo import learning_effect


def _records(f1: list[float], fmt: list[bool]) -> SimpleNamespace:
    rows = [
        {
            "dataset": "heldout",
            "method": "agent",
            "id": f"q{i}",
            "em": float(v == 1.0),
            "f1": v,
            "format_valid": ok,
            "reward": (v if v > 0 else 0.1) if ok else 0.0,
        }
        for i, (v, ok) in enumerate(zip(f1, fmt, strict=True))
    ]
    # a baseline row of another method must not be paired with the agent's
    rows.append(
        {
            "dataset": "heldout",
            "method": "direct",
            "id": "q0",
            "em": 1.0,
            "f1": 1.0,
            "format_valid": True,
            "reward": 1.0,
        }
    )
    return SimpleNamespace(records=rows)


def test_learning_effect_pairs_questions_and_brackets_the_gain() -> None:
    n = 60
    before = _records([0.0] * n, [i % 2 == 0 for i in range(n)])
    after = _records([1.0 if i % 3 == 0 else 0.0 for i in range(n)], [True] * n)
    rows = {r["metric"]: r for r in learning_effect(before, after)}
    assert set(rows) == {"em", "f1", "format_valid", "reward"}
    f1 = rows["f1"]
    assert f1["n"] == n and f1["before"] == 0.0 and f1["after"] == pytest.approx(1 / 3)
    assert 0.0 < f1["ci_low"] < f1["diff"] < f1["ci_high"]
    assert rows["format_valid"]["diff"] == pytest.approx(0.5) and rows["format_valid"]["ci_low"] > 0
    # no change: the interval is the point 0
    same = learning_effect(before, before)
    assert all(r["diff"] == 0.0 and r["ci_low"] == 0.0 == r["ci_high"] for r in same)
