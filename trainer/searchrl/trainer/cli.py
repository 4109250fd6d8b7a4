"""``searchrl train``: run the local GRPO trainer from a YAML config.

    searchrl train --config trainer/searchrl/trainer/configs/local_demo.yaml [--resume|--no-resume] [key.sub=value ...]
    searchrl train --help-config          every config field with its default and description
    searchrl train --config FILE --print-config   the resolved config, then exit

Exit codes: 0 finished (or stopped cleanly by a signal or a stopping guard, after writing a checkpoint), 2 bad config
or data, 1 an unexpected error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from searchrl.errors import InvalidRequest, SearchRLError


def _print_fields() -> None:
    from searchrl.trainer.config import describe_fields

    for name, default, desc in describe_fields():
        print(f"{name:<44} {default:<28} {desc}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``searchrl train``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="searchrl train", description="Local GRPO training (ReSearch / ZeroSearch) on verl core_algos."
    )
    parser.add_argument("--config", help="YAML config file (see --help-config); defaults apply to anything missing")
    parser.add_argument(
        "--resume",
        dest="resume",
        action="store_true",
        default=True,
        help="continue from the newest checkpoint (default)",
    )
    parser.add_argument(
        "--no-resume",
        dest="resume",
        action="store_false",
        help="start from the initial model even if checkpoints exist",
    )
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--quiet", action="store_true", help="no per-step table, warnings only")
    parser.add_argument("overrides", nargs="*", help="config overrides as key.sub=value (value parsed as YAML)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.help_config:
        _print_fields()
        return 0
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from searchrl.trainer.config import load_config

    try:
        config = load_config(args.config, args.overrides)
    except InvalidRequest as exc:
        print(f"searchrl train: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0

    from rich.console import Console

    from searchrl.trainer.local.trainer import train

    console = Console(stderr=True)

    def progress(step: int, m: dict[str, float]) -> None:
        if args.quiet:
            return
        console.print(
            f"step {step:>4}/{config.trainer.max_steps}  reward {m['reward/mean']:.3f}±{m['reward/std']:.3f}  "
            f"f1 {m['reward/f1']:.3f}  format {m['reward/format_rate']:.2f}  searches/ep "
            f"{m['rollout/searches_per_episode']:.2f}  kl {m['actor/kl']:.2e}  loss {m['actor/loss']:+.4f}  "
            f"time {m['time/total_s']:.1f}s (rollout {m['time/rollout_s']:.1f} reward {m['time/reward_s']:.2f} "
            f"update {m['time/update_s']:.1f})"
        )

    try:
        result = train(config, resume=args.resume, progress=progress)
    except InvalidRequest as exc:
        print(f"searchrl train: {exc}", file=sys.stderr)
        return 2
    except SearchRLError as exc:  # a dependency failed (Redis, a service): the checkpoint on disk is complete
        print(
            f"searchrl train: {exc}\nThe last complete checkpoint is on disk: fix the cause and run the same command "
            "to resume from it.",
            file=sys.stderr,
        )
        return 1
    stop = f", stopped by {result.stopped_by}" if result.stopped_by else ""
    console.print(
        f"done at step {result.step}{stop}; checkpoint {result.checkpoint}; MLflow run {result.run_id} ({result.tracking_uri})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
