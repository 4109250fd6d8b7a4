"""Reward scoring throughput: in-process on one core vs through the RewardService over gRPC (server on the other core).

Responses are synthetic but shaped like ReSearch rollouts: MuSiQue dev questions and gold answers from
``data/benchmarks``, 0-3 searches with five Wikipedia-summary documents each (the embedded corpus; random words when
it is not installed), a mix of right, partly right, wrong and badly formatted answers (~1-5 kB per response).

Measured side by side in one run:

* in-process ``score_batch`` per scheme, the process pinned to one core (``os.sched_setaffinity``);
* gRPC ``Score`` with batch 1 (sequential calls through the SDK: a latency-bound floor) and batch 256 (the SDK, one
  call at a time, and pre-built requests with a few calls in flight), the server a ``searchrl serve reward``
  subprocess pinned to the other core;
* the thread-offload threshold of the server (``--offload-min-batch``: always inline, the default 1024, always in a
  worker thread): throughput at batch 256, and the latency of health checks answered while 8,192-item batches are
  being scored (Kubernetes gRPC probes time out after 1 s by default).

    python benchmarks/reward_bench.py                 # defaults: < ~1 min on 2 busy cores
    python benchmarks/reward_bench.py --n 100000 --rounds 5

Targets: >= 20,000 responses/s in-process; gRPC batch 256 within 2x of in-process (ratio >= 0.5).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from searchrl.assets import benchmarks_dir, wiki_summaries_path
from searchrl.client.reward import RewardClient
from searchrl.reward.scoring import SCHEMES, score_batch
from searchrl.reward.v1 import reward_pb2, reward_pb2_grpc
from searchrl.services.reward.server import ENUM_BY_SCHEME
from searchrl.testing import free_port, wait_for_health


def research_response(rng: random.Random, question: str, gold: list[str], texts: list[str]) -> str:
    """One ReSearch-shaped rollout response to ``question``: 0-3 searches with five documents each (cut from
    ``texts``), then an answer that is right, partly right (``gold[0]`` plus a word), wrong or malformed."""
    parts = [f"<think> I need to find out: {question} </think>\n"]
    for _s in range(rng.choice((0, 1, 1, 2, 2, 3))):
        parts.append(f"<search> {question[:60]} </search>\n<result>\n")
        parts.append(
            "\n".join(f"({k + 1}) " + " ".join(rng.choice(texts).split()[: rng.randint(25, 60)]) for k in range(5))
        )
        parts.append("\n</result>\n<think> The documents mention several candidates. </think>\n")
    kind = rng.random()
    if kind < 0.4:
        answer = gold[0]
    elif kind < 0.6:
        answer = f"{gold[0]} of {rng.choice(texts).split()[0]}"
    else:
        answer = " ".join(rng.choice(texts).split()[:3])
    if kind > 0.9:  # malformed: missing box, doubled answer, unbalanced think
        parts.append(
            rng.choice([f"<answer> {answer} </answer>", f"<answer>\\boxed{{{answer}}}</answer>" * 2, "<think>"])
        )
    else:
        parts.append(f"<answer> The final answer is \\boxed{{{answer}}} </answer>")
    return "".join(parts)


def make_workload(n: int, seed: int = 0) -> tuple[list[str], list[list[str]], list[bool]]:
    """``n`` ReSearch-style responses, their gold answers and EOS flags."""
    rng = random.Random(seed)
    rows = [json.loads(line) for line in (benchmarks_dir() / "musique" / "dev.jsonl").read_text().splitlines()]
    try:
        texts = [v["extract"] for v in json.loads(wiki_summaries_path().read_text()).values() if v.get("extract")]
    except Exception:  # noqa: BLE001 - corpus package not installed: random words
        vocab = [f"w{i}" for i in range(5000)]
        texts = [" ".join(rng.choices(vocab, k=60)) for _ in range(2000)]

    responses, golds, eos = [], [], []
    for _ in range(n):
        row = rng.choice(rows)
        gold = row["golden_answers"]
        responses.append(research_response(rng, row["question"], gold, texts))
        golds.append(list(gold))
        eos.append(rng.random() > 0.03)
    return responses, golds, eos


Rate = tuple[float, float]  # (items per wall-clock second, items per CPU-second of the scoring process)


def best_rate(fn: Callable[[], int], rounds: int, cpu: Callable[[], float] = time.thread_time) -> Rate:
    """Rates of the best (by wall clock) of ``rounds`` runs of ``fn``, which returns how many items it handled.

    Two clocks, because the cores are shared with other work: wall-clock rates include time other processes took the
    core; rates per CPU-second of the scoring process (``cpu``) do not.
    """
    best: Rate = (0.0, 0.0)
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), cpu()
        n = fn()
        wall, used = time.perf_counter() - t0, cpu() - c0
        if n / wall > best[0]:
            best = (n / wall, n / used if used > 0 else float("nan"))
    return best


class Server:
    """A ``searchrl serve reward`` child pinned to ``core``."""

    def __init__(self, core: int | None, extra: list[str]) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "searchrl",
            "serve",
            "reward",
            "--grpc-port",
            str(self.port),
            "--metrics-port",
            "-1",
        ]
        cmd += ["--log-level", "WARNING", *extra]
        pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)  # noqa: PLW1509
        wait_for_health(self.target, timeout_s=60, proc=self.proc)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads), from ``/proc/<pid>/stat``."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def requests_for(
    responses: list[str], golds: list[list[str]], eos: list[bool], batch: int
) -> list[reward_pb2.ScoreRequest]:
    out = []
    for i in range(0, len(responses), batch):
        req = reward_pb2.ScoreRequest(scheme=ENUM_BY_SCHEME["research"])
        for r, g, e in zip(responses[i : i + batch], golds[i : i + batch], eos[i : i + batch], strict=True):
            req.items.add(response=r, golden_answers=g, ended_with_eos=e)
        out.append(req)
    return out


async def grpc_rates(
    server: Server,
    work: tuple[list[str], list[list[str]], list[bool]],
    n1: int,
    rounds: int,
    only_pipelined: bool = False,
) -> dict[str, Rate]:
    """Wall-clock and per-server-CPU-second rates of the gRPC paths."""
    responses, golds, eos = work
    rates: dict[str, Rate] = {}

    async def measure(fn: Callable[[], Any], n: int) -> Rate:
        best: Rate = (0.0, 0.0)
        for _ in range(rounds):
            t0, c0 = time.perf_counter(), server.cpu_seconds()
            await fn()
            wall, used = time.perf_counter() - t0, server.cpu_seconds() - c0
            if n / wall > best[0]:
                best = (n / wall, n / used if used > 0 else float("nan"))
        return best

    async with RewardClient(server.target) as client:
        await client.score(responses[:8], golds[:8])  # warm up the channel

        def sdk(batch: int, n: int) -> Callable[[], Any]:
            async def run() -> None:
                for i in range(0, n, batch):
                    await client.score(responses[i : i + batch], golds[i : i + batch], "research", eos[i : i + batch])

            return run

        if not only_pipelined:
            rates["gRPC SDK, batch 1 (sequential calls)"] = await measure(sdk(1, n1), n1)
            rates["gRPC SDK, batch 256 (sequential calls)"] = await measure(sdk(256, len(responses)), len(responses))
        prebuilt = requests_for(responses, golds, eos, 256)
        stub = reward_pb2_grpc.RewardServiceStub(client.channel)
        sem = asyncio.Semaphore(4)

        async def one(req: reward_pb2.ScoreRequest) -> None:
            async with sem:
                await stub.Score(req, timeout=60)

        async def pipelined() -> None:
            await asyncio.gather(*(one(r) for r in prebuilt))

        rates["gRPC pre-built requests, batch 256 (4 in flight)"] = await measure(pipelined, len(responses))
    return rates


async def health_latency_under_load(
    target: str, work: tuple[list[str], list[list[str]], list[bool]], seconds: float
) -> tuple[float, float]:
    """p50 and max latency (ms) of health checks sent every 10 ms while 8,192-item Score calls run back to back."""
    responses, golds, eos = work
    big = requests_for(
        (responses * (8192 // len(responses) + 1))[:8192],
        (golds * (8192 // len(golds) + 1))[:8192],
        (eos * (8192 // len(eos) + 1))[:8192],
        8192,
    )[0]
    lat: list[float] = []
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", 256 << 20)]) as ch:
        stub = reward_pb2_grpc.RewardServiceStub(ch)
        health = health_pb2_grpc.HealthStub(ch)
        stop = time.perf_counter() + seconds

        async def load() -> None:
            while time.perf_counter() < stop:
                await stub.Score(big, timeout=120)

        async def probe() -> None:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                await health.Check(health_pb2.HealthCheckRequest(), timeout=30)
                lat.append((time.perf_counter() - t0) * 1000)
                await asyncio.sleep(0.01)

        await asyncio.gather(load(), probe())
    return statistics.median(lat), max(lat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="responses per measurement [20000]")
    ap.add_argument("--n-batch1", type=int, default=2_000, help="responses sent one per call [2000]")
    ap.add_argument("--rounds", type=int, default=3, help="repetitions; the best is reported [3]")
    ap.add_argument("--load-seconds", type=float, default=4.0, help="duration of the health-under-load probe [4]")
    args = ap.parse_args(argv)

    cores = sorted(os.sched_getaffinity(0))
    client_core, server_core = cores[0], (cores[1] if len(cores) > 1 else None)
    os.sched_setaffinity(0, {client_core})
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(f"cores available: {cores}; this process pinned to {client_core}, server to {server_core}")
    work = make_workload(args.n)
    mean_len = sum(map(len, work[0])) / len(work[0])
    console.print(f"workload: {args.n} responses, mean {mean_len:.0f} chars")

    rows: list[tuple[str, Rate]] = []
    for scheme in SCHEMES:
        rate = best_rate(
            lambda s=scheme: len(score_batch(work[0], work[1], s, work[2], info_tag="result")), args.rounds
        )
        rows.append((f"in-process score_batch, {scheme}", rate))
    in_process = rows[0][1]

    offload_rows: list[tuple[str, Rate, float, float]] = []
    pipelined = "gRPC pre-built requests, batch 256 (4 in flight)"
    for offload, label in (
        (1024, "default: thread from 1,024 items"),
        (0, "always inline"),
        (1, "always a worker thread"),
    ):
        server = Server(server_core, ["--offload-min-batch", str(offload)])
        try:
            if offload == 1024:
                rates = asyncio.run(grpc_rates(server, work, args.n_batch1, args.rounds))
                rows += list(rates.items())
            else:
                rates = asyncio.run(grpc_rates(server, work, args.n_batch1, args.rounds, only_pipelined=True))
            p50, worst = asyncio.run(health_latency_under_load(server.target, work, args.load_seconds))
        finally:
            server.stop()
        offload_rows.append((f"{label} (--offload-min-batch {offload})", rates[pipelined], p50, worst))

    table = Table(title="Reward scoring throughput, responses/s (research scheme unless named)")
    table.add_column("path")
    table.add_column("wall clock", justify="right")
    table.add_column("per CPU-s of the scorer", justify="right")
    table.add_column("CPU ratio vs in-process", justify="right")
    for name, (wall, per_cpu) in rows:
        table.add_row(name, f"{wall:,.0f}", f"{per_cpu:,.0f}", f"{per_cpu / in_process[1]:.2f}")
    console.print(table)
    console.print(
        "scorer = this process pinned to one core (in-process) or the server process pinned to the other core (gRPC; "
        "its CPU time includes gRPC's threads and protobuf work)"
    )

    t2 = Table(title="Server scoring inline vs in a worker thread")
    t2.add_column("server scoring")
    t2.add_column("batch-256 responses/s (wall)", justify="right")
    t2.add_column("per server CPU-s", justify="right")
    t2.add_column("health p50 ms under 8k batches", justify="right")
    t2.add_column("health max ms", justify="right")
    for label, (wall, per_cpu), p50, worst in offload_rows:
        t2.add_row(label, f"{wall:,.0f}", f"{per_cpu:,.0f}", f"{p50:.1f}", f"{worst:.1f}")
    console.print(t2)

    batch256 = [r for n, r in rows if "batch 256" in n]
    best_wall = max(w for w, _ in batch256)
    best_cpu = max(c for _, c in batch256)
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    console.print(
        f"in-process: {in_process[0]:,.0f}/s wall, {in_process[1]:,.0f} per CPU-s (target >= 20,000: "
        f"{met(in_process[1] >= 20_000)} per CPU-s, {met(in_process[0] >= 20_000)} wall); gRPC batch 256 vs in-process: {best_wall / in_process[0]:.2f}x wall, "
        f"{best_cpu / in_process[1]:.2f}x per CPU-s (target >= 0.5, i.e. within 2x: {met(best_cpu / in_process[1] >= 0.5)})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
