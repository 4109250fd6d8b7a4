"""Evaluation datasets: FlashRAG jsonl files, the bundled benchmark subsets and FanOutQA dev.

A dataset is named by a *spec*:

=============================  ==========================================================================
spec                           rows
=============================  ==========================================================================
``bench:bamboogle``            ``data/benchmarks/bamboogle/test.jsonl`` (the repo's bundled subsets:
                               bamboogle, hotpotqa, 2wikimultihopqa, musique, nq, triviaqa, popqa)
``bench:musique/train``        a named split of a bundled benchmark
``fanoutqa``                   FanOutQA dev, the 310 top-level multi-hop questions (package ``fanoutqa``)
``fanoutqa-sub``               FanOutQA dev, the 2,193 sub-questions of the decompositions
``path/to/file.jsonl``         any FlashRAG jsonl file; ``name=path/to/file.jsonl`` names it
=============================  ==========================================================================

FlashRAG rows are ``{"id": str, "question": str, "golden_answers": [str, ...], "metadata": {...}}`` (the layout of
FlashRAG, Search-R1 and ZeroSearch data files). :func:`load_dataset` validates every row and names the file and line
of the first bad one, or skips bad rows and counts them with ``skip_invalid=True``.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchrl.errors import InvalidRequest

BENCHMARKS = ("bamboogle", "hotpotqa", "2wikimultihopqa", "musique", "nq", "triviaqa", "popqa")
FANOUTQA = "fanoutqa"
FANOUTQA_SUB = "fanoutqa-sub"
# Split picked for ``bench:<name>`` when the benchmark folder holds several (the evaluation split, never train).
_SPLIT_PREFERENCE = ("test", "dev", "validation", "val")


class DatasetError(InvalidRequest):
    """A dataset file or spec is unusable: missing, empty, or with a malformed row (the message says where)."""


@dataclass(frozen=True)
class Example:
    """One question with its gold answers (to evaluate or to train on).

    Attributes:
        id: the row id, unique within its dataset.
        question: the question text.
        golden_answers: accepted answers (at least one, each non-empty).
        source: name of the dataset it belongs to, when known (verl's ``data_source`` column; not part of the
            FlashRAG row).
        metadata: the row's ``metadata`` object, unchanged.
    """

    id: str
    question: str
    golden_answers: tuple[str, ...]
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)

    def to_row(self) -> dict[str, Any]:
        """The FlashRAG row of this example."""
        return {
            "id": self.id,
            "question": self.question,
            "golden_answers": list(self.golden_answers),
            "metadata": self.metadata,
        }


@dataclass
class Dataset:
    """The rows of one dataset that an evaluation uses.

    Attributes:
        name: short name used in records and tables (``bamboogle``, ``fanoutqa-sub``, a file's stem ...).
        examples: the rows, after validation and slicing.
        source: where they came from (a file path).
        total_rows: valid rows in the source before slicing.
        skipped: rows dropped as invalid (only with ``skip_invalid``; FanOutQA items with no answer).
    """

    name: str
    examples: list[Example]
    source: str
    total_rows: int
    skipped: int = 0

    @property
    def version(self) -> str:
        """sha256 (hex) of the rows used, in order, as canonical JSON; two runs on the same rows share it."""
        return dataset_version(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[Example]:
        return iter(self.examples)


def dataset_version(examples: Sequence[Example]) -> str:
    """sha256 hex digest of the examples (id, question, golden answers, metadata) as canonical JSON lines."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.to_row(), sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _validate_row(row: Any, where: str) -> Example:
    """Turns a parsed jsonl row into an :class:`Example`.

    Raises:
        DatasetError: not an object, or ``question``/``golden_answers``/``id`` missing or of the wrong type.
    """
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DatasetError(f"{where}: missing or empty 'question'")
    golds = row.get("golden_answers")
    if isinstance(golds, str):
        golds = [golds]
    if not isinstance(golds, list) or not golds:
        raise DatasetError(f"{where}: row has no gold answers ('golden_answers' must be a non-empty list of strings)")
    clean: list[str] = []
    for g in golds:
        if isinstance(g, bool) or not isinstance(g, (str, int, float)):
            raise DatasetError(f"{where}: 'golden_answers' holds a {type(g).__name__}; expected strings")
        s = str(g).strip()
        if s:
            clean.append(s)
    if not clean:
        raise DatasetError(f"{where}: row has no gold answers (all entries of 'golden_answers' are empty)")
    rid = row.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        raise DatasetError(f"{where}: missing 'id'")
    meta = row.get("metadata") or {}
    if not isinstance(meta, dict):
        raise DatasetError(f"{where}: 'metadata' must be an object")
    return Example(id=str(rid), question=question.strip(), golden_answers=tuple(clean), metadata=meta)


def read_flashrag_jsonl(path: str | Path, *, skip_invalid: bool = False) -> tuple[list[Example], int]:
    """Reads and validates a FlashRAG jsonl file.

    Args:
        path: the file; blank lines are ignored.
        skip_invalid: drop malformed rows (and count them) instead of failing on the first.

    Returns:
        ``(examples, skipped)``: the valid rows in file order and the number of rows dropped.

    Raises:
        DatasetError: the file is missing or empty (no rows at all, or no valid row left after skipping), a line is
            not JSON, a row is malformed (``path:line: reason``) and ``skip_invalid`` is off, or two rows share an id.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"dataset file not found: {p}")
    examples: list[Example] = []
    skipped = 0
    seen: dict[str, int] = {}
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{p}:{lineno}"
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{where}: not valid JSON ({exc.msg})") from None
                ex = _validate_row(row, where)
                if ex.id in seen:
                    raise DatasetError(f"{where}: duplicate id {ex.id!r} (first on line {seen[ex.id]})")
            except DatasetError:
                if not skip_invalid:
                    raise
                skipped += 1
                continue
            seen[ex.id] = lineno
            examples.append(ex)
    if not examples:
        if skipped:
            raise DatasetError(f"dataset file {p} has no valid rows ({skipped} invalid rows skipped)")
        raise DatasetError(f"dataset file {p} is empty: expected FlashRAG jsonl rows (id, question, golden_answers)")
    return examples, skipped


def _fanout_answer_text(ans: Any) -> str:
    """One gold string for a FanOutQA answer, which may be a string, number, bool, list or dict of them.

    Lists become ``"a, b, c"`` and dicts ``"key: value; key: value"`` so that token F1 rewards covering every part.
    """
    if isinstance(ans, bool):
        return "yes" if ans else "no"
    if isinstance(ans, list):
        return ", ".join(_fanout_answer_text(a) for a in ans)
    if isinstance(ans, dict):
        return "; ".join(f"{k}: {_fanout_answer_text(v)}" for k, v in ans.items())
    if ans is None:
        return ""
    return str(ans)


def _walk_fanout(items: list[dict[str, Any]], depth: int) -> Iterator[tuple[dict[str, Any], int]]:
    for item in items:
        yield item, depth
        yield from _walk_fanout(item.get("decomposition") or [], depth + 1)


def read_fanoutqa(path: str | Path | None = None, *, sub_questions: bool = False) -> tuple[list[Example], int]:
    """FanOutQA dev (Zhu et al. 2024) as examples.

    Args:
        path: ``fanout-final-dev.json``; default the copy in the ``fanoutqa`` package
            (:func:`searchrl.assets.fanoutqa_dev_path`).
        sub_questions: the sub-questions of every decomposition (depth-first order) instead of the top-level ones.

    Returns:
        ``(examples, skipped)``; ``metadata`` keeps the structured answer (``answer``), the evidence page title
        (sub-questions) and the parent id. Items with an empty answer are skipped and counted.

    Raises:
        DatasetError: the file is not a FanOutQA dev JSON list.
    """
    if path is None:
        from searchrl.assets import fanoutqa_dev_path

        path = fanoutqa_dev_path()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read FanOutQA file {path}: {exc}") from None
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path}: expected a non-empty JSON list of FanOutQA questions")
    examples: list[Example] = []
    skipped = 0
    if sub_questions:
        items = ((sub, top["id"]) for top in data for sub, _d in _walk_fanout(top.get("decomposition") or [], 1))
    else:
        items = ((top, "") for top in data)
    for item, parent in items:
        gold = _fanout_answer_text(item.get("answer")).strip()
        if not gold or not str(item.get("question", "")).strip():
            skipped += 1
            continue
        meta: dict[str, Any] = {"answer": item.get("answer")}
        if parent:
            meta["parent_id"] = parent
        evidence = item.get("evidence")
        if isinstance(evidence, dict) and evidence.get("title"):
            meta["evidence_title"] = evidence["title"]
        examples.append(
            Example(id=str(item["id"]), question=str(item["question"]).strip(), golden_answers=(gold,), metadata=meta)
        )
    return examples, skipped


def benchmark_file(name: str) -> Path:
    """The jsonl file of a bundled benchmark, ``name`` or ``name/split``.

    Raises:
        DatasetError: unknown benchmark or split (the message lists what exists).
    """
    from searchrl.assets import benchmarks_dir

    bench, _, split = name.partition("/")
    folder = benchmarks_dir() / bench
    if not folder.is_dir():
        have = sorted(p.name for p in benchmarks_dir().iterdir() if p.is_dir()) if benchmarks_dir().is_dir() else []
        raise DatasetError(f"unknown benchmark {bench!r}; bundled: {', '.join(have) or 'none'}")
    files = {p.stem: p for p in folder.glob("*.jsonl")}
    if split:
        if split not in files:
            raise DatasetError(f"benchmark {bench!r} has no split {split!r}; splits: {', '.join(sorted(files))}")
        return files[split]
    for pref in _SPLIT_PREFERENCE:
        if pref in files:
            return files[pref]
    if len(files) == 1:
        return next(iter(files.values()))
    raise DatasetError(
        f"benchmark {bench!r} has several splits ({', '.join(sorted(files))}); name one as bench:{bench}/<split>"
    )


def _name_for_path(p: Path) -> str:
    if p.stem in (*_SPLIT_PREFERENCE, "train") and p.parent.name:
        return p.parent.name
    return p.stem


def load_dataset(
    spec: str, *, limit: int | None = None, sample_seed: int | None = None, skip_invalid: bool = False
) -> Dataset:
    """Loads one dataset by spec (see the module docstring) and slices it.

    Args:
        spec: ``bench:<name>[/<split>]``, ``fanoutqa``, ``fanoutqa-sub``, ``[name=]path.jsonl``.
        limit: keep this many rows (all when ``None``); the first ones, or a seeded sample with ``sample_seed``.
        sample_seed: draw ``limit`` rows uniformly without replacement with this seed (kept in file order).
        skip_invalid: skip malformed jsonl rows (counted in :attr:`Dataset.skipped`) instead of failing.

    Returns:
        The :class:`Dataset`; its :attr:`Dataset.version` hashes exactly the rows kept.

    Raises:
        DatasetError: unknown spec, missing/empty file, malformed row, ``limit < 1``.
    """
    spec = spec.strip()
    if not spec:
        raise DatasetError("empty dataset spec")
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be >= 1, got {limit}")
    if spec.startswith("bench:"):
        bench = spec[len("bench:") :]
        path = benchmark_file(bench)
        name = bench.replace("/", "-") if "/" in bench else bench
        examples, skipped = read_flashrag_jsonl(path, skip_invalid=skip_invalid)
        source = str(path)
    elif spec in (FANOUTQA, FANOUTQA_SUB):
        from searchrl.assets import fanoutqa_dev_path

        source = str(fanoutqa_dev_path())
        examples, skipped = read_fanoutqa(source, sub_questions=spec == FANOUTQA_SUB)
        name = spec
    else:
        name, eq, raw = spec.partition("=")
        if not eq:
            name, raw = "", spec
        path = Path(raw).expanduser()
        if not path.exists() and raw in BENCHMARKS:
            raise DatasetError(f"no file {raw!r}; did you mean bench:{raw}?")
        examples, skipped = read_flashrag_jsonl(path, skip_invalid=skip_invalid)
        name = name.strip() or _name_for_path(path)
        source = str(path)
    total = len(examples)
    if limit is not None and limit < total:
        if sample_seed is None:
            examples = examples[:limit]
        else:
            keep = sorted(random.Random(sample_seed).sample(range(total), limit))
            examples = [examples[i] for i in keep]
    return Dataset(name=name, examples=examples, source=source, total_rows=total, skipped=skipped)
