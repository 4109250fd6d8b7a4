"""``searchrl simulator sft-data|sft``: fine-tuning data and fine-tuning of the search simulator (ZeroSearch §3.3).

searchrl simulator sft-data --redis-url redis://127.0.0.1:6379/0 --stream searchrl:rollouts --out data.jsonl
searchrl simulator sft --data data.jsonl --model smollm2-135m-instruct --out DIR --max-steps 200
searchrl serve simulator --model DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="searchrl simulator", description="Simulator SFT data and fine-tuning (ZeroSearch)."
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("sft-data", help="build SFT rows from rollout-store trajectories that used the real retriever")
    d.add_argument(
        "--redis-url",
        default=os.environ.get("SEARCHRL_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="Redis of the rollout store",
    )
    d.add_argument("--stream", default="searchrl:rollouts", help="rollout stream key")
    d.add_argument("--out", required=True, help="output JSONL file")
    d.add_argument("--limit", type=int, default=0, help="stop after this many rows (0: all)")
    d.add_argument("--useful-min-f1", type=float, default=0.8, help="answer F1 at or above which documents are useful")
    d.add_argument("--noisy-max-f1", type=float, default=0.0, help="answer F1 at or below which documents are noisy")
    d.add_argument("--max-doc-words", type=int, default=60, help="words kept per document")
    d.add_argument(
        "--no-conditioning", action="store_true", help="leave the question and gold answer out of the prompts"
    )
    t = sub.add_parser("sft", help="fine-tune the simulator with TRL's SFTTrainer")
    t.add_argument("--data", required=True, help="JSONL from 'sft-data'")
    t.add_argument("--model", default="smollm2-135m-instruct", help="base model directory or name")
    t.add_argument("--out", required=True, help="checkpoint directory to write")
    t.add_argument("--max-steps", type=int, default=100)
    t.add_argument("--learning-rate", type=float, default=1e-5)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--max-length", type=int, default=1024, help="longest example, in tokens")
    t.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry of ``searchrl simulator``; returns the exit code (1 on a data or connection error)."""
    args = _parser().parse_args(argv)
    from searchrl.errors import SearchRLError

    if args.cmd == "sft-data":
        from searchrl.simulator.sft import collect_sft_rows, write_jsonl

        try:
            rows, stats = asyncio.run(
                collect_sft_rows(
                    args.redis_url,
                    args.stream,
                    limit=args.limit,
                    useful_min_f1=args.useful_min_f1,
                    noisy_max_f1=args.noisy_max_f1,
                    max_doc_words=args.max_doc_words,
                    condition=not args.no_conditioning,
                )
            )
        except SearchRLError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        n = write_jsonl(rows, args.out)
        summary = {
            "out": args.out,
            "rows": n,
            "by_quality": dict(stats.rows),
            "trajectories": stats.trajectories,
            "retriever_searches": stats.searches,
            "skipped": dict(stats.skipped),
        }
        print(json.dumps(summary))
        if n == 0:
            print("warning: no rows: the stream holds no labelled retriever searches", file=sys.stderr)
        return 0
    from searchrl.simulator.sft import train_sft

    try:
        res = train_sft(
            args.data,
            args.model,
            args.out,
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_length=args.max_length,
            seed=args.seed,
        )
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"out": res.output_dir, "steps": res.steps, "train_loss": res.train_loss}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
