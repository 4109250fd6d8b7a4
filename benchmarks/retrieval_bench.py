"""Retrieval benchmark: the RetrievalService (gRPC and Search-R1 HTTP) against the same model + index in-process.

Over the 10,033 bundled Wikipedia summaries (all-MiniLM-L6-v2, flat index, cached under ``searchrl.assets.cache_dir()``
by :func:`searchrl.retriever.index.wiki.ensure_wiki_index`), with FanOutQA dev sub-questions as queries, it prints:

1. **tuning**: query encoding of random FanOutQA batches in float32 as one padded call (sentence-transformers as
   is), in length buckets, packed without padding, packed and split over 2 single-threaded workers, and packed in one
   call with 2 torch threads; the same in bfloat16 on CPUs with native bf16; FAISS flat search with 1 vs 2 OpenMP
   threads, and FAISS's SIMD scan vs BLAS per batch size (what the service's ``--query-dtype``, ``--torch-threads``,
   ``--faiss-threads`` and ``--blas-min-batch`` defaults rest on);
2. **throughput/latency**: queries/s and p50/p99 request latency at batch 1 and 32 and at 1, 8 and 32 concurrent
   closed-loop clients, for (a) the service over gRPC, (b) its HTTP ``/retrieve``, (c) the model + index called
   in-process with no service (concurrent clients = threads calling it directly, as a blocking thread-pool server
   would);
3. **targets**: service within 15% of in-process throughput at batch 32; 8 concurrent single-query clients >= 3x one
   client; p99 <= 3x p50 under 8 clients;
4. **memory**: bytes per passage of flat / HNSW / IVF-PQ (serialized index size, marginal per vector), extrapolated to
   1M and 21M passages (and to d=768 e5 vectors for Search-R1's 21M-passage wiki-18), with recall@10 against flat.

All numbers of one table come from one run on one machine, side by side. The server runs as a subprocess; clients
share the machine with it (2 cores here), as rollout workers would.

    .venv/bin/python benchmarks/retrieval_bench.py                   # ~3 min on 2 cores
    .venv/bin/python benchmarks/retrieval_bench.py --duration 10 --concurrency 1,8,32,64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class Cell:
    mode: str
    batch: int
    clients: int
    qps: float
    p50_ms: float
    p99_ms: float
    requests: int
    mean_batch: float = float("nan")  # queries per server micro-batch (service modes)
    busy: float = float("nan")  # share of wall time the server's worker spent encoding/searching/looking up


def _pct(lat: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(lat) * 1000.0, q)) if lat else float("nan")


def _ratio(st: list[float] | None) -> float:
    return st[0] / st[1] if st and st[1] else float("nan")


def _queries(limit: int = 4000) -> list[str]:
    from searchrl.retriever.cli import load_eval_queries

    return load_eval_queries("fanoutqa", limit)


class QuerySource:
    """Hands out distinct query batches round-robin (thread-safe), so no two requests repeat back to back."""

    def __init__(self, queries: list[str]) -> None:
        self.q = queries
        self.i = 0
        self.lock = threading.Lock()

    def take(self, n: int) -> list[str]:
        with self.lock:
            out = [self.q[(self.i + j) % len(self.q)] for j in range(n)]
            self.i += n
        return out


async def closed_loop_async(
    clients: int, duration: float, call: Callable[[], Awaitable[int]], warm: bool = False
) -> tuple[list[float], int, float]:
    """``clients`` coroutines each awaiting ``call()`` back to back for ``duration`` s (at least once each); returns
    latencies, queries answered and wall time. ``warm``: one untimed round first (connections, first batches)."""
    if warm:
        await asyncio.gather(*(call() for _ in range(clients)))
    lat: list[float] = []
    done = 0
    t0 = time.perf_counter()
    stop = t0 + duration

    async def client() -> None:
        nonlocal done
        rounds = 0
        while time.perf_counter() < stop or rounds < 1:
            s = time.perf_counter()
            n = await call()  # not ``done += await call()``: that reads ``done`` before the await
            lat.append(time.perf_counter() - s)
            done += n
            rounds += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return lat, done, time.perf_counter() - t0


def closed_loop_threads(
    clients: int, duration: float, call: Callable[[], int], warm: bool = False, init: Callable[[], None] | None = None
) -> tuple[list[float], int, float]:
    """Same as :func:`closed_loop_async` with ``clients`` threads calling a blocking function (``init`` per thread)."""
    if warm:
        if init is not None:
            init()
        call()
    lat: list[float] = []
    done = [0]
    lock = threading.Lock()
    t0 = time.perf_counter()
    stop = t0 + duration

    def client() -> None:
        rounds = 0
        while time.perf_counter() < stop or rounds < 1:
            s = time.perf_counter()
            n = call()
            e = time.perf_counter() - s
            with lock:
                lat.append(e)
                done[0] += n
            rounds += 1

    with ThreadPoolExecutor(clients, initializer=init) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    return lat, done[0], time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------- tuning
def tuning(loaded, queries: list[str], reps: int) -> list[str]:  # noqa: ANN001 - LoadedIndex
    import faiss
    import torch

    from searchrl.retriever.index.faiss_util import set_blas_min_batch, set_faiss_threads

    sizes = (1, 4, 8, 16, 32)
    lines = ["", "== tuning (median ms per call)", f"{'what':<34}" + "".join(f"{f'batch {b}':>10}" for b in sizes)]
    enc = loaded.encoder

    def med(fn: Callable[[], object]) -> float:
        fn()
        ts = []
        for _ in range(reps):
            s = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - s)
        return statistics.median(ts) * 1000

    # Encoding: random batches of FanOutQA queries (natural length spread), the same batches for every row.
    from searchrl.retriever.embed import Encoder

    rng = np.random.default_rng(0)
    samples = {
        b: [[queries[i] for i in rng.choice(len(queries), b, replace=False)] for _ in range(reps)] for b in sizes
    }

    def med_batches(encoder: Encoder, b: int) -> float:
        encoder.encode_queries(samples[b][0])
        ts = []
        for qs in samples[b]:
            s = time.perf_counter()
            encoder.encode_queries(qs)
            ts.append(time.perf_counter() - s)
        return statistics.median(ts) * 1000

    from retrieval_support import cpu_has_native_bf16

    saved_torch = torch.get_num_threads()
    # (label, encoder, packing pooling or None, bucket overhead tokens, torch threads, split over the workers)
    variants: list[tuple[str, Encoder, str | None, float, int, bool]] = []
    made: list[Encoder] = []
    for dtype in ("float32", "bfloat16") if cpu_has_native_bf16() else ("float32",):
        one = Encoder(enc.name, query_dtype=dtype, torch_threads=1)
        two = Encoder(enc.name, query_dtype=dtype, torch_threads=1, encode_workers=2, min_split=2)
        made += [one, two]
        short = "fp32" if dtype == "float32" else "bf16"
        if dtype == "float32":
            variants.append((f"encode {short}, one padded call", one, None, 0.0, 1, False))
        variants.append((f"encode {short}, length buckets", one, None, one.bucket_overhead_tokens, 1, False))
        if one._pooling is not None:
            variants.append((f"encode {short}, packed", one, one._pooling, 0.0, 1, False))
            variants.append(("  same, split over 2 workers", two, two._pooling, 0.0, 1, True))
            variants.append(("  same, one call with 2 threads", one, one._pooling, 0.0, 2, False))
    for label, encoder, pooling, overhead, th, split in variants:
        torch.set_num_threads(th)
        keep = (encoder._pooling, encoder.bucket_overhead_tokens, encoder.split_chooser.choose)
        encoder._pooling, encoder.bucket_overhead_tokens = pooling, overhead
        encoder.split_chooser.choose = lambda n, split=split: split  # type: ignore[method-assign]
        row = [med_batches(encoder, b) for b in sizes]
        encoder._pooling, encoder.bucket_overhead_tokens, encoder.split_chooser.choose = keep  # type: ignore[method-assign]
        lines.append(f"{label:<34}" + "".join(f"{v:>10.2f}" for v in row))
    torch.set_num_threads(saved_torch)
    for e in made:
        e.close()
    del made
    vecs = enc.encode_queries(queries[:64])
    for th in (1, 2):
        set_faiss_threads(th)
        row = [med(lambda b=b: loaded.search_vectors(vecs[:b], 5)) for b in sizes]
        lines.append(f"{f'flat search, faiss threads={th}':<34}" + "".join(f"{v:>10.2f}" for v in row))
    set_faiss_threads(1)
    saved = int(faiss.cvar.distance_compute_blas_threshold)
    for label, min_batch in (("flat search, SIMD scan", 1 << 20), ("flat search, BLAS sgemm", 1)):
        set_blas_min_batch(min_batch, loaded.dimension)
        row = [med(lambda b=b: loaded.search_vectors(vecs[:b], 5)) for b in sizes]
        lines.append(f"{label:<34}" + "".join(f"{v:>10.2f}" for v in row))
    faiss.cvar.distance_compute_blas_threshold = saved
    return lines


# ----------------------------------------------------------------------------------------------- memory
def memory(index_dir, loaded, queries: list[str], wiki: bool) -> list[str]:  # noqa: ANN001
    from retrieval_support import measure_index_memory

    from searchrl.retriever.index.build import ShardSet, build_from_shards
    from searchrl.retriever.index.faiss_util import recall_at_k
    from searchrl.retriever.index.load import load_index
    from searchrl.retriever.index.params import IndexParams
    from searchrl.retriever.index.wiki import ensure_wiki_index

    shards_json = index_dir / "embeddings" / "shards.json"
    emb_dir = index_dir / "embeddings"
    if not shards_json.exists():  # ensure_wiki_index keeps shards next to the index dirs
        emb_dir = index_dir.parent / f"{index_dir.name.rsplit('-', 1)[0]}-embeddings"
    meta = json.loads((emb_dir / "shards.json").read_text())
    shards = ShardSet(emb_dir, meta["size"], meta["shard_size"], meta["dimension"])
    vecs = shards.all()
    n, d = vecs.shape
    qv = loaded.encoder.encode_queries(queries[:300])
    _, exact = loaded.search_vectors(qv, 10)
    lines = [
        "",
        f"== index memory ({n:,} passages, d={d}; serialized FAISS size; recall@10 vs flat on {len(qv)} FanOutQA queries)",
        f"{'index':<8}{'bytes/passage':>15}{'marginal B/vec':>16}{'per 1M':>10}{'21M (d=384)':>13}{'21M e5 d=768':>14}"
        f"{'recall@10':>11}{'ms/query':>10}",
    ]
    # Sizes do not depend on build effort: the HNSW graph has fixed neighbour slots per level, PQ codes a fixed
    # width, so the size measurement uses a cheap build (efConstruction 16, 4,096 training vectors).
    cheap = IndexParams(ef_construction=16, train_size=min(n, 4096))
    for kind in ("flat", "hnsw", "ivfpq"):
        est = measure_index_memory(vecs, kind, cheap)
        p = IndexParams().resolved(n, d)
        if kind == "flat":
            recall = 1.0
            idx = loaded.index
        else:  # recall and speed with the real build parameters (the cached wiki index, else a fresh build)
            if wiki:
                idx = load_index(ensure_wiki_index(kind, progress=False), encoder=loaded.encoder, use_gpu=False).index
            else:
                idx = build_from_shards(shards, kind, IndexParams())
            _, rows = idx.search(qv, 10)
            recall = recall_at_k(rows, exact, 10)
        s = time.perf_counter()
        for i in range(len(qv)):
            idx.search(qv[i : i + 1], 10)
        ms = (time.perf_counter() - s) * 1000 / len(qv)
        # d=768 (e5-base, Search-R1's wiki-18): vector part doubles; HNSW graph part unchanged; PQ codes of auto pq_m
        if kind == "flat":
            e5 = 4 * 768 * 21e6
        elif kind == "hnsw":
            e5 = (est.bytes_per_vector - 4 * d + 4 * 768) * 21e6
        else:
            p768 = IndexParams().resolved(21_000_000, 768)
            e5 = (p768.pq_m * p768.pq_nbits / 8 + 8) * 21e6 + 4 * 768 * p768.nlist
        lines.append(
            f"{kind:<8}{est.total_bytes / n:>15.1f}{est.bytes_per_vector:>16.1f}{est.bytes_at(1_000_000, p) / 2**20:>8.0f}MB"
            f"{est.bytes_at(21_000_000) / 2**30:>11.2f}GB{e5 / 2**30:>12.2f}GB{recall:>11.3f}{ms:>10.3f}"
        )
    lines.append(
        "(IVF-PQ at 21M uses its auto nlist = 4 sqrt(n) and 8-bit codes; 1M/21M columns exclude the passage text,"
    )
    lines.append(" which the passage store keeps on disk and the page cache shares across workers)")
    return lines


# ----------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per cell (split over --rounds)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleave the cells in this many rounds, so load changes hit all modes alike",
    )
    ap.add_argument("--batches", default="1,32", help="queries per request")
    ap.add_argument("--concurrency", default="1,8,32", help="concurrent clients")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--modes", default="grpc,http,inproc", help="subset of grpc,http,inproc")
    ap.add_argument("--micro-batch-wait-ms", type=float, default=None, help="override the server default")
    ap.add_argument("--micro-batch-max", type=int, default=None, help="override the server default")
    ap.add_argument(
        "--torch-threads", type=int, default=1, help="server and in-process torch threads (0: one per core)"
    )
    ap.add_argument("--faiss-threads", type=int, default=1)
    ap.add_argument("--query-dtype", default="auto", help="server and in-process query dtype (auto|float32|bfloat16)")
    ap.add_argument(
        "--encode-workers", type=int, default=0, help="server and in-process encode worker threads (0: one per core)"
    )
    ap.add_argument("--skip-tuning", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--tuning-reps", type=int, default=10)
    ap.add_argument("--index-dir", default="", help="index to serve (default: the cached wiki flat index)")
    args = ap.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",")]
    concs = [int(x) for x in args.concurrency.split(",")]
    modes = args.modes.split(",")

    from pathlib import Path

    from searchrl.retriever.embed import set_torch_threads
    from searchrl.retriever.index.faiss_util import set_blas_min_batch, set_faiss_threads
    from searchrl.retriever.index.load import load_index
    from searchrl.retriever.index.wiki import ensure_wiki_index

    t_start = time.perf_counter()
    index_dir = Path(args.index_dir) if args.index_dir else ensure_wiki_index("flat")
    set_torch_threads(args.torch_threads)
    set_faiss_threads(args.faiss_threads)
    loaded = load_index(index_dir, use_gpu=False, query_dtype=args.query_dtype, encode_workers=args.encode_workers)
    set_blas_min_batch(12, loaded.dimension)
    queries = _queries()
    # This process holds the in-process model too: keep its ~500k start-up objects out of the garbage collector's full
    # passes, as the services do (searchrl.serving.runtime.freeze_startup_objects), or client-side GC pauses of
    # 100+ ms land in the service columns' p99.
    from searchrl.serving.runtime import freeze_startup_objects

    freeze_startup_objects()
    print(
        f"index {index_dir}: {loaded.size:,} passages, {loaded.manifest.embedding_model}, d={loaded.dimension}, "
        f"queries in {loaded.encoder.query_dtype}; "
        f"{len(queries)} distinct FanOutQA queries; {os.cpu_count()} CPUs; load avg {os.getloadavg()[0]:.1f}"
    )
    lines: list[str] = []
    if not args.skip_tuning:
        lines += tuning(loaded, queries, args.tuning_reps)
        print("\n".join(lines), flush=True)

    src = QuerySource(queries)
    acc: dict[tuple[str, int, int], tuple[list[float], int, float]] = {}

    batch_stats: dict[tuple[str, int, int], list[float]] = {}

    def scrape_batches(metrics_port: int) -> tuple[float, float, float]:
        """(sum, count) of the server's searchrl_retriever_batch_size histogram, and the seconds its worker spent in
        the encode/search/lookup stages (searchrl_retriever_stage_seconds)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            text = r.read().decode()
        out = {"sum": 0.0, "count": 0.0, "stages": 0.0}
        for fam in text_string_to_metric_families(text):
            if fam.name == "searchrl_retriever_batch_size":
                for smp in fam.samples:
                    if smp.name.endswith("_sum"):
                        out["sum"] = smp.value
                    elif smp.name.endswith("_count"):
                        out["count"] = smp.value
            elif fam.name == "searchrl_retriever_stage_seconds":
                out["stages"] += sum(smp.value for smp in fam.samples if smp.name.endswith("_sum"))
        return out["sum"], out["count"], out["stages"]

    def add(key: tuple[str, int, int], res: tuple[list[float], int, float]) -> None:
        lat, n, wall = acc.get(key, ([], 0, 0.0))
        acc[key] = (lat + res[0], n + res[1], wall + res[2])

    store = loaded.store

    def inproc_call(b: int) -> int:
        _, rows = loaded.search(src.take(b), args.top_k)
        for row in rows:  # passage lookup, as the service does
            for r in row:
                store.get(int(r))
        return b

    def thread_init() -> None:  # OpenMP thread counts are per thread: set them in every client thread
        set_faiss_threads(args.faiss_threads)

    slice_s = args.duration / args.rounds
    keys = [(m, b, c) for m in ("inproc", "grpc", "http") if m in modes for b in batches for c in concs]
    print(
        f"\n{len(keys)} cells x {args.rounds} interleaved rounds of {slice_s:.1f} s "
        "(3x for large-batch single-client cells: few requests per second, and they carry the 15% target; 2x for the "
        "single-query cells with 1 and 8 clients, which carry the concurrency targets)",
        flush=True,
    )

    def slice_for(b: int, c: int) -> float:
        if b >= 32 and c == 1:
            return slice_s * 3
        return slice_s * (2 if b == 1 and c in (1, 8) else 1)

    async def run_all(proc: object | None, http_port: int) -> None:
        client = session = None
        if proc is not None:
            import aiohttp

            from searchrl.client import RetrievalClient

            client = RetrievalClient(proc.target)  # type: ignore[attr-defined]
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        url = f"http://127.0.0.1:{http_port}/retrieve"
        try:
            for rnd in range(args.rounds):
                for key in keys:
                    mode, b, c = key
                    if mode == "inproc":
                        res = await asyncio.to_thread(
                            closed_loop_threads, c, slice_for(b, c), lambda b=b: inproc_call(b), rnd == 0
                        )
                    else:
                        if mode == "grpc":

                            async def call(b: int = b) -> int:
                                await client.search_results(src.take(b), args.top_k, skip_cache=True)  # type: ignore[union-attr]
                                return b

                        else:

                            async def call(b: int = b) -> int:
                                body = {"queries": src.take(b), "topk": args.top_k, "return_scores": True}
                                async with session.post(url, json=body) as r:  # type: ignore[union-attr]
                                    await r.read()
                                    if r.status != 200:
                                        raise RuntimeError(await r.text())
                                return b

                        if rnd == 0:  # warm-up round (connections, first batches), outside the server counters
                            await asyncio.gather(*(call() for _ in range(c)))
                        before = scrape_batches(proc.metrics_port)  # type: ignore[attr-defined]
                        res = await closed_loop_async(c, slice_for(b, c), call)
                        after = scrape_batches(proc.metrics_port)  # type: ignore[attr-defined]
                        st = batch_stats.setdefault(key, [0.0, 0.0, 0.0])
                        for j in range(3):
                            st[j] += after[j] - before[j]
                    add(key, res)
                print(f"  round {rnd + 1}/{args.rounds} done (load avg {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            if client is not None:
                await client.close()
            if session is not None:
                await session.close()

    if "grpc" in modes or "http" in modes:
        from searchrl.testing import ServiceProcess, free_port

        http_port = free_port()
        srv_args = [
            "--index-dir",
            str(index_dir),
            "--http-port",
            str(http_port),
            "--torch-threads",
            str(args.torch_threads),
            "--faiss-threads",
            str(args.faiss_threads),
            "--query-dtype",
            args.query_dtype,
            "--encode-workers",
            str(args.encode_workers),
        ]
        if args.micro_batch_wait_ms is not None:
            srv_args += ["--micro-batch-wait-ms", str(args.micro_batch_wait_ms)]
        if args.micro_batch_max is not None:
            srv_args += ["--micro-batch-max", str(args.micro_batch_max)]
        with ServiceProcess("retriever", srv_args, env={"SEARCHRL_LOG_LEVEL": "WARNING"}) as proc:
            asyncio.run(run_all(proc, http_port))
            rss = 0
            try:
                for ln in open(f"/proc/{proc.proc.pid}/status"):
                    if ln.startswith("VmRSS"):
                        rss = int(ln.split()[1]) // 1024
            except OSError:
                pass
            print(
                f"  server RSS after the run: {rss} MiB (model, index, runtime; passages are memory-mapped)", flush=True
            )
    else:
        asyncio.run(run_all(None, 0))
    cells = [
        Cell(
            m,
            b,
            c,
            n / wall,
            _pct(lat, 50),
            _pct(lat, 99),
            len(lat),
            _ratio(batch_stats.get((m, b, c))),
            batch_stats[(m, b, c)][2] / wall if (m, b, c) in batch_stats else float("nan"),
        )
        for (m, b, c), (lat, n, wall) in acc.items()
    ]

    # table
    by = {(c.mode, c.batch, c.clients): c for c in cells}
    lines += [
        "",
        f"== throughput and latency ({args.duration:.0f} s per cell, closed-loop clients, top-k {args.top_k}; "
        "server batch = mean queries per micro-batch; worker busy = share of the time the server's worker thread "
        "spent encoding, searching and looking passages up)",
    ]
    lines.append(
        f"{'mode':<8}{'batch':>6}{'clients':>8}{'queries/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'p99/p50':>8}{'requests':>9}{'server batch':>13}{'worker busy':>12}"
    )
    for c in cells:
        lines.append(
            f"{c.mode:<8}{c.batch:>6}{c.clients:>8}{c.qps:>11.1f}{c.p50_ms:>9.1f}{c.p99_ms:>9.1f}{c.p99_ms / c.p50_ms:>8.2f}{c.requests:>9}"
            + ("" if c.mean_batch != c.mean_batch else f"{c.mean_batch:>13.1f}{c.busy * 100:>11.0f}%")
        )

    def ratio(a: tuple[str, int, int], b: tuple[str, int, int], f: Callable[[Cell, Cell], float]) -> float | None:
        return f(by[a], by[b]) if a in by and b in by else None

    checks = []
    r1 = ratio(("grpc", 32, 1), ("inproc", 32, 1), lambda a, b: a.qps / b.qps)
    if r1 is not None:
        checks.append(("gRPC batch 32 throughput / in-process batch 32", r1, ">= 0.85", r1 >= 0.85))
    r1h = ratio(("http", 32, 1), ("inproc", 32, 1), lambda a, b: a.qps / b.qps)
    if r1h is not None:
        checks.append(("HTTP batch 32 throughput / in-process batch 32", r1h, ">= 0.85", r1h >= 0.85))
    for mode in ("grpc", "http"):
        r2 = ratio((mode, 1, 8), (mode, 1, 1), lambda a, b: a.qps / b.qps)
        if r2 is not None:
            checks.append((f"{mode}: 8 single-query clients / 1 client throughput", r2, ">= 3.0", r2 >= 3.0))
        if (mode, 1, 8) in by:
            c = by[(mode, 1, 8)]
            checks.append(
                (f"{mode}: p99 / p50 with 8 clients", c.p99_ms / c.p50_ms, "<= 3.0", c.p99_ms / c.p50_ms <= 3.0)
            )
    r3 = ratio(("inproc", 1, 8), ("inproc", 1, 1), lambda a, b: a.qps / b.qps)
    if r3 is not None:
        checks.append(("(reference) in-process threads: 8 clients / 1 client", r3, "", True))
    lines += ["", "== targets"]
    for name, value, target, ok in checks:
        lines.append(f"{name:<56}{value:>8.2f}  {target:<8}{'' if not target else ('PASS' if ok else 'MISS')}")

    if not args.skip_memory:
        lines += memory(index_dir, loaded, queries, wiki=not args.index_dir)
    lines.append(f"\n(total {time.perf_counter() - t_start:.0f} s; load average now {os.getloadavg()[0]:.1f})")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
