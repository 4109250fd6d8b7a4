"""``searchrl index build|eval|info``: build, evaluate and inspect FAISS indexes.

    searchrl index build --corpus wiki --index-type flat --out idx/wiki-flat
    searchrl index build --corpus wiki-18.jsonl --model intfloat/e5-base-v2 --allow-download --index-type ivfpq --out idx/e5-ivfpq
    searchrl index eval --index-dir idx/wiki-hnsw --queries fanoutqa --ef-search 16,64,128
    searchrl index info --index-dir idx/wiki-flat

``eval`` reports recall@k of an approximate index against exact (Flat) search on held-out queries: the exact answer
comes from the index's own embedding shards (or ``--reference`` DIR, a flat index of the same corpus).

``build`` runs offline (``HF_HUB_OFFLINE=1``) unless ``--allow-download`` lets it fetch a model missing from the
Hugging Face cache; either way the index directory stores the encoder in ``<out>/model/``, and ``eval`` and
``searchrl serve retriever`` load it from there, offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from searchrl.errors import SearchRLError


def _ints(raw: str) -> list[int]:
    return [int(x) for x in raw.split(",") if x.strip()]


def load_eval_queries(spec: str, limit: int, seed: int = 0) -> list[str]:
    """Held-out queries for recall checks.

    Args:
        spec: ``fanoutqa`` (FanOutQA dev sub-questions), ``titles`` (passage titles of the wiki corpus), or a jsonl
            file whose rows have ``question`` or ``query`` (FlashRAG benchmark rows).
        limit: at most this many queries (a seeded random sample when there are more).
        seed: sampling seed.
    """
    import random

    qs: list[str] = []
    if spec == "fanoutqa":
        from searchrl.assets import fanoutqa_dev_path

        def walk(node: dict) -> None:
            for sub in node.get("decomposition") or []:
                if sub.get("question"):
                    qs.append(str(sub["question"]))
                walk(sub)

        for q in json.loads(fanoutqa_dev_path().read_text()):
            walk(q)
    elif spec == "titles":
        from searchrl.retriever.corpus import iter_wiki

        qs = [p.title for p in iter_wiki()]
    else:
        with open(spec, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    q = row.get("question") or row.get("query")
                    if q:
                        qs.append(str(q))
    qs = list(dict.fromkeys(q for q in qs if q.strip()))
    if len(qs) > limit:
        qs = random.Random(seed).sample(qs, limit)
    return qs


def cmd_build(args: argparse.Namespace) -> int:
    from searchrl.retriever.index.build import build_index
    from searchrl.retriever.index.params import IndexParams

    params = IndexParams(
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        nlist=args.nlist,
        pq_m=args.pq_m,
        pq_nbits=args.pq_nbits,
        nprobe=args.nprobe,
    )
    report = build_index(
        args.corpus,
        args.out,
        model=args.model,
        index_type=args.index_type,
        limit=args.limit,
        params=params,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        embeddings_dir=args.embeddings_dir or None,
        progress=not args.no_progress,
        torch_threads=args.torch_threads,
        allow_download=args.allow_download,
    )
    m = report.manifest
    print(
        f"built {m.index_type} index of {m.size} passages ({m.embedding_model}, d={m.dimension}) in {report.seconds:.1f}s "
        f"-> {report.index_dir} [{report.index_bytes / max(m.size, 1):.1f} bytes/passage; "
        f"embedding shards: {report.shards_computed} computed, {report.shards_skipped} reused]"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from searchrl.retriever.index.build import ShardSet
    from searchrl.retriever.index.faiss_util import recall_at_k, set_faiss_threads
    from searchrl.retriever.index.load import load_index
    from searchrl.retriever.index.params import read_manifest

    set_faiss_threads(args.faiss_threads)
    approx = load_index(args.index_dir, use_gpu=False, torch_threads=args.torch_threads)
    queries = load_eval_queries(args.queries, args.limit)
    vecs = approx.encoder.encode_queries(queries)
    kmax = max(args.k)
    if args.reference:
        ref = load_index(args.reference, encoder=approx.encoder, use_gpu=False)
        if ref.manifest.corpus_checksum != approx.manifest.corpus_checksum:
            print("error: --reference was built from another corpus", file=sys.stderr)
            return 2
        _, exact = ref.search_vectors(vecs, kmax)
    else:
        import faiss

        emb_dir = Path(args.index_dir) / "embeddings"
        meta_path = emb_dir / "shards.json"
        if not meta_path.exists():
            print(f"error: {emb_dir} has no embedding shards; pass --reference FLAT_INDEX_DIR", file=sys.stderr)
            return 2
        meta = json.loads(meta_path.read_text())
        if meta["corpus_checksum"] != read_manifest(args.index_dir).corpus_checksum:
            print(f"error: shards in {emb_dir} belong to another corpus; pass --reference", file=sys.stderr)
            return 2
        shards = ShardSet(emb_dir, meta["size"], meta["shard_size"], meta["dimension"])
        flat = faiss.IndexFlatIP(shards.dimension)
        for arr in shards.iter_all():
            flat.add(arr)
        _, exact = flat.search(np.ascontiguousarray(vecs), kmax)
    settings: list[tuple[str, int, int]] = []
    kind = approx.manifest.index_type
    if kind == "ivfpq":
        settings = [("nprobe", n, 0) for n in (args.nprobe or [approx.params.nprobe])]
    elif kind == "hnsw":
        settings = [("efSearch", 0, e) for e in (args.ef_search or [approx.params.ef_search])]
    else:
        settings = [("-", 0, 0)]
    table = Table(title=f"recall vs exact search: {args.index_dir} ({kind}, {len(queries)} {args.queries} queries)")
    table.add_column("setting")
    for k in args.k:
        table.add_column(f"recall@{k}", justify="right")
    rows_out = []
    for name, nprobe, ef in settings:
        approx.set_search_params(nprobe=nprobe, ef_search=ef)
        _, rows = approx.search_vectors(vecs, kmax)
        recalls = [recall_at_k(rows, exact, k) for k in args.k]
        label = f"{name}={nprobe or ef}" if name != "-" else "exact"
        table.add_row(label, *[f"{r:.3f}" for r in recalls])
        rows_out.append({"setting": label, **{f"recall@{k}": r for k, r in zip(args.k, recalls, strict=True)}})
    Console().print(table)
    if args.json:
        print(json.dumps(rows_out))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from searchrl.retriever.index.params import read_manifest

    m = read_manifest(args.index_dir)
    d = Path(args.index_dir)
    index_bytes = os.path.getsize(d / m.index_file) if (d / m.index_file).exists() else 0
    store_bytes = sum(p.stat().st_size for p in (d / "store").glob("*") if p.is_file())
    info = m.model_dump()
    info["index_bytes"] = index_bytes
    info["index_bytes_per_passage"] = round(index_bytes / max(m.size, 1), 1)
    info["passage_store_bytes"] = store_bytes
    print(json.dumps(info, indent=2))
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``searchrl index`` argument parser."""
    p = argparse.ArgumentParser(prog="searchrl index", description="Build, evaluate and inspect FAISS indexes.")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="embed a corpus and build an index directory (resumable)")
    b.add_argument("--corpus", required=True, help="'wiki' (bundled summaries), a FlashRAG *.jsonl or a *.parquet")
    b.add_argument("--model", default="all-minilm-l6-v2", help="embedding model name or path")
    b.add_argument(
        "--allow-download",
        action="store_true",
        help="let sentence-transformers download --model from the Hugging Face Hub when it is not in the local cache "
        "(default: offline); the index directory stores the model in OUT/model/ either way",
    )
    b.add_argument("--index-type", default="flat", choices=["flat", "hnsw", "ivfpq"])
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--limit", type=int, default=None, help="use only the first N passages")
    b.add_argument("--shard-size", type=int, default=4096, help="passages per embedding shard")
    b.add_argument("--batch-size", type=int, default=64, help="encoder batch size")
    b.add_argument(
        "--embeddings-dir", default="", help="shard folder to reuse across index types (default OUT/embeddings)"
    )
    b.add_argument("--hnsw-m", type=int, default=32)
    b.add_argument("--ef-construction", type=int, default=200)
    b.add_argument("--ef-search", type=int, default=128)
    b.add_argument("--nlist", type=int, default=0, help="IVF cells (0: auto)")
    b.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantizers (0: d/8)")
    b.add_argument("--pq-nbits", type=int, default=0, help="bits per PQ code (0: auto)")
    b.add_argument("--nprobe", type=int, default=0, help="IVF cells per query stored as the default (0: auto)")
    b.add_argument("--torch-threads", type=int, default=0)
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=cmd_build)

    e = sub.add_parser("eval", help="recall@k of an approximate index against exact search")
    e.add_argument("--index-dir", required=True)
    e.add_argument("--reference", default="", help="a flat index of the same corpus (default: the index's own shards)")
    e.add_argument("--queries", default="fanoutqa", help="'fanoutqa', 'titles' or a jsonl with question/query fields")
    e.add_argument("--limit", type=int, default=500, help="number of held-out queries")
    e.add_argument("--k", type=_ints, default=[1, 5, 10], help="comma-separated k values")
    e.add_argument("--nprobe", type=_ints, default=[], help="comma-separated nprobe values to sweep (IVF-PQ)")
    e.add_argument("--ef-search", type=_ints, default=[], help="comma-separated efSearch values to sweep (HNSW)")
    e.add_argument("--torch-threads", type=int, default=0)
    e.add_argument("--faiss-threads", type=int, default=0)
    e.add_argument("--json", action="store_true", help="also print the rows as JSON")
    e.set_defaults(fn=cmd_eval)

    i = sub.add_parser("info", help="print an index directory's manifest and sizes")
    i.add_argument("--index-dir", required=True)
    i.set_defaults(fn=cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``searchrl index``; returns the exit code (2 on a usage or data error)."""
    args = parser().parse_args(argv)
    if not getattr(args, "allow_download", False):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return int(args.fn(args))
    except (SearchRLError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
