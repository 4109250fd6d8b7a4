"""Simulated-search benchmark: the SimulatedSearchService (gRPC + Redis cache) against the engine called directly.

With the embedded SmolLM2-135M-Instruct on the CPU transformers engine, it prints one table:

* **cold cache**: requests of ``--batch`` new queries through the service with the Redis cache on (every query is a
  miss and is generated);
* **warm cache**: the same requests again (every query is a hit; no generation);
* **engine direct** vs **service, no cache**: the same requests simulated in-process with
  :class:`~searchrl.simulator.simulate.DocumentSimulator` (prompt + engine + parsing, no gRPC, no cache) and through the
  service with ``skip_cache``, run alternately side by side with identical seeds, so both generate the same tokens;
  the service overhead is the ratio of their mean latencies (target: <= 10% at batch >= 8);
* **concurrent callers**: ``--concurrency`` clients with one query each at the same time, against the same queries
  one after the other, through the service (the transformers engine decodes concurrent requests in one batch).

Columns: documents/s (top-k documents returned per second of request latency), p50/p99 request latency, and the
tokens generated. Sizes are modest by default (about 2-4 minutes on 2 busy cores); scale with the flags.

    .venv/bin/python benchmarks/simulator_bench.py
    .venv/bin/python benchmarks/simulator_bench.py --batch 16 --reps 5 --top-k 5 --tokens-per-doc 48
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from searchrl.client.base import ChannelOptions
from searchrl.client.simulation import SimulatorClient
from searchrl.serving.runtime import GrpcServer, ServiceSpec
from searchrl.simulation.v1 import simulation_pb2_grpc
from searchrl.simulator.curriculum import Quality
from searchrl.simulator.prompts import Conditioning
from searchrl.simulator.server import SERVICE_NAME, SimulatorConfig, SimulatorServicer
from searchrl.simulator.simulate import SimulationItem

TOPICS = [
    "capital of {}",
    "population of {}",
    "official language of {}",
    "currency of {}",
    "largest city in {}",
    "highest mountain in {}",
    "national dish of {}",
    "head of state of {}",
]
PLACES = ["France", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "Canada", "India", "Spain", "Ghana", "Nepal"]


def queries(n: int, salt: str) -> list[str]:
    """``n`` distinct queries (the salt makes them new to the cache)."""
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)].format(PLACES[(i // len(TOPICS)) % len(PLACES)])
        out.append(f"{topic} ({salt}{i})")
    return out


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await fn()
    return time.perf_counter() - start, result


def row(name: str, latencies: list[float], docs_per_request: int, tokens: int) -> list[str]:
    lat = np.array(latencies)
    docs_s = docs_per_request * len(lat) / lat.sum()
    return [
        name,
        str(len(lat)),
        f"{docs_s:,.1f}",
        f"{np.percentile(lat, 50) * 1000:,.1f}",
        f"{np.percentile(lat, 99) * 1000:,.1f}",
        f"{tokens:,}",
    ]


async def run(args: argparse.Namespace) -> None:
    from searchrl.assets import policy_model_path
    from searchrl.serving.cache import InProcessCache, SearchCache
    from searchrl.simulator.engines import TransformersSimulationEngine
    from searchrl.testing import redis_server

    engine = TransformersSimulationEngine(
        policy_model_path(args.model),
        max_batch_size=max(args.batch, args.concurrency),
        torch_threads=args.torch_threads,
    )
    stack = contextlib.ExitStack()
    if shutil.which("redis-server"):
        redis_url = stack.enter_context(redis_server())
        cache: Any = SearchCache(redis_url, ttl_s=3600, namespace=f"bench-{uuid.uuid4().hex}")
        cache_kind = "redis"
    else:
        cache, cache_kind = InProcessCache(ttl_s=3600), "in-process (no redis-server)"
    config = SimulatorConfig(
        grpc_port=0,
        metrics_port=-1,
        top_k=args.top_k,
        tokens_per_doc=args.tokens_per_doc,
        max_retries=args.max_retries,
        max_batch=max(256, args.batch),
        seed=args.seed,
    )
    servicer = SimulatorServicer(config, engine, cache)
    spec = ServiceSpec(SERVICE_NAME, servicer, simulation_pb2_grpc.add_SimulatedSearchServiceServicer_to_server)
    server = GrpcServer(config, [spec], "simulator")
    await server.start()
    client = SimulatorClient(f"127.0.0.1:{server.port}", ChannelOptions(timeout_s=3600))
    sim = servicer.simulator
    k, b = args.top_k, args.batch
    table: list[list[str]] = []
    cond = Conditioning()
    try:
        # warm-up: load paths, first prefill
        await client.search(queries(2, "warmup"), k, quality="useful", skip_cache=True)
        tokens0 = engine.engine.generated_tokens

        # cold then warm cache through the service
        batches = [queries(b, f"c{r}-") for r in range(args.reps)]
        cold, warm = [], []
        for qs in batches:
            dt, resp = await timed(lambda qs=qs: client.search(qs, k, quality="useful"))
            cold.append(dt)
            assert not any(r.cache_hit for r in resp.results)
        cold_tokens = engine.engine.generated_tokens - tokens0
        hits = 0
        for qs in batches:
            dt, resp = await timed(lambda qs=qs: client.search(qs, k, quality="useful"))
            warm.append(dt)
            hits += sum(r.cache_hit for r in resp.results)
        table.append(row(f"service, cold cache (batch {b})", cold, b * k, cold_tokens))
        table.append(row(f"service, warm cache (batch {b}; {hits}/{b * len(batches)} hits)", warm, b * k, 0))

        # engine direct vs service without cache, alternating, identical seeds
        direct, service = [], []
        direct_tokens = service_tokens = 0
        for r in range(args.reps):
            qs = queries(b, f"d{r}-")
            items = [SimulationItem(q, Quality.USEFUL, k, cond) for q in qs]

            async def call_direct(items: list[SimulationItem] = items, r: int = r) -> Any:
                return await sim.simulate(items, seed=r + 1)

            async def call_service(qs: list[str] = qs, r: int = r) -> Any:
                return await client.search(qs, k, quality="useful", seed=r + 1, skip_cache=True)

            order = [("direct", call_direct), ("service", call_service)]
            if r % 2:
                order.reverse()
            for name, fn in order:
                before = engine.engine.generated_tokens
                dt, _ = await timed(fn)
                used = engine.engine.generated_tokens - before
                if name == "direct":
                    direct.append(dt)
                    direct_tokens += used
                else:
                    service.append(dt)
                    service_tokens += used
        table.append(row(f"engine direct, in-process (batch {b})", direct, b * k, direct_tokens))
        table.append(row(f"service, skip_cache (batch {b})", service, b * k, service_tokens))
        overhead = statistics.mean(service) / statistics.mean(direct) - 1.0

        # concurrent single-query callers vs the same calls one after the other
        c = args.concurrency
        seq, conc = [], []
        before = engine.engine.generated_tokens
        for q in queries(c, "s-"):
            dt, _ = await timed(lambda q=q: client.search([q], k, quality="useful", skip_cache=True))
            seq.append(dt)
        seq_tokens = engine.engine.generated_tokens - before
        qs = queries(c, "p-")
        before = engine.engine.generated_tokens
        start = time.perf_counter()
        lats = await asyncio.gather(
            *(timed(lambda q=q: client.search([q], k, quality="useful", skip_cache=True)) for q in qs)
        )
        wall_conc = time.perf_counter() - start
        conc = [dt for dt, _ in lats]
        conc_tokens = engine.engine.generated_tokens - before
        table.append(row(f"service, {c} callers one after another", seq, k, seq_tokens))
        table.append(row(f"service, {c} concurrent callers", conc, k, conc_tokens))
    finally:
        await client.close()
        await server.stop(0)
        await cache.close()
        await engine.close()
        stack.close()

    headers = ["workload", "requests", "docs/s", "p50 ms", "p99 ms", "tokens"]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    print(
        f"\nsimulator benchmark: {args.model}, top_k={k}, tokens/doc={args.tokens_per_doc}, max_retries={args.max_retries}, cache={cache_kind}"
    )
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    for r in table:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    speedup = statistics.mean(cold) / statistics.mean(warm)
    print(
        f"\nwarm cache vs cold: {speedup:,.0f}x lower mean latency ({statistics.mean(warm) * 1000:.1f} ms per request of {b})"
    )
    print(
        f"service overhead vs engine direct at batch {b}: {overhead * 100:+.1f}% of mean latency "
        f"(target <= +10%: {'met' if overhead <= 0.10 else 'NOT met'}); tokens direct {direct_tokens:,} vs service {service_tokens:,}"
    )
    print(
        f"{c} concurrent callers finished in {wall_conc:.1f} s wall vs {sum(seq):.1f} s one after another "
        f"({sum(seq) / wall_conc:.1f}x): the engine batches concurrent requests"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="simulator checkpoint (default: the embedded one)")
    p.add_argument("--batch", type=int, default=8, help="queries per request (>= 8 for the overhead target)")
    p.add_argument("--reps", type=int, default=2, help="requests per workload")
    p.add_argument("--top-k", type=int, default=2, help="documents per query")
    p.add_argument("--tokens-per-doc", type=int, default=16, help="generation budget per document, in tokens")
    p.add_argument("--max-retries", type=int, default=0, help="extra generation rounds for short outputs")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent single-query callers")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads of the engine (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
