"""Training steps per hour, sync vs async rollouts, side by side in one run (issue #16).

Both modes run the same processes and settings: a private Redis, a PolicyService (SmolLM2-135M-Instruct, transformers
engine) that the trainer pushes its weights to after every update (``rollout.engine=remote``), the demo's recipe
(``local_demo.yaml``: LoRA, 2 turns of <= 24 tokens, forced first search), FanOutQA sub-questions, a FAISS index of the
first ``--index-docs`` bundled Wikipedia summaries searched in-process, batch 4 x group 4 by default.

* ``sync``: the trainer samples each step's episodes through the PolicyService with the current weights, then
  updates (rollout and update alternate).
* ``async``: ``--workers`` ``searchrl rollout-worker`` processes sample groups into the Redis group stream while the
  trainer updates; groups at most ``max_staleness`` (1) versions old are trained with the importance ratio against
  the sampling log-probs.

Each mode runs at every ``--latency`` (seconds added before each search: 0 is the local index as it is, 1 is a web
search API). Steps per hour count the steps after the first (``--steps`` - 1 of them, from the end of step 1 to the
end of the last), so start-up and first-touch costs are out. The trainer idle share is the share of those steps'
wall time not spent in the update (waiting for groups, pushing weights); the worker idle share is read from the
workers' ``searchrl_worker_idle_share`` gauge. Each run gets a fresh PolicyService (the base weights) and a fresh
stream prefix.

    python benchmarks/async_bench.py                          # latency 0 and 1 s, 5 steps per run
    python benchmarks/async_bench.py --latency 1 --steps 4 --workers 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "trainer/searchrl/trainer/configs/local_demo.yaml"


@dataclass
class Run:
    mode: str
    latency_s: float
    step_ends: list[float] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    worker_idle: float | None = None

    def timed(self) -> list[dict[str, float]]:
        return self.history[1:]

    @property
    def steps_per_hour(self) -> float:
        span = self.step_ends[-1] - self.step_ends[0]
        return 3600.0 * (len(self.step_ends) - 1) / span if span > 0 else 0.0

    def mean(self, key: str) -> float:
        rows = [r[key] for r in self.timed() if key in r]
        return sum(rows) / len(rows) if rows else float("nan")


def scrape(port: int, name: str) -> float | None:
    """The value of an unlabelled gauge on a Prometheus endpoint, or None."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def run_mode(mode: str, latency: float, args: argparse.Namespace, redis_url: str, index_dir: Path, tmp: Path) -> Run:
    from searchrl.testing import ServiceProcess, free_port
    from searchrl.trainer.config import load_config
    from searchrl.trainer.local.trainer import LocalTrainer

    run = Run(mode, latency)
    name = f"{mode}-{latency:g}s"
    # Threads: in sync mode rollout and update alternate, so each gets every core (torch's default). In async mode
    # they run at once: the PolicyService, the trainer and each worker get --async-threads threads, as two-thread
    # OpenMP teams of two processes on two cores slowed both 4-7x (first runs of this benchmark).
    threads = ["--torch-threads", str(args.async_threads)] if mode == "async" else []
    with ServiceProcess(
        "policy", ["--max-batch-size", "16", "--weights-roots", str(tmp), *threads], timeout_s=300
    ) as policy:
        cfg = load_config(
            DEMO_CONFIG,
            [
                f"data.batch_size={args.batch_size}",
                f"data.group_size={args.group_size}",
                f"trainer.max_steps={args.steps}",
                f"trainer.output_dir={tmp / name}",
                "checkpoint.every_steps=0",
                "checkpoint.save_final=false",
                "logging.metrics_port=0",
                f"logging.mlflow_tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                "rollout.engine=remote",
                f"rollout.policy_target={policy.target}",
                f"rollout.mode={mode}",
                # set in every run: torch's thread count is per process, and runs share this one
                f"model.torch_threads={args.async_threads if mode == 'async' else os.cpu_count()}",
                "rollout.search.backend=inprocess",
                f"rollout.search.index_dir={index_dir}",
                f"rollout.search.added_latency_s={latency}",
                f"rollout.queue.redis_url={redis_url}",
                f"rollout.queue.prefix=bench:{uuid.uuid4().hex[:8]}",
                "guards.action=warn",
                *args.set,
            ],
        )
        workers: list[tuple[subprocess.Popen[bytes], int]] = []
        if mode == "async":
            cfg_path = tmp / f"{name}.yaml"
            cfg_path.write_text(cfg.to_yaml())
            for i in range(args.workers):
                port = free_port()
                log = open(tmp / f"{name}-worker{i}.log", "wb")  # noqa: SIM115 - closed with the process
                cmd = [sys.executable, "-m", "searchrl", "rollout-worker", "--config", str(cfg_path),
                       "--name", f"w{i}", "--metrics-port", str(port)]  # fmt: skip
                env = {**os.environ, "OMP_NUM_THREADS": str(args.async_threads)}
                workers.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), port))
        trainer = LocalTrainer(cfg)
        try:
            trainer.setup(resume=False)

            def progress(step: int, m: dict[str, float]) -> None:
                run.step_ends.append(time.perf_counter())
                print(
                    f"  {name} step {step}: {m['time/total_s']:.1f}s (update {m['time/update_s']:.1f}s, idle "
                    f"{m['time/trainer_idle_share']:.2f}) reward {m['reward/mean']:.3f}",
                    flush=True,
                )

            result = trainer.fit(progress)
            run.history = result.history
            idle = [scrape(port, "searchrl_worker_idle_share") for _p, port in workers]
            vals = [v for v in idle if v is not None]
            run.worker_idle = sum(vals) / len(vals) if vals else None
        finally:
            trainer.close()
            for proc, _port in workers:
                proc.terminate()
            for proc, _port in workers:
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="GRPO steps per run (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=4, help="questions per step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per question (GRPO n)")
    parser.add_argument("--workers", type=int, default=1, help="rollout workers in async mode")
    parser.add_argument("--latency", default="0,1", help="comma-separated seconds added before each search")
    parser.add_argument("--modes", default="sync,async", help="comma-separated modes to run")
    parser.add_argument("--index-docs", type=int, default=300, help="Wikipedia summaries in the benchmark index")
    parser.add_argument(
        "--async-threads",
        type=int,
        default=1,
        help="torch/OpenMP threads of the PolicyService, the trainer and each worker in async mode (sync: torch's "
        "default, every core)",
    )
    parser.add_argument("--set", action="append", default=[], help="extra config override for every run")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is not timed)")

    from rich.console import Console
    from rich.table import Table

    from searchrl.retriever.index.build import build_index
    from searchrl.testing import redis_server

    console = Console(width=160)
    latencies = [float(x) for x in args.latency.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="searchrl-async-bench-") as d, redis_server() as redis_url:
        tmp = Path(d)
        build_index("wiki", tmp / "index", limit=args.index_docs, progress=False)
        for latency in latencies:
            for mode in modes:
                console.print(f"[bold]{mode}, {latency:g} s per search[/] (load average {os.getloadavg()[0]:.1f})")
                runs.append(run_mode(mode, latency, args, redis_url, tmp / "index", tmp))

    table = Table(
        title=f"GRPO steps per hour on {os.cpu_count()} cores: batch {args.batch_size} x group {args.group_size}, "
        f"{args.steps - 1} timed steps per run, {args.workers} worker(s) in async mode"
    )
    for col in ("search latency", "mode", "steps/h", "step s", "update s", "trainer idle", "worker idle",
                "episodes/s", "group age (versions)", "stale groups", "reward", "x sync"):  # fmt: skip
        table.add_column(col, justify="left" if col == "mode" else "right")
    for run in runs:
        sync = next((r for r in runs if r.mode == "sync" and r.latency_s == run.latency_s), None)
        ratio = f"{run.steps_per_hour / sync.steps_per_hour:.2f}" if sync and sync.steps_per_hour else ""
        table.add_row(
            f"{run.latency_s:g} s",
            run.mode,
            f"{run.steps_per_hour:.0f}",
            f"{3600 / run.steps_per_hour:.1f}" if run.steps_per_hour else "",
            f"{run.mean('time/update_s'):.1f}",
            f"{run.mean('time/trainer_idle_share'):.2f}",
            f"{run.worker_idle:.2f}" if run.worker_idle is not None else "-",
            f"{run.mean('time/episodes_per_s'):.2f}",
            f"{run.mean('stream/group_age_versions'):.2f}" if run.mode == "async" else "0",
            f"{sum(r.get('stream/stale_groups', 0) for r in run.history):.0f}",
            f"{run.mean('reward/mean'):.3f}",
            ratio,
        )
    console.print(table)
    console.print(
        "steps/h: timed steps over the wall time from the end of step 1 to the end of the last. trainer idle: share "
        "of a step's wall time outside the update. worker idle: share of the worker's life with no task in hand."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
