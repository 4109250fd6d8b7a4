"""Answer coverage and answerable sets (``searchrl.trainer.answerable``) on a real FAISS index and the real embedder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from searchrl.data.datasets import Example, read_flashrag_jsonl
from searchrl.errors import InvalidRequest
from searchrl.retriever.index.load import LoadedIndex
from searchrl.reward.scoring import normalize_answer
from searchrl.trainer import answerable, data

# title -> (text, a phrase that occurs in this passage only)
PASSAGES = {
    "Eiffel Tower": ("The Eiffel Tower is a wrought-iron lattice tower in Paris, designed by the engineer Gustave Eiffel.",
                     "Gustave Eiffel"),
    "Party": ("A party is a gathering of people invited by a host for socialising and entertainment.", "socialising"),
    "Mona Lisa": ("The Mona Lisa is a portrait painting by Leonardo da Vinci, a masterpiece of the Italian Renaissance.",
                  "Leonardo da Vinci"),
    "Mount Everest": ("Mount Everest is the highest mountain above sea level, in the Himalayas between Nepal and China.",
                      "Himalayas"),
    "Dracula": ("Dracula is an 1897 Gothic horror novel by the Irish author Bram Stoker.", "Bram Stoker"),
    "Python (programming language)": ("Python is a high-level programming language created by Guido van Rossum.",
                                      "Guido van Rossum"),
    "Nile": ("The Nile is a major river in northeastern Africa that flows into the Mediterranean Sea.",
             "Mediterranean Sea"),
    "Hamlet": ("Hamlet is a tragedy by William Shakespeare set in the Kingdom of Denmark.", "Kingdom of Denmark"),
    "Saturn": ("Saturn is the sixth planet from the Sun, known for its prominent ring system.", "sixth planet"),
    "Tokyo": ("Tokyo is the capital of Japan and one of the most populous cities in the world.", "capital of Japan"),
}  # fmt: skip

QUESTIONS = [  # (question, gold answers): several per evidence page, one repeat, one unanswerable
    ("Who designed the Eiffel Tower?", ["Gustave Eiffel"]),
    ("In which city is the Eiffel Tower?", ["Paris"]),
    ("What is the Eiffel Tower made of?", ["wrought-iron", "iron"]),
    ("Who painted the Mona Lisa?", ["Leonardo da Vinci", "Leonardo"]),
    ("Who wrote Dracula?", ["Bram Stoker"]),
    ("who wrote DRACULA", ["Stoker"]),  # the same normalised question
    ("When was Dracula published?", ["1897"]),
    ("Who created the Python programming language?", ["Guido van Rossum"]),
    ("Into which sea does the Nile flow?", ["Mediterranean Sea"]),
    ("Where is Hamlet set?", ["Denmark"]),
    ("Who wrote Hamlet?", ["William Shakespeare"]),
    ("Which planet is sixth from the Sun?", ["Saturn"]),
    ("What is the capital of Japan?", ["Tokyo"]),
    ("In which mountain range is Mount Everest?", ["Himalayas"]),
    ("Between which countries is Mount Everest?", ["Nepal"]),
    ("Who won the 1954 football World Cup?", ["West Germany"]),  # not in the corpus
]


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from searchrl.retriever.index.build import build_index

    root = tmp_path_factory.mktemp("tiny-corpus")
    corpus = root / "corpus.jsonl"
    with corpus.open("w", encoding="utf-8") as fh:
        for i, (title, (text, _marker)) in enumerate(PASSAGES.items()):
            fh.write(json.dumps({"id": f"p{i}", "contents": f'"{title}"\n{text}'}) + "\n")
    build_index(str(corpus), root / "flat", index_type="flat", progress=False, torch_threads=1)
    return root / "flat"


@pytest.fixture(scope="module")
def loaded(tiny_index: Path) -> Iterator[LoadedIndex]:
    index = answerable.open_index(tiny_index, torch_threads=1)
    yield index
    index.close()


@pytest.fixture(scope="module")
def questions_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("questions") / "tiny.jsonl"
    rows = [{"id": f"q{i}", "question": q, "golden_answers": a, "metadata": {}} for i, (q, a) in enumerate(QUESTIONS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_whole_word_matching_and_skipped_answers() -> None:
    assert not answerable.contains_answer(normalize_answer("A great party was held."), ["art"])
    assert answerable.contains_answer(normalize_answer("Modern Art, in Paris"), ["art"])
    assert answerable.usable_answers(["The", "a", "X", "  Art! ", "art", "Guido van Rossum"]) == [
        "art",
        "guido van rossum",
    ]
    matcher = answerable.CorpusMatcher(["A party; then a PARTY.", "Python was created by Guido van Rossum."])
    assert matcher.contains("party") and not matcher.contains("art")
    assert matcher.contains("guido van rossum") and not matcher.contains("guido rossum")
    assert not matcher.contains("party python")  # never across two passages


def test_answer_recall_counts_only_top_k_hits(loaded: LoadedIndex) -> None:
    question = "Who designed the Eiffel Tower in Paris?"
    _scores, rows = loaded.search([question], loaded.size)
    titles = [loaded.store.title_of(r) for r in rows[0].tolist()]
    marker = {t: m for t, (_text, m) in PASSAGES.items()}
    examples = [
        Example("r2", question, (marker[titles[1]],), source="s"),  # only in the rank-2 passage
        Example("last", question, (marker[titles[-1]],), source="s"),  # only in the last-ranked passage
        Example("art", question, ("art",), source="s"),  # "party" holds "art", but not as a word
        Example("none", question, ("West Germany",), source="s"),  # nowhere
        Example("empty", question, ("The", "x"), source="s"),  # answers skipped: empty or one character
        Example("r1", question, (marker[titles[0]], "Zanzibar"), source="t"),  # rank 1 via its first answer
    ]
    cov = answerable.measure_coverage(examples, top_k=[1, 2, 3], index=loaded)
    s, t = cov["s"], cov["t"]
    assert list(cov) == ["s", "t"]
    assert (s.questions, s.in_corpus) == (5, 2)
    assert dict(s.recall_hits) == {1: 0, 2: 1, 3: 1}
    assert s.answer_recall(2) == pytest.approx(0.2) and s.in_corpus_share == pytest.approx(0.4)
    assert dict(t.recall_hits) == {1: 1, 2: 1, 3: 1} and t.in_corpus == 1
    # the in-corpus check can run on other texts than the index's passages
    other = answerable.measure_coverage(examples[2:4], top_k=3, index=loaded, corpus_texts=["the art of war"])
    assert other["s"].in_corpus == 1 and other["s"].recall_hits[3] == 0
    with pytest.raises(InvalidRequest):
        answerable.measure_coverage(examples, top_k=0, index=loaded)


def _read_all(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_sets_split_by_entity_and_are_deterministic(
    loaded: LoadedIndex, tiny_index: Path, questions_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pyarrow.parquet as pq

    spec = f"tiny={questions_file}"
    sets = answerable.build_answerable_sets(
        [spec], tmp_path / "a", top_k=3, fractions=(0.5, 0.25, 0.25), seed=0, index=loaded, coverage_sources=None
    )
    cov = sets.coverage["tiny"]
    assert cov.questions == len(QUESTIONS) and cov.in_corpus < cov.questions
    kept = sum(sets.rows.values())
    assert 0 < kept <= cov.recall_hits[3] - 1  # the repeated question is dropped
    assert all(sets.rows[s] > 0 for s in answerable.SPLITS), sets.rows

    train = pq.read_table(sets.train_path).to_pylist()
    assert len(train) == sets.train_rows and {r["extra_info"]["split"] for r in train} == {"train"}
    assert data.read_parquet_examples(sets.train_path)[0].question == train[0]["extra_info"]["question"]
    entities = {"train": {r["extra_info"]["entity"] for r in train}}
    questions = {"train": {normalize_answer(r["extra_info"]["question"]) for r in train}}
    for name, path in (("dev", sets.dev_path), ("heldout", sets.heldout_path)):
        rows, skipped = read_flashrag_jsonl(path)
        assert skipped == 0 and len(rows) == sets.rows[name]
        entities[name] = {r.metadata["entity"] for r in rows}
        questions[name] = {normalize_answer(r.question) for r in rows}
        assert {r.metadata["source"] for r in rows} == {"tiny"}
    for a, b in (("train", "dev"), ("train", "heldout"), ("dev", "heldout")):
        assert not entities[a] & entities[b] and not questions[a] & questions[b]
    assert sum(len(q) for q in questions.values()) == kept  # no repeat within a split either
    # the entity is the evidence page: the highest-ranked top-3 passage holding the answer
    assert entities["train"] | entities["dev"] | entities["heldout"] <= {normalize_answer(t) for t in PASSAGES}
    report = json.loads(sets.coverage_json.read_text())
    assert report["sets"]["train"]["rows"] == sets.train_rows
    assert "answer recall@3 %" in sets.coverage_md.read_text()

    # the CLI with the same inputs writes byte-identical files (index loaded anew, in another folder)
    rc = data.main(["prepare", "--answerable", "--source", spec, "--coverage-source", spec, "--top-k", "3",
                    "--fractions", "0.5,0.25,0.25", "--index", str(tiny_index), "--torch-threads", "1",
                    "--out", str(tmp_path / "b")])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "Answerable sets" in out and "answer recall@3 %" in out
    assert _read_all(tmp_path / "a") == _read_all(tmp_path / "b")
    other = answerable.build_answerable_sets(
        [spec], tmp_path / "c", fractions=(0.5, 0.25, 0.25), seed=1, index=loaded, coverage_sources=None
    )
    assert sum(other.rows.values()) == kept


def test_coverage_cli(tiny_index: Path, questions_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = data.main(["coverage", "--sources", f"tiny={questions_file}", "--top-k", "1", "3",
                    "--index", str(tiny_index), "--torch-threads", "1"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "answer recall@1 %" in out and "answer recall@3 %" in out
    assert data.main(["coverage", "--sources", "bench:nope", "--index", str(tiny_index)]) == 2
    with pytest.raises(SystemExit):
        data.main(["prepare", "--answerable", "--fractions", "0.5,0.6,0.1"])
