"""Local GRPO trainer step time on CPU: seconds per step split into rollout / reward / update, and peak RSS.

Runs the real trainer (``searchrl.trainer.local``) with SmolLM2-135M-Instruct on FanOutQA sub-questions, batch 4
questions x group 4 samples by default, searching a FAISS index of the bundled Wikipedia summaries in-process (built
in a temporary folder from the first ``--index-docs`` summaries), and prints one row per step plus the mean.

    python benchmarks/train_bench.py                      # 1 step, 4 x 4, short responses (a few minutes on 2 cores)
    python benchmarks/train_bench.py --steps 5 --max-response-tokens 512 --max-turns 4   # closer to the demo
    python benchmarks/train_bench.py --compare-share-prompt   # + the same step with the prompt forward not shared

The update time is dominated by the forward/backward passes over prompt + response tokens (the reference model's
forward pass is part of it); ``update tok/s`` counts those tokens per second of update.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1, help="GRPO steps to time")
    parser.add_argument("--batch-size", type=int, default=4, help="questions per step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per question (GRPO n)")
    parser.add_argument("--max-turns", type=int, default=2, help="assistant turns per episode")
    parser.add_argument("--max-new-tokens-per-turn", type=int, default=48, help="tokens sampled per turn")
    parser.add_argument("--max-response-tokens", type=int, default=128, help="response budget per episode")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="episodes per forward/backward")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="training autocast dtype")
    parser.add_argument(
        "--search", choices=("inprocess", "none"), default="inprocess", help="in-process FAISS or no search"
    )
    parser.add_argument("--index-docs", type=int, default=300, help="Wikipedia summaries in the benchmark index")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument(
        "--compare-share-prompt",
        action="store_true",
        help="also run the same steps with algorithm.share_prompt=false (each response recomputes its prompt) and "
        "print the update-time ratio",
    )
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from searchrl.trainer.config import load_config
    from searchrl.trainer.local.trainer import train

    console = Console(width=170)
    with tempfile.TemporaryDirectory(prefix="searchrl-train-bench-") as tmp:
        overrides = [
            "seed=0",
            "data.train=[fanoutqa-sub]",
            f"data.batch_size={args.batch_size}",
            f"data.group_size={args.group_size}",
            f"rollout.agent.max_turns={args.max_turns}",
            f"rollout.agent.max_new_tokens_per_turn={args.max_new_tokens_per_turn}",
            f"rollout.agent.max_response_tokens={args.max_response_tokens}",
            "rollout.agent.max_doc_chars=200",
            "rollout.agent.top_k=3",
            f"algorithm.micro_batch_size={args.micro_batch_size}",
            "algorithm.lr=1e-5",
            # partial format credit, so the groups' rewards differ and the update does real work (see local_demo.yaml)
            "reward.format_bonus=0.1",
            f"model.dtype={args.dtype}",
            f"trainer.max_steps={args.steps}",
            f"trainer.output_dir={tmp}/run",
            "checkpoint.every_steps=0",
            "checkpoint.save_final=false",
            f"rollout.search.backend={args.search}",
        ]
        if args.threads:
            overrides.append(f"model.torch_threads={args.threads}")
        if args.search == "inprocess":
            from searchrl.retriever.index.build import build_index

            t = time.perf_counter()
            build_index("wiki", Path(tmp) / "index", limit=args.index_docs, progress=False)
            console.print(
                f"[dim]benchmark index of {args.index_docs} summaries built in {time.perf_counter() - t:.1f}s[/dim]"
            )
            overrides.append(f"rollout.search.index_dir={Path(tmp) / 'index'}")
        cfg = load_config(None, overrides)
        rss_before = _rss_mb()
        t0 = time.perf_counter()
        result = train(cfg, resume=False, handle_signals=False)
        wall = time.perf_counter() - t0
        peak = _rss_mb()
        unshared = None
        if args.compare_share_prompt:
            cfg2 = load_config(
                None, [*overrides, f"trainer.output_dir={tmp}/run_unshared", "algorithm.share_prompt=false"]
            )
            unshared = train(cfg2, resume=False, handle_signals=False)

    table = Table(
        title=f"local GRPO step on CPU: batch {args.batch_size} x group {args.group_size}, SmolLM2-135M, {args.dtype}"
    )
    for col in (
        "step",
        "rollout s",
        "reward s",
        "update s",
        "total s",
        "rollout %",
        "update %",
        "episodes",
        "resp tok",
        "update tok/s",
        "searches/ep",
    ):
        table.add_column(col, justify="right")
    rows = result.history
    for i, m in enumerate(rows, start=1):
        tokens = m["rollout/episodes"] * (m["rollout/response_length"] + m.get("rollout/prompt_length", 0.0))
        table.add_row(
            str(i),
            f"{m['time/rollout_s']:.1f}",
            f"{m['time/reward_s']:.3f}",
            f"{m['time/update_s']:.1f}",
            f"{m['time/total_s']:.1f}",
            f"{100 * m['time/rollout_s'] / m['time/total_s']:.0f}",
            f"{100 * m['time/update_s'] / m['time/total_s']:.0f}",
            f"{m['rollout/episodes']:.0f}",
            f"{m['rollout/response_length']:.0f}",
            f"{tokens / max(m['time/update_s'], 1e-9):.0f}",
            f"{m['rollout/searches_per_episode']:.2f}",
        )
    if rows:
        mean = {
            k: sum(r[k] for r in rows) / len(rows)
            for k in ("time/rollout_s", "time/reward_s", "time/update_s", "time/total_s")
        }
        table.add_row(
            "mean",
            f"{mean['time/rollout_s']:.1f}",
            f"{mean['time/reward_s']:.3f}",
            f"{mean['time/update_s']:.1f}",
            f"{mean['time/total_s']:.1f}",
            f"{100 * mean['time/rollout_s'] / mean['time/total_s']:.0f}",
            f"{100 * mean['time/update_s'] / mean['time/total_s']:.0f}",
            "",
            "",
            "",
            "",
        )
    console.print(table)
    if unshared is not None:
        cmp = Table(title="update phase: prompt computed once per group (share_prompt) vs once per response")
        for col in ("step", "shared update s", "unshared update s", "speed-up", "shared loss", "unshared loss"):
            cmp.add_column(col, justify="right")
        for i, (a, b) in enumerate(zip(rows, unshared.history, strict=False), start=1):
            cmp.add_row(
                str(i),
                f"{a['time/update_s']:.1f}",
                f"{b['time/update_s']:.1f}",
                f"{b['time/update_s'] / max(a['time/update_s'], 1e-9):.2f}x",
                f"{a['actor/loss']:+.5f}",
                f"{b['actor/loss']:+.5f}",
            )
        console.print(cmp)
    load = os.getloadavg()
    console.print(
        f"peak RSS {peak:.0f} MiB (before training {rss_before:.0f} MiB); wall {wall:.1f}s including model load; "
        f"load average {load[0]:.1f} on {os.cpu_count()} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
