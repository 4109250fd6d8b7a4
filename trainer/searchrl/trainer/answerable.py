"""Questions the corpus can answer: answer coverage of a retrieval index, and train/dev/held-out sets built from it.

A policy only earns answer F1 when a search can surface the gold answer. Against the bundled index (10,033 Wikipedia
summaries, all-MiniLM-L6-v2, FAISS flat; :func:`searchrl.retriever.index.wiki.ensure_wiki_index`) most bundled
benchmark questions cannot be answered. This module measures, per source:

* **in-corpus coverage**: share of questions whose gold answer (any of ``golden_answers``) occurs in some passage of the
  corpus;
* **answer recall@k**: share of questions whose gold answer occurs in one of the top-k passages the retriever returns
  for the question text itself.

"Occurs" means a whole-word match after the project's answer normalisation
(:func:`searchrl.reward.scoring.normalize_answer`, SQuAD v1.1): the normalised answer, padded with spaces, is a
substring of the normalised passage (``title + " " + text``, as the retriever serves it) padded with spaces, so
``"art"`` does not match ``"party"``. Gold answers that normalise to the empty string or to one character are skipped
(a question without any other answer is never covered).

:func:`build_answerable_sets` keeps the questions with an answer recall@k hit, drops repeated normalised questions and
splits them **by entity**: the entity of a question is the normalised title of its evidence page, the highest-ranked
retrieved passage that holds the answer. An entity's questions all land in one split, picked from the sha256 of the
seed and the entity, so no evidence page and no normalised question is shared between train, dev and held-out.

Both :func:`measure_coverage` and :func:`build_answerable_sets` search the questions in batches through
:meth:`searchrl.retriever.index.load.LoadedIndex.search` (one query-encoder pass and one FAISS call per batch), the
same index and passages the RetrievalService and :class:`~searchrl.retriever.inprocess.InProcessRetriever` serve.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchrl.agent.loop import cut_document_text
from searchrl.data.datasets import Example
from searchrl.errors import InvalidRequest
from searchrl.retriever.engine import RetrievalEngine
from searchrl.retriever.index.load import LoadedIndex, load_index
from searchrl.retriever.index.wiki import resolve_index_dir
from searchrl.retriever.inprocess import InProcessRetriever
from searchrl.reward.scoring import normalize_answer
from searchrl.trainer.data import AGENT_NAME, load_source, to_verl_row, write_parquet

ANSWERABLE_SOURCES: tuple[str, ...] = ("bench:nq", "bench:triviaqa", "bench:popqa", "fanoutqa-sub")
"""Default sources of the answerable sets: the bundled benchmarks with short factoid answers, and FanOutQA's
sub-questions."""
COVERAGE_SOURCES: tuple[str, ...] = (
    *ANSWERABLE_SOURCES,
    "bench:hotpotqa",
    "bench:2wikimultihopqa",
    "bench:musique",
    "bench:bamboogle",
)
"""Every bundled question source; :func:`build_answerable_sets` measures coverage for all of them by default."""
SPLITS: tuple[str, ...] = ("train", "dev", "heldout")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.1, 0.2)
SEARCH_BATCH = 256
"""Questions encoded and searched per FAISS call."""

IndexLike = LoadedIndex | RetrievalEngine | InProcessRetriever | str | Path | None
"""What the functions here accept as the index: a loaded index, an engine or in-process retriever over one (its
index is used), or an index spec for :func:`open_index` (``"wiki"``, ``"wiki:<type>"``, an index directory)."""


# ---------------------------------------------------------------------------------------------------------- matching
def usable_answers(golden_answers: Iterable[str]) -> list[str]:
    """The normalised gold answers used for matching: :func:`normalize_answer` of each, without repeats, without
    answers that normalise to ``""`` or to a single character; first-seen order."""
    out: list[str] = []
    for g in golden_answers:
        a = normalize_answer(str(g))
        if len(a) > 1 and a not in out:
            out.append(a)
    return out


def contains_answer(passage_normalized: str, answers: Sequence[str]) -> bool:
    """Whether any normalised answer occurs as whole words in a normalised passage."""
    padded = f" {passage_normalized} "
    return any(f" {a} " in padded for a in answers)


class CorpusMatcher:
    """Whole-word lookup of normalised answers in a whole corpus.

    The normalised passages are joined into one space-padded string (passages separated by ``" \\n "``, which no
    normalised answer contains, so a match never spans two passages). A lookup first checks that every word and every
    pair of adjacent words of the answer occurs in the corpus (set look-ups) and only then scans the string; results
    are cached per answer.

    Args:
        texts: the passages (raw text; each is normalised with :func:`normalize_answer`).
    """

    def __init__(self, texts: Iterable[str]) -> None:
        normalized = [normalize_answer(t) for t in texts]
        self._big = " " + " \n ".join(normalized) + " "
        self._words: set[str] = set()
        self._pairs: set[tuple[str, str]] = set()
        for text in normalized:
            words = text.split()
            self._words.update(words)
            self._pairs.update(zip(words, words[1:], strict=False))
        self._cache: dict[str, bool] = {}
        self.passages = len(normalized)

    def contains(self, answer_normalized: str) -> bool:
        """Whether the normalised answer occurs as whole words in some passage."""
        hit = self._cache.get(answer_normalized)
        if hit is None:
            words = answer_normalized.split()
            hit = (
                bool(words)
                and all(w in self._words for w in words)
                and all(p in self._pairs for p in zip(words, words[1:], strict=False))
                and f" {answer_normalized} " in self._big
            )
            self._cache[answer_normalized] = hit
        return hit

    def contains_any(self, answers: Sequence[str]) -> bool:
        """Whether any of the normalised answers occurs in the corpus."""
        return any(self.contains(a) for a in answers)


# ---------------------------------------------------------------------------------------------------------- retrieval
def open_index(index: IndexLike = "wiki", *, torch_threads: int = 0) -> LoadedIndex:
    """The :class:`LoadedIndex` behind ``index`` (see :data:`IndexLike`); a spec is loaded on CPU.

    Raises:
        searchrl.errors.FailedPrecondition: the index directory is missing or does not match its model.
    """
    if isinstance(index, LoadedIndex):
        return index
    if isinstance(index, RetrievalEngine):
        return index.index
    if isinstance(index, InProcessRetriever):
        return index.engine.index
    return load_index(resolve_index_dir(index), use_gpu=False, torch_threads=torch_threads)


def passage_text(title: str, text: str) -> str:
    """The passage text matched against answers: the title and the body, as the retriever serves them."""
    return f"{title} {text}" if title else text


@dataclass(frozen=True)
class QuestionEvidence:
    """Where one question's gold answer was found.

    Attributes:
        in_corpus: the answer occurs in some corpus passage.
        hit_rank: 1-based rank of the highest-ranked retrieved passage (for the question text) that holds the answer;
            ``0`` when none of the searched passages does.
        evidence_title: that passage's title (``""`` when ``hit_rank`` is 0).
        evidence_id: that passage's id.
    """

    in_corpus: bool
    hit_rank: int = 0
    evidence_title: str = ""
    evidence_id: str = ""

    def hit_at(self, k: int) -> bool:
        """Answer recall@k hit: the answer is in one of the top-``k`` passages."""
        return 0 < self.hit_rank <= k


def find_evidence(
    examples: Sequence[Example],
    index: LoadedIndex,
    *,
    max_k: int,
    matcher: CorpusMatcher,
    batch_size: int = SEARCH_BATCH,
    max_doc_chars: int = 0,
) -> list[QuestionEvidence]:
    """Searches every question's text and locates its gold answer in the top-``max_k`` passages and in the corpus.

    Args:
        examples: the questions.
        index: the loaded index (queries are encoded ``batch_size`` at a time, one FAISS call per batch).
        max_k: passages searched per question.
        matcher: the corpus for the in-corpus check.
        batch_size: questions per encoder/FAISS batch.
        max_doc_chars: match the answer only in the part of each retrieved passage the agent reads (its text cut as
            :func:`searchrl.agent.loop.cut_document_text` cuts it; 0: the whole passage).

    Returns:
        One :class:`QuestionEvidence` per example, in order.

    Raises:
        InvalidRequest: ``max_k < 1``.
    """
    if max_k < 1:
        raise InvalidRequest(f"top_k must be >= 1, got {max_k}")
    store = index.store
    normalized_rows: dict[int, str] = {}
    out: list[QuestionEvidence] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        _scores, rows = index.search([ex.question for ex in chunk], max_k)
        for ex, ranked in zip(chunk, rows.tolist(), strict=True):
            answers = usable_answers(ex.golden_answers)
            if not answers:
                out.append(QuestionEvidence(in_corpus=False))
                continue
            found = QuestionEvidence(in_corpus=matcher.contains_any(answers))
            for rank, row in enumerate((r for r in ranked if r >= 0), start=1):
                norm = normalized_rows.get(row)
                if norm is None:
                    p = store.get(row)
                    text = cut_document_text(p.text, max_doc_chars)
                    norm = normalized_rows[row] = normalize_answer(passage_text(p.title, text))
                if contains_answer(norm, answers):
                    # a retrieved passage is a corpus passage: a hit is in the corpus even when corpus_texts differ
                    found = QuestionEvidence(True, rank, store.title_of(row), store.id_of(row))
                    break
            out.append(found)
    return out


def corpus_matcher(index: LoadedIndex, corpus_texts: Iterable[str] | None = None) -> CorpusMatcher:
    """A :class:`CorpusMatcher` over ``corpus_texts``, or over every passage (title + text) of the index's store."""
    if corpus_texts is None:
        store = index.store
        corpus_texts = (passage_text(p.title, p.text) for p in (store.get(i) for i in range(store.size)))
    return CorpusMatcher(corpus_texts)


# ---------------------------------------------------------------------------------------------------------- coverage
@dataclass(frozen=True)
class SourceCoverage:
    """Answer coverage of one question source.

    Attributes:
        source: the source name (``Example.source``: ``nq``, ``fanoutqa_sub`` ...; a split name for a chosen set).
        questions: number of questions.
        in_corpus: questions whose gold answer occurs in some corpus passage.
        recall_hits: ``{k: questions whose gold answer is in the top-k passages retrieved for the question}``.
    """

    source: str
    questions: int
    in_corpus: int
    recall_hits: Mapping[int, int] = field(default_factory=dict)

    @property
    def in_corpus_share(self) -> float:
        """In-corpus coverage in [0, 1] (0 for no questions)."""
        return self.in_corpus / self.questions if self.questions else 0.0

    def answer_recall(self, k: int) -> float:
        """Answer recall@k in [0, 1].

        Raises:
            KeyError: ``k`` was not measured.
        """
        return self.recall_hits[k] / self.questions if self.questions else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form: counts and shares (shares rounded to 4 decimals)."""
        return {
            "source": self.source,
            "questions": self.questions,
            "in_corpus": self.in_corpus,
            "in_corpus_share": round(self.in_corpus_share, 4),
            "answer_recall_hits": {str(k): v for k, v in sorted(self.recall_hits.items())},
            "answer_recall": {str(k): round(self.answer_recall(k), 4) for k in sorted(self.recall_hits)},
        }


def _ks(top_k: int | Sequence[int]) -> tuple[int, ...]:
    ks = (top_k,) if isinstance(top_k, int) else tuple(top_k)
    if not ks or any(k < 1 for k in ks):
        raise InvalidRequest(f"top_k must be one or more integers >= 1, got {top_k!r}")
    return tuple(sorted(set(ks)))


def _summarise(source: str, evidence: Sequence[QuestionEvidence], ks: Sequence[int]) -> SourceCoverage:
    return SourceCoverage(
        source=source,
        questions=len(evidence),
        in_corpus=sum(e.in_corpus for e in evidence),
        recall_hits={k: sum(e.hit_at(k) for e in evidence) for k in ks},
    )


def measure_coverage(
    examples: Sequence[Example],
    *,
    top_k: int | Sequence[int] = 3,
    index: IndexLike = "wiki",
    corpus_texts: Iterable[str] | None = None,
    torch_threads: int = 0,
    max_doc_chars: int = 0,
) -> dict[str, SourceCoverage]:
    """In-corpus coverage and answer recall@k of questions, per source.

    Args:
        examples: the questions; grouped by ``Example.source`` (``""`` counts as one source).
        top_k: one k or several (searched once with the largest).
        index: the retrieval index (:data:`IndexLike`); the default is the bundled Wikipedia summaries index.
        corpus_texts: the passages of the in-corpus check (default: every passage of the index, title + text).
        torch_threads: query-encoder threads when ``index`` is a spec that is loaded here (0: torch's default).
        max_doc_chars: answer recall@k counts only the first ``max_doc_chars`` characters of each passage's text,
            what the agent reads (0: whole passages).

    Returns:
        ``{source: SourceCoverage}`` in order of first appearance.

    Raises:
        InvalidRequest: no examples or a ``top_k`` below 1.
        searchrl.errors.FailedPrecondition: the index cannot be loaded.
    """
    if not examples:
        raise InvalidRequest("no questions to measure")
    ks = _ks(top_k)
    loaded = open_index(index, torch_threads=torch_threads)
    matcher = corpus_matcher(loaded, corpus_texts)
    evidence = find_evidence(examples, loaded, max_k=max(ks), matcher=matcher, max_doc_chars=max_doc_chars)
    by_source: dict[str, list[QuestionEvidence]] = {}
    for ex, ev in zip(examples, evidence, strict=True):
        by_source.setdefault(ex.source, []).append(ev)
    return {s: _summarise(s, evs, ks) for s, evs in by_source.items()}


def load_sources(specs: Sequence[str]) -> list[Example]:
    """Every question of each source spec, in order (:func:`searchrl.trainer.data.load_source`: FanOutQA keeps only
    scalar answers; ``Example.source`` is the dataset name). No de-duplication.

    Raises:
        InvalidRequest: a bad spec, missing file or malformed row.
    """
    out: list[Example] = []
    for spec in specs:
        out.extend(load_source(spec))
    return out


def coverage_markdown(rows: Iterable[SourceCoverage], ks: Sequence[int]) -> str:
    """A markdown table: source, questions, in corpus %, answer recall@k % for each k."""
    head = ["source", "questions", "in corpus %", *(f"answer recall@{k} %" for k in ks)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r.source, str(r.questions), f"{100 * r.in_corpus_share:.1f}"]
        cells += [f"{100 * r.answer_recall(k):.1f}" for k in ks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------- sets
@dataclass
class AnswerableSets:
    """What :func:`build_answerable_sets` wrote.

    Attributes:
        train_path: verl RL parquet (:func:`searchrl.trainer.data.to_verl_row` rows, ``extra_info.split == "train"``,
            plus ``extra_info.entity`` and ``extra_info.evidence_title``).
        dev_path: FlashRAG jsonl (``metadata``: ``source``, ``entity``, ``evidence_title``).
        heldout_path: FlashRAG jsonl, same layout.
        rows: ``{split: rows}``.
        by_source: ``{split: {source: rows}}``.
        entities: ``{split: distinct entities}``.
        top_k: the k of the answer recall@k filter.
        coverage: ``{source: SourceCoverage}`` of every measured source (all its questions).
        set_coverage: ``{split: SourceCoverage}`` of the chosen sets (in-corpus and recall@k are 100% by construction).
        coverage_json: ``coverage.json`` (everything above).
        coverage_md: ``coverage.md`` (the two tables).
    """

    train_path: Path
    dev_path: Path
    heldout_path: Path
    rows: dict[str, int]
    by_source: dict[str, dict[str, int]]
    entities: dict[str, int]
    top_k: int
    coverage: dict[str, SourceCoverage]
    set_coverage: dict[str, SourceCoverage]
    coverage_json: Path
    coverage_md: Path

    @property
    def train_rows(self) -> int:
        return self.rows["train"]

    @property
    def dev_rows(self) -> int:
        return self.rows["dev"]

    @property
    def heldout_rows(self) -> int:
        return self.rows["heldout"]


def load_answerable_sets(out_dir: str | Path) -> AnswerableSets:
    """The :class:`AnswerableSets` that :func:`build_answerable_sets` wrote to ``out_dir`` (read back from its
    ``coverage.json``; nothing is recomputed).

    Raises:
        FileNotFoundError: ``out_dir`` holds no complete set (``coverage.json`` or a split file is missing).
    """
    out = Path(out_dir).expanduser()
    report = json.loads((out / "coverage.json").read_text(encoding="utf-8"))
    paths = {"train": out / "train.parquet", "dev": out / "dev.jsonl", "heldout": out / "heldout.jsonl"}
    for p in paths.values():
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing: rebuild the answerable sets")
    top_k = int(report["top_k"])

    def cov(d: Mapping[str, Any]) -> SourceCoverage:
        hits = {int(k): int(v) for k, v in d["answer_recall_hits"].items()}
        return SourceCoverage(d["source"], int(d["questions"]), int(d["in_corpus"]), hits)

    sets = report["sets"]
    counts = {s: int(sets[s]["rows"]) for s in SPLITS}
    return AnswerableSets(
        train_path=paths["train"],
        dev_path=paths["dev"],
        heldout_path=paths["heldout"],
        rows=counts,
        by_source={s: dict(sets[s]["by_source"]) for s in SPLITS},
        entities={s: int(sets[s]["entities"]) for s in SPLITS},
        top_k=top_k,
        coverage={c["source"]: cov(c) for c in report["coverage"]},
        set_coverage={s: SourceCoverage(s, n, n, {top_k: n}) for s, n in counts.items()},
        coverage_json=out / "coverage.json",
        coverage_md=out / "coverage.md",
    )


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``"0.7,0.1,0.2"`` (or three numbers) -> ``(train, dev, heldout)``.

    Raises:
        InvalidRequest: not three numbers, a negative one, no train share, or a sum other than 1 (within 1e-6).
    """
    try:
        parts = [float(x) for x in text.split(",")] if isinstance(text, str) else [float(x) for x in text]
    except ValueError:
        raise InvalidRequest(f"fractions must be three numbers like 0.7,0.1,0.2, got {text!r}") from None
    if len(parts) != 3 or any(x < 0 for x in parts) or parts[0] <= 0 or abs(sum(parts) - 1.0) > 1e-6:
        raise InvalidRequest(f"fractions must be three non-negative numbers summing to 1 with train > 0, got {text!r}")
    return parts[0], parts[1], parts[2]


def entity_split(entity: str, fractions: Sequence[float], seed: int = 0) -> str:
    """The split of an entity: ``sha256(f"{seed}:{entity}")`` read as a number in [0, 1), compared with the cumulative
    ``fractions`` (train, dev, heldout). Independent of the process (no ``hash()`` salt)."""
    digest = hashlib.sha256(f"{seed}:{entity}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def _write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    return path


def build_answerable_sets(
    sources: Sequence[str] = ANSWERABLE_SOURCES,
    out_dir: str | Path = "data/answerable",
    *,
    top_k: int = 3,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    index: IndexLike = "wiki",
    coverage_sources: Sequence[str] | None = COVERAGE_SOURCES,
    protocol: str = "research",
    scheme: str | None = None,
    agent_name: str = AGENT_NAME,
    torch_threads: int = 0,
    max_doc_chars: int = 0,
) -> AnswerableSets:
    """Keeps the questions the retriever can answer and writes entity-disjoint train / dev / held-out sets.

    A question is kept when its gold answer is in the top-``top_k`` passages retrieved for its text (answer recall@k
    hit). Repeated normalised questions keep their first occurrence (``sources`` in order, file order). The entity of
    a question is the normalised title of its evidence page (see the module docstring); :func:`entity_split` puts all
    questions of an entity in one split. Each split is shuffled with ``seed``. Output ids are ``<source>/<id>``
    (unique across sources).

    Files in ``out_dir``: ``train.parquet`` (verl RL rows from :func:`searchrl.trainer.data.to_verl_row`, with
    ``extra_info.entity`` and ``extra_info.evidence_title`` added),
    ``dev.jsonl`` and ``heldout.jsonl`` (FlashRAG rows that :func:`searchrl.data.datasets.read_flashrag_jsonl`
    reads; ``metadata``: ``source``, ``entity``, ``evidence_title``), ``coverage.json`` and ``coverage.md``. The same
    inputs give byte-identical files.

    Args:
        sources: source specs of the kept questions (default :data:`ANSWERABLE_SOURCES`).
        out_dir: output folder (created).
        top_k: passages per question for the answer recall@k filter and the evidence page.
        fractions: shares of entities' hash range for (train, dev, heldout); see :func:`parse_fractions`.
        seed: split hash salt and shuffle seed.
        index: the retrieval index (:data:`IndexLike`; default the bundled Wikipedia summaries index).
        coverage_sources: further sources whose coverage is measured for the table (default every bundled source;
            ``None`` or empty: only ``sources``).
        protocol: tag protocol of the training prompt (``research`` or ``search_r1``).
        scheme: reward scheme stored per training row (``None``: none).
        agent_name: verl agent loop of the training rows.
        torch_threads: query-encoder threads when ``index`` is a spec loaded here.
        max_doc_chars: the answer must be in the part of a passage the agent reads (see :func:`find_evidence`).

    Returns:
        An :class:`AnswerableSets`.

    Raises:
        InvalidRequest: bad sources, fractions or ``top_k``, or no answerable question in the train split.
        searchrl.errors.FailedPrecondition: the index cannot be loaded.
    """
    fr = parse_fractions(fractions)
    ks = _ks(top_k)
    loaded = open_index(index, torch_threads=torch_threads)
    matcher = corpus_matcher(loaded)
    specs = list(dict.fromkeys([*sources, *(coverage_sources or ())]))
    coverage: dict[str, SourceCoverage] = {}
    candidates: list[tuple[Example, QuestionEvidence]] = []
    for spec in specs:
        examples = load_source(spec)
        evidence = find_evidence(examples, loaded, max_k=top_k, matcher=matcher, max_doc_chars=max_doc_chars)
        coverage[examples[0].source] = _summarise(examples[0].source, evidence, ks)
        if spec in sources:
            candidates.extend((ex, ev) for ex, ev in zip(examples, evidence, strict=True) if ev.hit_at(top_k))

    seen_questions: set[str] = set()
    seen_ids: set[str] = set()
    splits: dict[str, list[tuple[Example, str, str]]] = {s: [] for s in SPLITS}
    for ex, ev in candidates:
        key = normalize_answer(ex.question)
        uid = f"{ex.source}/{ex.id}"
        if not key or key in seen_questions or uid in seen_ids:
            continue
        seen_questions.add(key)
        seen_ids.add(uid)
        entity = normalize_answer(ev.evidence_title) or ev.evidence_id
        kept = Example(id=uid, question=ex.question, golden_answers=ex.golden_answers, source=ex.source)
        splits[entity_split(entity, fr, seed)].append((kept, entity, ev.evidence_title))
    for name in SPLITS:
        random.Random(f"{seed}:{name}").shuffle(splits[name])
    if not splits["train"]:
        raise InvalidRequest(f"no answerable question (answer recall@{top_k}) falls in the train split")

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"protocol": protocol, "scheme": scheme, "agent_name": agent_name}
    train_rows = []
    for i, (ex, entity, title) in enumerate(splits["train"]):
        row = to_verl_row(ex, index=i, split="train", **kw)
        row["extra_info"].update(entity=entity, evidence_title=title)
        train_rows.append(row)
    train_path = write_parquet(train_rows, out / "train.parquet")
    paths: dict[str, Path] = {}
    for name in ("dev", "heldout"):
        flashrag_rows = (
            {**ex.to_row(), "metadata": {"source": ex.source, "entity": entity, "evidence_title": title}}
            for ex, entity, title in splits[name]
        )
        paths[name] = _write_jsonl(flashrag_rows, out / f"{name}.jsonl")

    counts = {s: len(rows) for s, rows in splits.items()}
    by_source: dict[str, dict[str, int]] = {}
    for s, rows in splits.items():
        tally: dict[str, int] = {}
        for ex, _e, _t in rows:
            tally[ex.source] = tally.get(ex.source, 0) + 1
        by_source[s] = dict(sorted(tally.items()))
    entities = {s: len({e for _x, e, _t in rows}) for s, rows in splits.items()}
    set_coverage = {s: SourceCoverage(s, n, n, {top_k: n}) for s, n in counts.items()}

    report = {
        "index": loaded.name,
        "index_version": loaded.version,
        "top_k": top_k,
        "max_doc_chars": max_doc_chars,
        "fractions": list(fr),
        "seed": seed,
        "sources": list(sources),
        "coverage": [c.to_dict() for c in coverage.values()],
        "sets": {s: {"rows": counts[s], "entities": entities[s], "by_source": by_source[s]} for s in SPLITS},
    }
    coverage_json = out / "coverage.json"
    coverage_json.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    coverage_md = out / "coverage.md"
    kept_sources = sorted({src for tally in by_source.values() for src in tally})
    md = [
        f"# Answer coverage of index `{loaded.name}` (answer recall@{top_k}"
        + (f", first {max_doc_chars} characters of each passage" if max_doc_chars else "")
        + ")\n",
        coverage_markdown(coverage.values(), ks),
        f"\n## Answerable sets (seed {seed}, fractions {fr[0]:g}/{fr[1]:g}/{fr[2]:g})\n",
        "| split | questions | entities | " + " | ".join(kept_sources) + " |",
        "|---|---:|---:|" + "---:|" * len(kept_sources),
    ]
    md += [
        f"| {s} | {counts[s]} | {entities[s]} | " + " | ".join(str(by_source[s].get(c, 0)) for c in kept_sources) + " |"
        for s in SPLITS
    ]
    coverage_md.write_text("\n".join(md) + "\n", encoding="utf-8")
    return AnswerableSets(
        train_path=train_path,
        dev_path=paths["dev"],
        heldout_path=paths["heldout"],
        rows=counts,
        by_source=by_source,
        entities=entities,
        top_k=top_k,
        coverage=coverage,
        set_coverage=set_coverage,
        coverage_json=coverage_json,
        coverage_md=coverage_md,
    )
