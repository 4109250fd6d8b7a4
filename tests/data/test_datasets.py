"""Dataset loading: FlashRAG jsonl validation, bundled benchmarks, FanOutQA, slicing and versions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from searchrl.data.datasets import DatasetError, benchmark_file, load_dataset, read_flashrag_jsonl
from searchrl.errors import InvalidRequest


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _row(i: int, golds: object = None) -> dict[str, object]:
    return {
        "id": f"q{i}",
        "question": f"question {i}?",
        "golden_answers": [f"answer {i}"] if golds is None else golds,
        "metadata": {"i": i},
    }


def test_row_without_gold_answers_names_file_and_line(tmp_path: Path) -> None:
    f = _write(tmp_path / "bad.jsonl", [_row(0), _row(1), _row(2, golds=[])])
    with pytest.raises(DatasetError) as ei:
        load_dataset(str(f))
    msg = str(ei.value)
    assert f"{f}:3" in msg and "no gold answers" in msg
    assert isinstance(ei.value, InvalidRequest)  # maps to INVALID_ARGUMENT


def test_missing_golden_answers_key_and_blank_answers(tmp_path: Path) -> None:
    row = _row(0)
    del row["golden_answers"]
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: row has no gold answers"):
        read_flashrag_jsonl(_write(tmp_path / "bad.jsonl", [row]))
    with pytest.raises(DatasetError, match="all entries of 'golden_answers' are empty"):
        read_flashrag_jsonl(_write(tmp_path / "blank.jsonl", [_row(0, golds=["", "  "])]))


def test_skip_invalid_counts_and_keeps_good_rows(tmp_path: Path) -> None:
    f = _write(tmp_path / "mixed.jsonl", [_row(0), _row(1, golds=[]), "{not json", _row(3), _row(3)])
    ds = load_dataset(f"mine={f}", skip_invalid=True)
    assert ds.name == "mine"
    assert [e.id for e in ds] == ["q0", "q3"]
    assert ds.skipped == 3  # no golds, bad JSON, duplicate id
    with pytest.raises(DatasetError, match=r"mixed\.jsonl:2: row has no gold answers"):
        load_dataset(str(f))  # without skip_invalid the first bad row fails the load
    with pytest.raises(DatasetError, match=r"json\.jsonl:2: not valid JSON"):
        read_flashrag_jsonl(_write(tmp_path / "json.jsonl", [_row(0), "{x"]))


def test_empty_file_and_missing_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="is empty"):
        load_dataset(str(empty))
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(str(tmp_path / "nope.jsonl"))
    only_bad = _write(tmp_path / "onlybad.jsonl", [_row(0, golds=[])])
    with pytest.raises(DatasetError, match="no valid rows"):
        load_dataset(str(only_bad), skip_invalid=True)


def test_bundled_benchmarks_and_slicing() -> None:
    for name in ("bamboogle", "hotpotqa", "2wikimultihopqa", "musique", "nq", "triviaqa", "popqa"):
        assert benchmark_file(name).is_file()
    bam = load_dataset("bench:bamboogle")
    assert bam.name == "bamboogle" and len(bam) == bam.total_rows == 100
    assert bam.examples[0].golden_answers == ("james madison",)
    first = load_dataset("bench:bamboogle", limit=20)
    assert [e.id for e in first] == [e.id for e in bam.examples[:20]]
    s1 = load_dataset("bench:bamboogle", limit=20, sample_seed=7)
    s2 = load_dataset("bench:bamboogle", limit=20, sample_seed=7)
    s3 = load_dataset("bench:bamboogle", limit=20, sample_seed=8)
    assert [e.id for e in s1] == [e.id for e in s2] != [e.id for e in s3]
    assert len({e.id for e in s1}) == 20
    # The version hashes the rows used: equal rows, equal version; other rows, another version.
    assert s1.version == s2.version != s3.version != first.version
    assert len(first.version) == 64
    assert load_dataset("bench:musique").source.endswith("dev.jsonl")  # the eval split, never train
    assert load_dataset("bench:musique/train", limit=1).name == "musique-train"
    with pytest.raises(DatasetError, match="unknown benchmark"):
        load_dataset("bench:nosuch")
    with pytest.raises(DatasetError, match="did you mean bench:bamboogle"):
        load_dataset("bamboogle")
    with pytest.raises(DatasetError, match="limit must be >= 1"):
        load_dataset("bench:bamboogle", limit=0)


def test_fanoutqa_top_level_and_sub_questions() -> None:
    top = load_dataset("fanoutqa")
    assert top.name == "fanoutqa" and len(top) == 310
    first = top.examples[0]
    # A dict answer becomes one "key: value; ..." gold string; the structured answer stays in the metadata.
    assert first.golden_answers[0].startswith("Pat Burrell: Right; Mark Mulder: Left")
    assert isinstance(first.metadata["answer"], dict)
    sub = load_dataset("fanoutqa-sub")
    assert len(sub) + sub.skipped == 2193 and sub.skipped <= 2
    s0 = sub.examples[0]
    assert s0.metadata["parent_id"] == first.id and s0.metadata["evidence_title"]
    assert s0.golden_answers == ("Pat Burrell, Mark Mulder, Corey Patterson, Jeff Austin, JD Drew",)
    assert all(e.golden_answers[0] for e in sub)
