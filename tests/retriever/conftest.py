"""Fixtures of the retriever tests: a real ~1,000-passage Wikipedia slice, the real MiniLM encoder, built indexes.

The slice holds every bundled Wikipedia summary that is the evidence page of a FanOutQA dev sub-question (312 pages)
plus a deterministic sample of the others, written as a FlashRAG jsonl corpus (quoted titles), so ingestion, embedding
and search all run on real data. Passage embeddings are kept in pytest's cache folder (``.pytest_cache``) and reused
by later sessions only when the shard metadata (model, corpus checksum, shard size, dimension, prefixes) matches;
``pytest --cache-clear`` recomputes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

SLICE_SIZE = 1000


@dataclass
class SubQuestion:
    question: str
    title: str


def _fanout_subquestions(titles: set[str]) -> list[SubQuestion]:
    from searchrl.assets import fanoutqa_dev_path

    out: list[SubQuestion] = []

    def walk(node: dict) -> None:
        for sub in node.get("decomposition") or []:
            ev = sub.get("evidence") or {}
            if ev.get("title") in titles and sub.get("question"):
                out.append(SubQuestion(sub["question"], ev["title"]))
            walk(sub)

    for q in json.loads(fanoutqa_dev_path().read_text()):
        walk(q)
    return out


@pytest.fixture(scope="session")
def wiki_slice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SubQuestion]]:
    """``(corpus.jsonl, sub-questions whose evidence page is in it)``."""
    from searchrl.retriever.corpus import iter_wiki

    passages = list(iter_wiki())
    all_titles = {p.title for p in passages}
    subs = _fanout_subquestions(all_titles)
    evidence = {s.title for s in subs}
    keep = [p for p in passages if p.title in evidence]
    others = [p for p in passages if p.title not in evidence]
    step = max(1, len(others) // (SLICE_SIZE - len(keep)))
    keep += others[::step][: SLICE_SIZE - len(keep)]
    keep.sort(key=lambda p: int(p.id.split("-")[1]))
    path = tmp_path_factory.mktemp("corpus") / "wiki-slice.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for p in keep:
            fh.write(json.dumps({"id": p.id, "contents": p.contents}, ensure_ascii=False) + "\n")
    return path, subs


@pytest.fixture(scope="session")
def encoder():  # noqa: ANN201 - searchrl.retriever.embed.Encoder
    """The embedded all-MiniLM-L6-v2, loaded once."""
    from searchrl.retriever.embed import Encoder

    return Encoder("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def shared_embeddings(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Embedding shards of the slice, shared by every index type and reused across sessions (see module doc)."""
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    if cache is None:
        return tmp_path_factory.mktemp("embeddings")
    return Path(cache.mkdir("searchrl-retriever-embeddings"))


@pytest.fixture(scope="session")
def index_dirs(tmp_path_factory: pytest.TempPathFactory, wiki_slice, encoder, shared_embeddings) -> dict[str, Path]:  # noqa: ANN001
    """Flat, HNSW, IVF-PQ and IVF-PQ + SQ8 re-ranking index directories of the slice (one embedding pass for all)."""
    from searchrl.retriever.index.build import build_index
    from searchrl.retriever.index.params import IndexParams

    corpus, _ = wiki_slice
    root = tmp_path_factory.mktemp("indexes")
    out = {}
    for kind in ("flat", "hnsw", "ivfpq", "ivfpq_refine"):
        report = build_index(
            str(corpus),
            root / kind,
            index_type=kind,
            encoder=encoder,
            shard_size=256,
            embeddings_dir=shared_embeddings,
            progress=False,
            params=IndexParams(ef_construction=64),  # plenty for 1,000 vectors, and a quicker HNSW build
        )
        out[kind] = report.index_dir
    return out


@pytest.fixture(scope="session")
def fanout_sample(wiki_slice, encoder):  # noqa: ANN001, ANN201
    """``(sub-questions, their query embeddings)``: a fixed sample of 250 FanOutQA sub-questions, encoded once."""
    import random

    _, subs = wiki_slice
    sample = random.Random(7).sample(subs, min(250, len(subs)))
    return sample, encoder.encode_queries([s.question for s in sample])


@pytest.fixture(scope="session", autouse=True)
def _one_faiss_thread() -> None:
    """One OpenMP thread, as the service runs FAISS (spinning OpenMP threads thrash on 2 shared cores)."""
    from searchrl.retriever.index.faiss_util import set_faiss_threads

    set_faiss_threads(1)


@pytest.fixture(scope="session")
def flat_index(index_dirs, encoder):  # noqa: ANN001, ANN201 - LoadedIndex
    """The flat index of the slice, loaded once (CPU)."""
    from searchrl.retriever.index.load import load_index

    return load_index(index_dirs["flat"], encoder=encoder, use_gpu=False)
