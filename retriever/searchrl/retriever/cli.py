"""``searchrl index build|convert|eval|info``: build, convert, evaluate and inspect FAISS indexes.

    searchrl index build --corpus wiki --index-type flat --out idx/wiki-flat
    searchrl index build --corpus wiki-18.jsonl --model intfloat/e5-base-v2 --allow-download --index-type ivfpq_refine --out idx/e5
    searchrl index convert --flat-index e5_Flat.index --corpus wiki-18.jsonl --model intfloat/e5-base-v2 --out idx/e5
    searchrl index eval --index-dir idx/wiki-hnsw --queries fanoutqa --ef-search 16,64,128
    searchrl index eval --index-dir idx/e5 --nprobe 32,64,128 --k-factor 4,8,16 --target-recall 0.95 --store
    searchrl index info --index-dir idx/wiki-flat

``eval`` reports recall@k of an approximate index against exact (Flat) search on held-out queries: the exact answer
comes from the index's own embedding shards (or ``--reference`` DIR, a flat index of the same corpus). It sweeps the
search parameters, prints each setting's recall and latency with the recall-latency frontier marked, and with
``--store`` writes the fastest setting that reaches ``--target-recall`` into the manifest, as the served default.

``convert`` turns a Search-R1/FlashRAG flat index (``e5_Flat.index``) into an index directory without re-embedding:
it reads the vectors in chunks from a memory map of the flat file.

``build`` runs offline (``HF_HUB_OFFLINE=1``) unless ``--allow-download`` lets it fetch a model missing from the
Hugging Face cache; either way the index directory stores the encoder in ``<out>/model/``, and ``eval`` and
``searchrl serve retriever`` load it from there, offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from searchrl.errors import SearchRLError
from searchrl.retriever.index.params import COARSE_TYPES, INDEX_TYPES, REFINE_TYPES


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


def _params(args: argparse.Namespace):  # noqa: ANN202 - IndexParams
    from searchrl.retriever.index.params import IndexParams

    return IndexParams(
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        nlist=args.nlist,
        pq_m=args.pq_m,
        pq_nbits=args.pq_nbits,
        nprobe=args.nprobe,
        train_size=args.train_size,
        k_factor=args.k_factor,
        refine=args.refine,
        coarse=args.coarse,
        opq=args.opq,
    )


def _print_report(report) -> None:  # noqa: ANN001 - BuildReport
    m = report.manifest
    print(
        f"built {m.index_type} index of {m.size} passages ({m.embedding_model}, d={m.dimension}) in {report.seconds:.1f}s "
        f"-> {report.index_dir} [{report.index_bytes / max(m.size, 1):.1f} bytes/passage; "
        f"embedding shards: {report.shards_computed} computed, {report.shards_skipped} reused]"
    )


def cmd_convert(args: argparse.Namespace) -> int:
    from searchrl.retriever.index.build import convert_flat_index

    report = convert_flat_index(
        args.flat_index,
        args.corpus,
        args.out,
        model=args.model,
        index_type=args.index_type,
        params=_params(args),
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
        allow_download=args.allow_download,
    )
    _print_report(report)
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from searchrl.retriever.index.build import build_index

    params = _params(args)
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
    _print_report(report)
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
    kind = approx.manifest.index_type
    settings = _sweep(kind, args, approx.params)
    table = Table(title=f"recall vs exact search: {args.index_dir} ({kind}, {len(queries)} {args.queries} queries)")
    table.add_column("setting")
    for k in args.k:
        table.add_column(f"recall@{k}", justify="right")
    table.add_column(f"ms/query (batch {args.batch})", justify="right")
    table.add_column("frontier", justify="center")
    rows_out = []
    for label, params in settings:
        approx.set_search_params(**params)
        approx.search_vectors(vecs[: args.batch], kmax)  # warm-up: page in the lists and re-ranking vectors touched
        t0 = time.perf_counter()
        parts = [approx.search_vectors(vecs[i : i + args.batch], kmax)[1] for i in range(0, len(vecs), args.batch)]
        ms = 1000 * (time.perf_counter() - t0) / max(len(vecs), 1)
        rows = np.concatenate(parts)
        recalls = [recall_at_k(rows, exact, k) for k in args.k]
        rows_out.append(
            {
                "setting": label,
                "params": params,
                "ms_per_query": ms,
                **{f"recall@{k}": r for k, r in zip(args.k, recalls, strict=True)},
            }
        )
    key = f"recall@{args.target_k}" if f"recall@{args.target_k}" in rows_out[0] else f"recall@{args.k[0]}"
    for r in rows_out:
        r["frontier"] = not any(
            o is not r
            and o[key] >= r[key]
            and o["ms_per_query"] <= r["ms_per_query"]
            and (o[key] > r[key] or o["ms_per_query"] < r["ms_per_query"])
            for o in rows_out
        )
    for r in sorted(rows_out, key=lambda r: r["ms_per_query"]):
        table.add_row(
            r["setting"],
            *[f"{r[f'recall@{k}']:.3f}" for k in args.k],
            f"{r['ms_per_query']:.2f}",
            "*" if r["frontier"] else "",
        )
    Console().print(table)
    if args.json:
        print(json.dumps(rows_out))
    if args.target_recall > 0:
        ok = [r for r in rows_out if r[key] >= args.target_recall]
        if not ok:
            print(f"no setting reaches {key} >= {args.target_recall}: widen the sweep", file=sys.stderr)
            return 1
        best = min(ok, key=lambda r: r["ms_per_query"])
        print(
            f"fastest setting with {key} >= {args.target_recall}: {best['setting']} ({best[key]:.3f}, {best['ms_per_query']:.2f} ms/query)"
        )
        if args.store:
            _store_search_params(Path(args.index_dir), best, key, args, len(queries))
            print(f"stored in {Path(args.index_dir) / 'manifest.json'} as the served default")
    return 0


def _sweep(kind: str, args: argparse.Namespace, params) -> list[tuple[str, dict[str, int]]]:  # noqa: ANN001
    """``(label, set_search_params kwargs)`` of every setting to evaluate for an index ``kind``."""
    if kind == "ivfpq":
        return [(f"nprobe={n}", {"nprobe": n}) for n in (args.nprobe or [params.nprobe])]
    if kind == "ivfpq_refine":
        return [
            (f"nprobe={n} k_factor={f}", {"nprobe": n, "k_factor": f})
            for n in (args.nprobe or [params.nprobe])
            for f in (args.k_factor or [params.k_factor or 16])
        ]
    if kind == "hnsw":
        return [(f"efSearch={e}", {"ef_search": e}) for e in (args.ef_search or [params.ef_search])]
    return [("exact", {})]


def _store_search_params(index_dir: Path, best: dict, key: str, args: argparse.Namespace, n_queries: int) -> None:
    """Writes the chosen search parameters into the manifest's ``build_params`` (the served defaults) and records
    how they were chosen under ``tuned``."""
    from searchrl.retriever.index.params import MANIFEST_FILE, read_manifest

    m = read_manifest(index_dir)
    m.build_params.update(best["params"])
    tuned = {
        "target": f"{key} >= {args.target_recall}",
        "recall": round(best[key], 4),
        "ms_per_query": round(best["ms_per_query"], 3),
        "batch": args.batch,
        "queries": f"{n_queries} {args.queries}",
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    data = json.loads(m.model_dump_json())
    data["tuned"] = tuned
    tmp = index_dir / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, index_dir / MANIFEST_FILE)


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


def _index_param_args(p: argparse.ArgumentParser) -> None:
    """The :class:`~searchrl.retriever.index.params.IndexParams` options of ``build`` and ``convert``."""
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef-search", type=int, default=128)
    p.add_argument("--nlist", type=int, default=0, help="IVF cells (0: auto)")
    p.add_argument("--pq-m", type=int, default=0, help="PQ sub-quantizers (0: d/4, at most 96)")
    p.add_argument("--pq-nbits", type=int, default=0, help="bits per PQ code (0: auto)")
    p.add_argument("--nprobe", type=int, default=0, help="IVF cells per query stored as the default (0: auto)")
    p.add_argument("--train-size", type=int, default=0, help="vectors sampled to train IVF (0: up to 262,144)")
    p.add_argument("--k-factor", type=int, default=0, help="ivfpq_refine: candidates re-ranked per result (0: 16)")
    p.add_argument("--refine", default="sq8", choices=list(REFINE_TYPES), help="ivfpq_refine: re-ranking vectors")
    p.add_argument("--coarse", default="auto", choices=list(COARSE_TYPES), help="IVF coarse quantizer")
    p.add_argument("--opq", action="store_true", help="ivfpq_refine: OPQ rotation before PQ")


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
    b.add_argument("--index-type", default="flat", choices=list(INDEX_TYPES))
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--limit", type=int, default=None, help="use only the first N passages")
    b.add_argument("--shard-size", type=int, default=4096, help="passages per embedding shard")
    b.add_argument("--batch-size", type=int, default=64, help="encoder batch size")
    b.add_argument(
        "--embeddings-dir", default="", help="shard folder to reuse across index types (default OUT/embeddings)"
    )
    _index_param_args(b)
    b.add_argument("--torch-threads", type=int, default=0)
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(fn=cmd_build)

    c = sub.add_parser("convert", help="build an index directory from a flat FAISS index file, without re-embedding")
    c.add_argument("--flat-index", required=True, help="a flat inner-product index file (Search-R1's e5_Flat.index)")
    c.add_argument("--corpus", required=True, help="its FlashRAG/Search-R1 jsonl corpus (row i = vector i)")
    c.add_argument("--model", required=True, help="the model the vectors were embedded with (intfloat/e5-base-v2)")
    c.add_argument("--allow-download", action="store_true", help="let sentence-transformers download --model")
    c.add_argument("--index-type", default="ivfpq_refine", choices=list(INDEX_TYPES))
    c.add_argument("--out", required=True, help="index directory to write")
    c.add_argument("--chunk-size", type=int, default=65_536, help="vectors read from the flat file at a time")
    _index_param_args(c)
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=cmd_convert)

    e = sub.add_parser("eval", help="recall@k of an approximate index against exact search")
    e.add_argument("--index-dir", required=True)
    e.add_argument("--reference", default="", help="a flat index of the same corpus (default: the index's own shards)")
    e.add_argument("--queries", default="fanoutqa", help="'fanoutqa', 'titles' or a jsonl with question/query fields")
    e.add_argument("--limit", type=int, default=500, help="number of held-out queries")
    e.add_argument("--k", type=_ints, default=[1, 5, 10], help="comma-separated k values")
    e.add_argument("--nprobe", type=_ints, default=[], help="comma-separated nprobe values to sweep (IVF-PQ)")
    e.add_argument("--ef-search", type=_ints, default=[], help="comma-separated efSearch values to sweep (HNSW)")
    e.add_argument("--k-factor", type=_ints, default=[], help="comma-separated k_factor values to sweep (ivfpq_refine)")
    e.add_argument("--batch", type=int, default=32, help="queries per search call when timing")
    e.add_argument("--target-k", type=int, default=5, help="the k of the recall that --target-recall applies to")
    e.add_argument("--target-recall", type=float, default=0.0, help="report the fastest setting reaching this recall")
    e.add_argument("--store", action="store_true", help="write that setting into the manifest (served default)")
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
