"""``searchrl``: the one command-line entry point.

Subcommands import their implementation lazily so that ``searchrl --help`` stays instant. Each subcommand owns its
flags: ``searchrl <command> --help`` shows them.

    searchrl serve reward|retriever|simulator|policy [flags]   run a gRPC service
    searchrl index build|eval|info [flags]                     build / evaluate a FAISS index
    searchrl simulator sft-data|sft [flags]                    simulator fine-tuning (ZeroSearch)
    searchrl data prepare [flags]                              verl parquet from FlashRAG / FanOutQA
    searchrl train [flags]                                     local GRPO trainer
    searchrl eval [flags] | searchrl eval compare A B          benchmark runs
    searchrl rollouts tail|export [flags]                      the Redis rollout stream
    searchrl rollout-worker --config FILE [flags]              sample groups for rollout.mode=async
    searchrl up | down | status                                the whole stack on this machine
    searchrl demo [flags]                                      train + evaluate end to end (make demo)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from searchrl.assets import offline_defaults

# command -> (module, function, help); for "serve" the second word picks the service.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "index": ("searchrl.retriever.cli", "main", "build, evaluate and inspect FAISS indexes"),
    "simulator": ("searchrl.simulator.cli", "main", "simulator SFT data and fine-tuning"),
    "data": ("searchrl.trainer.data", "main", "prepare training data (verl parquet)"),
    "train": ("searchrl.trainer.cli", "main", "run the local GRPO trainer"),
    "eval": ("searchrl.evaluator.cli", "main", "evaluate a policy on QA benchmarks"),
    "rollouts": ("searchrl.services.rollouts.cli", "main", "inspect / export the Redis rollout stream"),
    "rollout-worker": ("searchrl.trainer.rollout_worker", "main", "sample GRPO groups for an async trainer"),
    "up": ("searchrl.stack", "up_main", "start every service on this machine"),
    "down": ("searchrl.stack", "down_main", "stop a stack started with 'up'"),
    "status": ("searchrl.stack", "status_main", "health of a stack started with 'up'"),
    "demo": ("searchrl.demo", "main", "the end-to-end demo (make demo)"),
}
# Commands that load models from local files only (HF_HUB_OFFLINE=1 unless the environment says otherwise).
OFFLINE_COMMANDS = ("serve", "eval", "rollout-worker")
SERVICES: dict[str, str] = {
    "reward": "searchrl.services.reward.server",
    "retriever": "searchrl.retriever.server",
    "simulator": "searchrl.simulator.server",
    "policy": "searchrl.services.policy.server",
}


def _usage() -> str:
    lines = [
        "usage: searchrl <command> [args]",
        "",
        "commands:",
        "  serve      run a gRPC service: " + "|".join(SERVICES),
    ]
    lines += [f"  {name:<10} {help_}" for name, (_m, _f, help_) in COMMANDS.items()]
    lines += ["", "'searchrl <command> --help' shows a command's flags."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatches to a subcommand; returns its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        from importlib.metadata import version

        print(version("searchrl"))
        return 0
    cmd, rest = args[0], args[1:]
    if cmd in OFFLINE_COMMANDS:
        offline_defaults()
    if cmd == "serve":
        if not rest or rest[0] not in SERVICES:
            print(f"usage: searchrl serve {{{','.join(SERVICES)}}} [flags]", file=sys.stderr)
            return 2
        module = importlib.import_module(SERVICES[rest[0]])
        return int(module.main(rest[1:]) or 0)
    if cmd not in COMMANDS:
        print(f"searchrl: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    mod_name, fn_name, _ = COMMANDS[cmd]
    module = importlib.import_module(mod_name)
    return int(getattr(module, fn_name)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
