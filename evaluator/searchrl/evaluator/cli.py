"""``searchrl eval``: evaluate a policy on QA benchmarks; ``searchrl eval compare A B``: compare two runs.

    searchrl eval --dataset bench:bamboogle --limit 20 --method all --search retriever --out runs/eval-bamboogle
    searchrl eval --policy-target 127.0.0.1:50054 --retriever-target 127.0.0.1:50052 --dataset bench:nq --out runs/nq
    searchrl eval compare runs/eval-base runs/eval-step200          # or MLflow run ids (with --mlflow-uri)

Without ``--policy-target`` the model (``--model``: the embedded SmolLM2-135M-Instruct, a checkpoint directory or a
model name) runs in this process on the transformers engine. ``--search retriever`` without ``--retriever-target``
searches an in-process index (``--index-dir``, default the bundled Wikipedia summaries, built on first use).

Exit codes: 0 done; 1 the run stopped (a dependency failed; finished records are kept, rerun to resume);
2 bad input (dataset, flags, an output directory holding another configuration).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from searchrl.client.base import ChannelOptions
from searchrl.errors import InvalidRequest, SearchRLError
from searchrl.evaluator.methods import EvalConfig

# EvalConfig field -> help of its flag --field-name; the defaults are EvalConfig's.
_GENERATION_FLAGS = {
    "template": "research_instruct (chat template) or research_base.",
    "protocol": "Observation tags of the agent: research (<result>) or search_r1 (<information>).",
    "scheme": "Reward-library scheme that decides format validity (research, search_r1_em, search_r1_structured, "
    "zerosearch_f1).",
    "max_turns": "Assistant turns per agent episode.",
    "max_new_tokens_per_turn": "Tokens per generation call (per agent turn; the whole baseline answer).",
    "max_response_tokens": "Agent response budget (generated + inserted tokens).",
    "top_k": "Documents per search.",
    "max_doc_chars": "Cut each shown document to this many characters (0: no limit).",
    "temperature": "0 = greedy.",
    "top_p": "Nucleus mass.",
    "seed": "Base seed of the per-example seeds.",
    "concurrency": "Examples in flight at once.",
}


def _eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="searchrl eval",
        description="Evaluate a policy on QA benchmarks (EM, F1, accuracy, search statistics) with the direct, rag and agent methods.",
        epilog="'searchrl eval compare RUN_A RUN_B' compares two runs (see 'searchrl eval compare --help').",
    )
    g = p.add_argument_group("what to evaluate")
    g.add_argument(
        "--model",
        default="",
        help="Model: 'smollm2-135m-instruct' (embedded default), a checkpoint dir or a model name. With --policy-target: a label (default: the server's model).",
    )
    g.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="SPEC",
        help="bench:<name>[/split] (bamboogle, hotpotqa, 2wikimultihopqa, musique, nq, triviaqa, popqa), fanoutqa, fanoutqa-sub, or [name=]file.jsonl (FlashRAG rows). Repeatable. Default bench:bamboogle.",
    )
    g.add_argument(
        "--method",
        action="append",
        default=[],
        help="agent, direct, rag or all (default all; rag needs search). Repeatable or comma-separated.",
    )
    g.add_argument(
        "--search",
        choices=("retriever", "simulator", "none"),
        default="retriever",
        help="Search backend for rag and agent.",
    )
    g.add_argument(
        "--limit",
        type=int,
        default=None,
        help="Use the first N rows of each dataset (or N sampled rows with --sample-seed).",
    )
    g.add_argument(
        "--sample-seed",
        type=int,
        default=None,
        help="Sample --limit rows with this seed instead of taking the first ones.",
    )
    g.add_argument(
        "--skip-invalid", action="store_true", help="Skip malformed dataset rows (counted) instead of failing."
    )
    g = p.add_argument_group("where")
    g.add_argument(
        "--out", required=True, help="Output directory; rerunning with the same directory resumes an interrupted run."
    )
    g.add_argument(
        "--policy-target", default="", help="host:port of a PolicyService; empty: run the model in this process."
    )
    g.add_argument(
        "--retriever-target",
        default="",
        help="host:port of a RetrievalService; empty with --search retriever: an in-process index.",
    )
    g.add_argument(
        "--simulator-target", default="", help="host:port of a SimulatedSearchService (needed by --search simulator)."
    )
    g.add_argument(
        "--index-dir",
        default="wiki",
        help="In-process retriever index directory ('wiki' = bundled Wikipedia summaries).",
    )
    g.add_argument("--token", default="", help="Bearer token for the services (default $SEARCHRL_AUTH_TOKEN[_FILE]).")
    g = p.add_argument_group("generation")
    for name, help in _GENERATION_FLAGS.items():
        default = EvalConfig.model_fields[name].default
        flags = ["--max-new-tokens"] if name == "max_new_tokens_per_turn" else []  # the flag's older, shorter name
        flags.append("--" + name.replace("_", "-"))
        g.add_argument(*flags, dest=name, type=type(default), default=default, help=f"{help} (default {default})")
    g = p.add_argument_group("tracking and output")
    g.add_argument(
        "--mlflow-uri", default="", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite under --out)."
    )
    g.add_argument("--experiment", default="searchrl-eval", help="MLflow experiment name.")
    g.add_argument("--run-name", default="", help="MLflow run name.")
    g.add_argument("--no-mlflow", action="store_true", help="Do not log to MLflow.")
    g.add_argument("--no-progress", action="store_true", help="No progress bar.")
    g.add_argument("--restart", action="store_true", help="Discard records already in --out instead of resuming.")
    return p


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="searchrl eval compare",
        description="B minus A per dataset: EM and F1 differences with paired bootstrap confidence intervals on the shared examples.",
    )
    p.add_argument("run_a", help="Eval output directory, records.jsonl file, or MLflow run id.")
    p.add_argument("run_b", help="Eval output directory, records.jsonl file, or MLflow run id.")
    p.add_argument("--method-a", default=None, help="Method of run A to compare (default: each method both runs hold).")
    p.add_argument(
        "--method-b",
        default=None,
        help="Method of run B to compare (e.g. --method-a direct --method-b agent on one run).",
    )
    p.add_argument("--mlflow-uri", default="", help="Tracking URI for run ids (default $MLFLOW_TRACKING_URI).")
    p.add_argument("--resamples", type=int, default=10_000, help="Bootstrap resamples.")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="Bootstrap seed.")
    p.add_argument("--markdown", action="store_true", help="Print a markdown table instead of a rich table.")
    return p


def compare_main(argv: Sequence[str]) -> int:
    """``searchrl eval compare``; returns the exit code."""
    from searchrl.evaluator.compare import (
        compare_records,
        comparison_table_markdown,
        load_run_records,
        print_comparison,
    )

    args = _compare_parser().parse_args(list(argv))
    try:
        a = load_run_records(args.run_a, args.mlflow_uri or None)
        b = load_run_records(args.run_b, args.mlflow_uri or None)
        rows = compare_records(
            a,
            b,
            method_a=args.method_a,
            method_b=args.method_b,
            n_resamples=args.resamples,
            confidence=args.confidence,
            seed=args.seed,
        )
    except (SearchRLError, ValueError) as exc:
        print(f"searchrl eval compare: {exc}", file=sys.stderr)
        return 2
    if args.markdown:
        print(comparison_table_markdown(rows, args.run_a, args.run_b), end="")
    else:
        print_comparison(rows, args.run_a, args.run_b)
    return 0


async def _open_search(
    args: argparse.Namespace, options: ChannelOptions, stack: contextlib.AsyncExitStack
) -> tuple[Any, str]:
    """The search backend the flags ask for (``None`` for ``--search none``), and its label."""
    from searchrl.agent.search import SearchSpec, build_search_backend

    if args.search == "none":
        return None, "none"
    if args.search == "simulator" and not args.simulator_target:
        raise InvalidRequest(
            "--search simulator needs --simulator-target host:port (start one with 'searchrl serve simulator')"
        )
    if args.search == "retriever" and not args.retriever_target:
        from searchrl.retriever.inprocess import open_inprocess_retriever

        spec = SearchSpec(kind="inprocess", inprocess=await open_inprocess_retriever(args.index_dir))
    else:
        spec = SearchSpec(
            kind=args.search, retriever_target=args.retriever_target, simulator_target=args.simulator_target,
            training=False, options=options,
        )  # fmt: skip
    backend = build_search_backend(spec)
    stack.push_async_callback(backend.close)
    return backend, args.search


async def _open_policy(
    args: argparse.Namespace, cfg: EvalConfig, options: ChannelOptions, stack: contextlib.AsyncExitStack
) -> tuple[Any, str]:
    """The generation backend (remote PolicyService or in-process engine) and the model label."""
    from searchrl.assets import EMBEDDED_POLICY, policy_model_path

    if args.policy_target:
        from transformers import AutoTokenizer

        from searchrl.client.policy import PolicyClient
        from searchrl.services.policy.engines.remote import RemotePolicyBackend

        client = PolicyClient(args.policy_target, dataclasses.replace(options, timeout_s=600.0))
        stack.push_async_callback(client.close)
        model = args.model or (await client.model_info()).model
        path = await asyncio.to_thread(policy_model_path, model)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
        return RemotePolicyBackend(client, tokenizer), model
    from searchrl.services.policy.server import PolicyConfig, build_engine

    model = args.model or EMBEDDED_POLICY
    engine = await asyncio.to_thread(build_engine, PolicyConfig(model=model, max_batch_size=cfg.concurrency))
    stack.push_async_callback(engine.close)
    return engine, model


async def _run(args: argparse.Namespace) -> Any:
    from searchrl.data.datasets import load_dataset
    from searchrl.evaluator.driver import evaluate
    from searchrl.evaluator.methods import resolve_methods

    cfg = EvalConfig(**{name: getattr(args, name) for name in _GENERATION_FLAGS})
    # Validate datasets and methods before loading any model.
    datasets = [
        load_dataset(d, limit=args.limit, sample_seed=args.sample_seed, skip_invalid=args.skip_invalid)
        for d in (args.dataset or ["bench:bamboogle"])
    ]
    methods = resolve_methods(args.method or ["all"], args.search != "none")
    options = ChannelOptions.from_env(**({"token": args.token} if args.token else {}))
    async with contextlib.AsyncExitStack() as stack:
        search, search_name = await _open_search(args, options, stack)
        policy, model = await _open_policy(args, cfg, options, stack)
        return await evaluate(
            policy,
            search,
            datasets,
            methods,
            args.out,
            config=cfg,
            model=model,
            search_name=search_name,
            restart=args.restart,
            mlflow=not args.no_mlflow,
            mlflow_uri=args.mlflow_uri or None,
            experiment=args.experiment,
            run_name=args.run_name or None,
            progress=not args.no_progress,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``searchrl eval``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    args = _eval_parser().parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from searchrl.evaluator.driver import EvalAborted

    try:
        result = asyncio.run(_run(args))
    except EvalAborted as exc:
        print(f"searchrl eval: {exc}", file=sys.stderr)
        return 1
    except (SearchRLError, OSError) as exc:  # bad input, a missing model/asset, an unreachable dependency at start-up
        print(f"searchrl eval: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"searchrl eval: interrupted; finished records are in {Path(args.out) / 'records.jsonl'}; rerun to resume",
            file=sys.stderr,
        )
        return 130
    print(result.markdown(), end="")
    extra = f" ({result.resumed_examples} resumed)" if result.resumed_examples else ""
    print(f"\n{result.new_examples} examples evaluated{extra}; outputs in {result.out_dir}")
    if result.run_id:
        print(f"MLflow run {result.run_id} at {result.tracking_uri}")
    return 0
