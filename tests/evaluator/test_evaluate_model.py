"""The evaluator on the real CPU model (SmolLM2-135M-Instruct) and a real RetrievalService over the bundled
Wikipedia index: 20 Bamboogle questions with each method, summary checked against the per-example records,
tables/plots/MLflow, and resume."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from searchrl.data.datasets import load_dataset
from searchrl.evaluator.driver import evaluate
from searchrl.evaluator.methods import EvalConfig
from searchrl.evaluator.records import read_records
from searchrl.reward.scoring import exact_match, f1_score, normalize_answer, score

N_QUESTIONS = 20
CFG = EvalConfig(
    max_new_tokens_per_turn=32, max_response_tokens=192, max_turns=2, top_k=3, max_doc_chars=300,
    concurrency=N_QUESTIONS,
)  # fmt: skip


@pytest.fixture(scope="module")
def engine(policy_path: str) -> Iterator[Any]:
    import asyncio

    from searchrl.services.policy.engines.transformers import TransformersEngine

    eng = TransformersEngine(policy_path, max_batch_size=N_QUESTIONS)
    yield eng
    asyncio.run(eng.close())


@pytest.fixture(scope="module")
def retriever_target() -> Iterator[str]:
    """A real ``searchrl serve retriever`` over the bundled Wikipedia summaries (index built once, cached)."""
    from searchrl.retriever.index.wiki import ensure_wiki_index
    from searchrl.testing import ServiceProcess

    index_dir = ensure_wiki_index("flat", progress=False)
    with ServiceProcess("retriever", ["--index-dir", str(index_dir), "--use-gpu", "false"]) as proc:
        yield proc.target


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@pytest.mark.slow
async def test_twenty_bamboogle_questions_each_method(engine: Any, retriever_target: str, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from searchrl.agent.search import RetrieverSearch

    out = tmp_path / "eval"
    search = RetrieverSearch(retriever_target)
    try:
        result = await evaluate(
            engine, search, ["bench:bamboogle"], ["all"], out, config=CFG, model="smollm2-135m-instruct", search_name="retriever",
            limit=N_QUESTIONS, mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        )  # fmt: skip
    finally:
        await search.close()
    assert result.new_examples == 3 * N_QUESTIONS and result.resumed_examples == 0

    # --- per-example records, read back from disk
    records = read_records(out / "records.jsonl")
    assert len(records) == 3 * N_QUESTIONS
    ds = load_dataset("bench:bamboogle", limit=N_QUESTIONS)
    golds = {e.id: list(e.golden_answers) for e in ds}
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
        assert r["golden_answers"] == golds[r["id"]]
        # The stored scores are those of the stored answer.
        assert r["em"] == exact_match(r["answer"], r["golden_answers"])
        assert math.isclose(r["f1"], f1_score(r["answer"], r["golden_answers"]))
        pred = normalize_answer(r["answer"])
        assert r["accuracy"] == float(
            bool(pred) and any(f" {normalize_answer(g)} " in f" {pred} " for g in r["golden_answers"])
        )
        assert r["latency_ms"] > 0 and r["generated_tokens"] > 0 and r["prompt_tokens"] > 0
        assert r["num_searches"] == len(r["searches"])
        if r["method"] != "agent":
            ended = r["finish_reason"] in ("stop", "eos")
            assert r["format_valid"] == score(r["response"], r["golden_answers"], "research", ended).format_ok
    assert sorted(by_method) == ["agent", "direct", "rag"]
    assert all(len(v) == N_QUESTIONS for v in by_method.values())
    assert all(r["num_searches"] == 0 and r["turns"] == 1 for r in by_method["direct"])
    for r in by_method["rag"]:  # one real retrieval with the question, three Wikipedia documents
        (s,) = r["searches"]
        assert (
            s["query"] == r["question"] and s["error"] == "" and len(s["titles"]) == 3 and s["backend"] == "retriever"
        )
    assert all(1 <= r["turns"] <= CFG.max_turns for r in by_method["agent"])

    # --- the summary equals a recomputation from the records
    rows = {(row.dataset, row.method): row for row in result.rows}
    assert set(rows) == {("bamboogle", m) for m in ("direct", "rag", "agent")}
    for m, recs in by_method.items():
        row = rows[("bamboogle", m)]
        assert row.n == N_QUESTIONS
        for field, key in (
            ("em", "em"),
            ("f1", "f1"),
            ("accuracy", "accuracy"),
            ("searches_per_question", "num_searches"),
            ("mean_turns", "turns"),
        ):
            assert math.isclose(getattr(row, field), _mean([float(r[key]) for r in recs]), abs_tol=1e-12), (m, field)
        assert math.isclose(row.format_valid, _mean([float(r["format_valid"]) for r in recs]))
    with open(out / "summary.csv", newline="") as fh:
        csv_rows = list(csv.DictReader(fh))
    assert [(c["dataset"], c["method"]) for c in csv_rows] == [
        ("bamboogle", "direct"),
        ("bamboogle", "rag"),
        ("bamboogle", "agent"),
    ]
    for c in csv_rows:
        assert math.isclose(float(c["f1"]), rows[(c["dataset"], c["method"])].f1)
    md = (out / "summary.md").read_text()
    assert "| bamboogle | rag | 20 |" in md and "## EM (%)" in md
    for png in ("metrics_by_dataset.png", "searches_per_question.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    # --- MLflow: params with the dataset version, metrics per dataset/method, artifacts
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["dataset.bamboogle.version"] == ds.version
    assert run.data.params["model"] == "smollm2-135m-instruct" and run.data.params["search_backend"] == "retriever"
    assert math.isclose(run.data.metrics["bamboogle/agent/f1"], rows[("bamboogle", "agent")].f1, abs_tol=1e-9)
    assert math.isclose(run.data.metrics["bamboogle/rag/searches_per_question"], 1.0)
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {
        "records.jsonl",
        "summary.md",
        "summary.csv",
        "metrics_by_dataset.png",
        "searches_per_question.png",
        "eval.json",
    } <= names
    assert json.loads((out / "eval.json").read_text())["mlflow"]["run_id"] == result.run_id

    # --- rerunning the same command computes nothing and reproduces the summary
    again = await evaluate(
        engine, None, ["bench:bamboogle"], ["direct"], out, config=CFG, model="smollm2-135m-instruct", search_name="retriever",
        limit=N_QUESTIONS, mlflow=False,
    )  # fmt: skip
    assert again.new_examples == 0 and again.resumed_examples == N_QUESTIONS
    assert again.rows[0] == rows[("bamboogle", "direct")]
