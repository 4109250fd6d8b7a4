"""Training data: FlashRAG jsonl, FanOutQA and the bundled benchmarks -> verl's RL parquet (``searchrl data prepare``).

verl's ``RLHFDataset`` (``verl/utils/dataset/rl_dataset.py``) reads parquet rows with these columns, which is also what
Search-R1 and ZeroSearch ship:

==================  ==========================================================================================
column              content
==================  ==========================================================================================
``data_source``     dataset name (``fanoutqa_sub``, ``hotpotqa`` ...); verl passes it to ``compute_score``
``prompt``          chat messages ``[{"role": "system", ...}, {"role": "user", ...}]`` (ReSearch instruct prompt)
``ability``         ``"fact-reasoning"``
``reward_model``    ``{"style": "rule", "ground_truth": {"target": [gold answers]}}``
``extra_info``      ``{"index", "id", "question", "golden_answers", "split", "source", "tools_kwargs"}`` (+ ``scheme``)
``agent_name``      which registered verl agent loop runs the row (ours: ``searchrl_research``)
==================  ==========================================================================================

Sources (``--source``, repeatable): ``fanoutqa-sub`` (FanOutQA dev sub-questions), ``fanoutqa`` (top-level questions),
``bench:NAME[/SPLIT]`` (``data/benchmarks``) and ``[name=]PATH.jsonl`` (any FlashRAG file). FanOutQA rows are kept
only when the answer is a scalar (string, number or yes/no): the rewards compare one short answer. Rows are
de-duplicated by question text, shuffled with ``--seed`` and split into train / validation.

The local trainer reads the same parquet (or any source spec directly) through :func:`load_examples`.

Questions the corpus can answer (:mod:`searchrl.trainer.answerable`): ``searchrl data coverage [--sources ...]
[--top-k 3 5]`` prints each source's in-corpus coverage and answer recall@k against the retrieval index (default the
bundled Wikipedia summaries); ``searchrl data prepare --answerable [--top-k 3] [--fractions 0.7,0.1,0.2] --out DIR``
keeps the questions whose gold answer is in the top-k passages retrieved for them and writes entity-disjoint
``train.parquet``, ``dev.jsonl`` and ``heldout.jsonl`` with ``coverage.json`` / ``coverage.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from searchrl.agent.prompts import instruct_messages
from searchrl.data.datasets import FANOUTQA, FANOUTQA_SUB, Example, load_dataset
from searchrl.errors import FailedPrecondition, InvalidRequest
from searchrl.reward.verl_reward import row_golden_answers

AGENT_NAME = "searchrl_research"
"""The verl agent loop that runs our ReSearch protocol (registered by ``searchrl.trainer.verl_plugins``)."""
TOOL_NAME = "search"
"""Name of the search tool in the tool-config YAML (``trainer/searchrl/trainer/config/tools/searchrl_search.yaml``)."""
ABILITY = "fact-reasoning"


def _is_scalar(answer: Any) -> bool:
    return answer is not None and not isinstance(answer, (list, dict))


def load_source(spec: str, *, limit: int | None = None) -> list[Example]:
    """Loads the examples of one source spec (see the module docstring).

    Args:
        spec: ``fanoutqa-sub``, ``fanoutqa``, ``bench:NAME[/SPLIT]``, ``[name=]PATH.jsonl`` or a prepared
            ``PATH.parquet``.
        limit: keep the first ``limit`` usable rows (after the scalar-answer filter).

    Raises:
        InvalidRequest: unknown spec, missing file, malformed row (the message says where).
    """
    spec = spec.strip()
    if spec.endswith(".parquet"):
        rows = read_parquet_examples(spec)
        return rows[:limit] if limit else rows
    ds = load_dataset(spec)
    name = ds.name.replace("-", "_")
    out: list[Example] = []
    for ex in ds.examples:
        if spec in (FANOUTQA, FANOUTQA_SUB) and not _is_scalar(ex.metadata.get("answer")):
            continue
        out.append(dataclasses.replace(ex, source=name))
        if limit and len(out) >= limit:
            break
    if not out:
        raise InvalidRequest(f"source {spec!r} has no usable rows")
    return out


def read_parquet_examples(path: str | Path) -> list[Example]:
    """Reads the questions back from a parquet written by :func:`prepare` (or any verl RL parquet with
    ``reward_model.ground_truth`` and ``extra_info.question``).

    Raises:
        InvalidRequest: missing file or a row without question / gold answers.
    """
    import pyarrow.parquet as pq

    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidRequest(f"parquet file not found: {p}")
    table = pq.read_table(p)
    out: list[Example] = []
    for i, row in enumerate(table.to_pylist()):
        extra = row.get("extra_info") or {}
        golds = row_golden_answers(row)
        question = row_question(row)
        if not question or not golds:
            raise InvalidRequest(f"{p} row {i}: needs extra_info.question (or a user message) and ground_truth.target")
        rid = str(extra.get("id") or extra.get("index", i))
        out.append(
            Example(
                id=rid,
                question=question,
                golden_answers=tuple(golds),
                source=str(row.get("data_source", p.stem)),
            )
        )
    if not out:
        raise InvalidRequest(f"parquet file {p} has no rows")
    return out


def row_question(row: Mapping[str, Any], messages_key: str = "prompt") -> str:
    """The question of a verl dataset row (or of the row fields verl passes to an agent loop's ``run``, whose chat
    messages are under ``raw_prompt``): ``extra_info.question``, else the last user message without a ``Question:``
    prefix; ``""`` when neither is there."""
    extra = row.get("extra_info") or {}
    if extra.get("question"):
        return str(extra["question"])
    for msg in reversed(list(row.get(messages_key) or [])):
        if msg.get("role") == "user":
            return str(msg.get("content", "")).removeprefix("Question:").strip()
    return ""


def load_examples(specs: Sequence[str], *, limit: int | None = None) -> list[Example]:
    """Concatenates several sources (in order) and drops repeated questions (first one wins).

    Args:
        specs: source specs or parquet paths.
        limit: total rows kept.
    """
    if not specs:
        raise InvalidRequest("no data source given")
    seen: set[str] = set()
    out: list[Example] = []
    for spec in specs:
        for ex in load_source(spec):
            key = " ".join(ex.question.lower().split())
            if key in seen:
                continue
            seen.add(key)
            out.append(ex)
            if limit and len(out) >= limit:
                return out
    return out


def split_examples(
    examples: Sequence[Example], *, val_fraction: float = 0.1, val_size: int | None = None, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Shuffles with ``seed`` and splits into ``(train, validation)``.

    Args:
        examples: all rows.
        val_fraction: share of rows for validation when ``val_size`` is not given (at least one row when > 0).
        val_size: exact number of validation rows.
        seed: shuffle seed; the same seed and rows give the same split.

    Raises:
        InvalidRequest: the split would leave no training rows, or a fraction outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InvalidRequest(f"val_fraction must be in [0, 1), got {val_fraction}")
    rows = list(examples)
    random.Random(seed).shuffle(rows)
    n_val = val_size if val_size is not None else (max(1, round(len(rows) * val_fraction)) if val_fraction > 0 else 0)
    if n_val < 0 or n_val >= len(rows):
        raise InvalidRequest(f"{len(rows)} rows cannot give {n_val} validation rows and at least one training row")
    return rows[n_val:], rows[:n_val]


def to_verl_row(
    ex: Example,
    *,
    index: int,
    split: str,
    protocol: str = "research",
    scheme: str | None = None,
    agent_name: str = AGENT_NAME,
) -> dict[str, Any]:
    """One verl RL parquet row (see the module docstring for the columns).

    ``scheme`` is stored in ``extra_info`` only when given: a per-row scheme overrides the ``reward_kwargs`` of the
    verl config, so leave it out unless every consumer of the file should use it.
    """
    golds = list(ex.golden_answers)
    extra: dict[str, Any] = {
        "index": index,
        "id": ex.id,
        "question": ex.question,
        "golden_answers": golds,
        "split": split,
        "source": ex.source,
        # Read by the search tool's create(): the simulator conditions on the question and gold answers.
        "tools_kwargs": {TOOL_NAME: {"create_kwargs": {"question": ex.question, "golden_answers": golds}}},
    }
    if scheme:
        extra["scheme"] = scheme
    return {
        "data_source": ex.source,
        "prompt": instruct_messages(ex.question, protocol=protocol),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": {"target": golds}},
        "extra_info": extra,
        "agent_name": agent_name,
    }


def write_parquet(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Writes verl rows to ``path`` (parent folders created)."""
    import pandas as pd

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(list(rows)).to_parquet(p, index=False)
    return p


@dataclass
class PreparedData:
    """Where :func:`prepare` wrote the splits and how many rows each holds."""

    train_path: Path
    val_path: Path
    train_rows: int
    val_rows: int
    manifest_path: Path


def prepare(
    sources: Sequence[str],
    out_dir: str | Path,
    *,
    limit: int | None = None,
    val_fraction: float = 0.1,
    val_size: int | None = None,
    seed: int = 0,
    protocol: str = "research",
    scheme: str | None = None,
    agent_name: str = AGENT_NAME,
) -> PreparedData:
    """Loads ``sources``, splits them and writes ``train.parquet``, ``val.parquet`` and ``manifest.json``.

    Raises:
        InvalidRequest: bad source, or too few rows to split.
    """
    examples = load_examples(sources, limit=limit)
    train, val = split_examples(examples, val_fraction=val_fraction, val_size=val_size, seed=seed)
    out = Path(out_dir).expanduser()
    kw: dict[str, Any] = {"protocol": protocol, "scheme": scheme, "agent_name": agent_name}
    train_path = write_parquet(
        [to_verl_row(e, index=i, split="train", **kw) for i, e in enumerate(train)], out / "train.parquet"
    )
    val_path = write_parquet(
        [to_verl_row(e, index=i, split="validation", **kw) for i, e in enumerate(val)], out / "val.parquet"
    )
    manifest = {
        "sources": list(sources),
        "seed": seed,
        "limit": limit,
        "val_fraction": val_fraction,
        "val_size": val_size,
        "protocol": protocol,
        "scheme": scheme,
        "agent_name": agent_name,
        "train_rows": len(train),
        "val_rows": len(val),
        "by_source": {s: sum(1 for e in examples if e.source == s) for s in sorted({e.source for e in examples})},
    }
    manifest_path = out / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return PreparedData(train_path, val_path, len(train), len(val), manifest_path)


def _print_coverage(rows: Sequence[Any], ks: Sequence[int], title: str) -> None:
    """A rich table of :class:`searchrl.trainer.answerable.SourceCoverage` rows on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("source")
    table.add_column("questions", justify="right")
    table.add_column("in corpus %", justify="right")
    for k in ks:
        table.add_column(f"answer recall@{k} %", justify="right")
    for r in rows:
        table.add_row(
            r.source,
            str(r.questions),
            f"{100 * r.in_corpus_share:.1f}",
            *(f"{100 * r.answer_recall(k):.1f}" for k in ks),
        )
    Console(width=max(100, 24 + 22 * len(ks))).print(table)


def _coverage_main(args: argparse.Namespace) -> int:
    from searchrl.trainer.answerable import load_sources, measure_coverage

    ks = sorted(set(args.top_k))
    examples = load_sources(args.sources)
    rows = measure_coverage(
        examples, top_k=ks, index=args.index, torch_threads=args.torch_threads, max_doc_chars=args.max_doc_chars
    )
    _print_coverage(list(rows.values()), ks, f"Answer coverage of index {args.index!r}")
    return 0


def _answerable_main(args: argparse.Namespace) -> int:
    from searchrl.trainer.answerable import ANSWERABLE_SOURCES, COVERAGE_SOURCES, build_answerable_sets

    sets = build_answerable_sets(
        args.source or ANSWERABLE_SOURCES,
        args.out,
        top_k=args.top_k,
        fractions=args.fractions,
        seed=args.seed,
        index=args.index,
        coverage_sources=args.coverage_source if args.coverage_source is not None else COVERAGE_SOURCES,
        protocol=args.protocol,
        scheme=args.scheme,
        agent_name=args.agent_name,
        torch_threads=args.torch_threads,
        max_doc_chars=args.max_doc_chars,
    )
    _print_coverage(list(sets.coverage.values()), [sets.top_k], f"Answer coverage of index {args.index!r}")
    _print_coverage(list(sets.set_coverage.values()), [sets.top_k], "Answerable sets")
    for split, counts in sets.by_source.items():
        detail = ", ".join(f"{s} {n}" for s, n in counts.items())
        print(f"{split}: {sets.rows[split]} rows, {sets.entities[split]} entities ({detail})")
    print(f"wrote {sets.train_path}, {sets.dev_path}, {sets.heldout_path}, {sets.coverage_json} and {sets.coverage_md}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``searchrl data prepare|coverage``: writes verl parquet splits or prints answer coverage; returns the exit
    code."""
    from searchrl.trainer.answerable import COVERAGE_SOURCES, parse_fractions

    parser = argparse.ArgumentParser(
        prog="searchrl data", description="Prepare training data in verl's parquet format."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="FlashRAG jsonl / FanOutQA / bundled benchmarks -> train/val parquet")
    p.add_argument(
        "--source",
        action="append",
        default=None,
        help="fanoutqa-sub | fanoutqa | bench:NAME[/SPLIT] | [name=]PATH.jsonl (repeatable; default fanoutqa-sub, "
        "with --answerable bench:nq, bench:triviaqa, bench:popqa, fanoutqa-sub)",
    )
    p.add_argument("--out", default="data/train", help="output folder for train.parquet, val.parquet, manifest.json")
    p.add_argument("--limit", type=int, default=None, help="keep at most this many rows in total")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of rows for validation")
    p.add_argument(
        "--val-size", type=int, default=None, help="exact number of validation rows (overrides --val-fraction)"
    )
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the split")
    p.add_argument(
        "--protocol", choices=("research", "search_r1"), default="research", help="tag protocol of the prompt"
    )
    p.add_argument(
        "--scheme",
        default=None,
        help="reward scheme stored in extra_info.scheme (default: none, the verl config's reward_kwargs decide)",
    )
    p.add_argument("--agent-name", default=AGENT_NAME, help="verl agent loop for each row (agent_name column)")
    p.add_argument(
        "--answerable",
        action="store_true",
        help="keep only questions whose gold answer is in the top-k passages retrieved for them, split by evidence "
        "page into train.parquet, dev.jsonl, heldout.jsonl (+ coverage.json, coverage.md)",
    )
    p.add_argument("--top-k", type=int, default=3, help="with --answerable: passages per question (answer recall@k)")
    p.add_argument(
        "--fractions",
        type=parse_fractions,
        default=(0.7, 0.1, 0.2),
        help="with --answerable: train,dev,heldout shares of the entities (default 0.7,0.1,0.2)",
    )
    p.add_argument(
        "--coverage-source",
        action="append",
        default=None,
        help="with --answerable: sources whose coverage is measured for the table (repeatable; default every "
        "bundled source)",
    )
    p.add_argument(
        "--index", default="wiki", help="with --answerable: index directory or wiki[:type] (default: bundled wiki)"
    )
    p.add_argument("--torch-threads", type=int, default=0, help="query-encoder threads (0: torch's default)")
    p.add_argument(
        "--max-doc-chars",
        type=int,
        default=0,
        help="count only the first N characters of each passage's text, what the agent reads (0: whole passages)",
    )
    c = sub.add_parser("coverage", help="in-corpus coverage and answer recall@k of question sources")
    c.add_argument(
        "--sources",
        nargs="+",
        default=list(COVERAGE_SOURCES),
        help="source specs (default: every bundled source)",
    )
    c.add_argument("--top-k", type=int, nargs="+", default=[3], help="one or more k of answer recall@k (default 3)")
    c.add_argument("--index", default="wiki", help="index directory or wiki[:type] (default: bundled wiki)")
    c.add_argument("--torch-threads", type=int, default=0, help="query-encoder threads (0: torch's default)")
    c.add_argument(
        "--max-doc-chars",
        type=int,
        default=0,
        help="count only the first N characters of each passage's text, what the agent reads (0: whole passages)",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.cmd == "coverage":
            return _coverage_main(args)
        if args.answerable:
            return _answerable_main(args)
        res = prepare(
            args.source or ["fanoutqa-sub"],
            args.out,
            limit=args.limit,
            val_fraction=args.val_fraction,
            val_size=args.val_size,
            seed=args.seed,
            protocol=args.protocol,
            scheme=args.scheme,
            agent_name=args.agent_name,
        )
    except (InvalidRequest, FailedPrecondition, FileNotFoundError) as exc:
        print(f"searchrl data {args.cmd}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {res.train_path} ({res.train_rows} rows) and {res.val_path} ({res.val_rows} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
