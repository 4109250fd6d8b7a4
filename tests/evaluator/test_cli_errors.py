"""``searchrl eval`` bad input: clear messages and exit code 2, before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from searchrl.errors import FailedPrecondition
from searchrl.evaluator.cli import main
from searchrl.evaluator.records import RecordStore


def _eval(tmp_path: Path, *extra: str) -> list[str]:
    return ["--out", str(tmp_path / "out"), "--no-mlflow", "--no-progress", "--search", "none", *extra]


def test_row_without_gold_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "qa.jsonl"
    rows = [
        {"id": "a", "question": "Who?", "golden_answers": ["x"]},
        {"id": "b", "question": "What?", "golden_answers": []},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(_eval(tmp_path, "--dataset", str(f))) == 2
    err = capsys.readouterr().err
    assert f"{f}:2: row has no gold answers" in err
    assert not (tmp_path / "out" / "records.jsonl").exists()


def test_empty_dataset_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    assert main(_eval(tmp_path, "--dataset", str(f))) == 2
    assert "is empty" in capsys.readouterr().err


def test_bad_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_eval(tmp_path, "--dataset", "bench:bamboogle", "--method", "rag")) == 2
    assert "rag baseline needs a search backend" in capsys.readouterr().err
    assert main(_eval(tmp_path, "--dataset", "bench:bamboogle", "--method", "sft")) == 2
    assert "unknown method 'sft'" in capsys.readouterr().err
    assert main(_eval(tmp_path, "--dataset", "bench:nosuch")) == 2
    assert "unknown benchmark 'nosuch'" in capsys.readouterr().err
    assert main(_eval(tmp_path, "--dataset", "bench:bamboogle", "--max-turns", "0")) == 2
    assert "max_turns must be >= 1" in capsys.readouterr().err
    assert main(_eval(tmp_path, "--dataset", "bench:bamboogle", "--scheme", "bogus")) == 2
    assert "bogus" in capsys.readouterr().err
    argv = ["--out", str(tmp_path / "o"), "--no-mlflow", "--search", "simulator", "--dataset", "bench:bamboogle"]
    assert main(argv) == 2
    assert "--simulator-target" in capsys.readouterr().err


async def test_resume_refuses_records_of_other_settings(tmp_path: Path) -> None:
    """An output directory holding records of another model/config is not silently mixed into a new run."""
    from searchrl.evaluator.driver import evaluate
    from searchrl.evaluator.methods import EvalConfig

    class _Tok:
        chat_template = "x"

    class _Policy:
        tokenizer = _Tok()
        model_name = "model-b"

    out = tmp_path / "out"
    (out).mkdir()
    (out / "eval.json").write_text(
        json.dumps({"fingerprint": {"model": "model-a", "search": "none", "temperature": 0.0}})
    )
    with RecordStore(out) as st:
        st.append({"dataset": "bamboogle", "method": "direct", "id": "test_0", "em": 1.0})
    with pytest.raises(FailedPrecondition, match=r"model: 'model-a' -> 'model-b'.*--restart"):
        await evaluate(
            _Policy(), None, ["bench:bamboogle"], ["direct"], out, config=EvalConfig(), limit=1, mlflow=False
        )
