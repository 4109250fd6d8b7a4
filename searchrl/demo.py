"""``searchrl demo`` (``make demo``): train and evaluate a search agent end to end on one machine.

Stages (each prints progress; re-running skips what is cached and resumes training from its last checkpoint):

1. the embedded policy (SmolLM2-135M-Instruct, converted once from its GGUF) and the FAISS index over the 10,033
   bundled Wikipedia summaries (built once, cached under ``~/.cache/searchrl``);
2. training and held-out questions from FanOutQA sub-questions (verl parquet, fixed seed);
3. the stack on loopback (``searchrl up``'s supervisor): Redis, reward, retriever, simulator and policy services;
4. evaluation of the untrained policy through the PolicyService on the held-out questions (direct answer and the
   search agent, real retriever);
5. a short GRPO run (ReSearch protocol; by default searches go to the retriever or the ZeroSearch simulator with the
   noise curriculum, half each), trajectories into the Redis rollout stream, metrics into MLflow;
6. ``LoadWeights`` of the trained checkpoint into the running PolicyService, and the same evaluation again;
7. a report folder: ``report.md`` (before/after table, training table, example trajectories, MLflow run ids),
   ``report.json`` (the numbers), ``curves.png`` and ``before_after.csv``.

Ctrl-C during training writes a checkpoint and stops; running the demo again resumes from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from searchrl.errors import SearchRLError

log = logging.getLogger("searchrl.demo")

SIZES: dict[str, dict[str, int]] = {
    # questions for training, held-out questions, GRPO steps, questions per step, group size, tokens per turn, turns
    "tiny": {"train": 8, "eval": 2, "steps": 2, "batch": 2, "group": 2, "tokens": 40, "turns": 2},
    "default": {"train": 32, "eval": 8, "steps": 4, "batch": 2, "group": 4, "tokens": 64, "turns": 2},
    "large": {"train": 512, "eval": 64, "steps": 40, "batch": 8, "group": 5, "tokens": 160, "turns": 4},
}


@dataclass
class DemoArgs:
    """Resolved demo settings (``--size`` preset, then individual flags)."""

    out: Path
    train_questions: int
    eval_questions: int
    steps: int
    batch_size: int
    group_size: int
    max_new_tokens: int
    max_turns: int
    search: str
    mixed_ratio: float
    lr: float
    seed: int
    config: str
    extra_overrides: list[str] = field(default_factory=list)


def _parse(argv: Sequence[str] | None) -> DemoArgs:
    p = argparse.ArgumentParser(
        prog="searchrl demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/demo", help="run folder (report in <out>/report)")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="preset sizes (flags below override)")
    p.add_argument("--train-questions", type=int)
    p.add_argument("--eval-questions", type=int, help="held-out questions evaluated before and after")
    p.add_argument("--steps", type=int, help="GRPO steps")
    p.add_argument("--batch-size", type=int, help="questions per GRPO step")
    p.add_argument("--group-size", type=int, help="responses per question (GRPO group size n)")
    p.add_argument("--max-new-tokens", type=int, help="tokens the policy may sample per turn")
    p.add_argument("--max-turns", type=int, help="assistant turns per episode")
    p.add_argument(
        "--search", choices=["mixed", "retriever", "simulator"], default="mixed", help="training search backend"
    )
    p.add_argument("--mixed-ratio", type=float, default=0.5, help="share of searches sent to the simulator when mixed")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--config", default="", help="base trainer YAML (default: trainer/searchrl/trainer/configs/local_demo.yaml)"
    )
    p.add_argument("--fresh", action="store_true", help="delete the run folder first (no resume)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra trainer config override")
    a = p.parse_args(argv)
    preset = SIZES[a.size]
    out = Path(a.out)
    if a.fresh and out.exists():
        shutil.rmtree(out)

    def pick(value: int | None, key: str) -> int:
        return int(value) if value is not None else preset[key]

    return DemoArgs(
        out=out,
        train_questions=pick(a.train_questions, "train"),
        eval_questions=pick(a.eval_questions, "eval"),
        steps=pick(a.steps, "steps"),
        batch_size=pick(a.batch_size, "batch"),
        group_size=pick(a.group_size, "group"),
        max_new_tokens=pick(a.max_new_tokens, "tokens"),
        max_turns=pick(a.max_turns, "turns"),
        search=a.search,
        mixed_ratio=a.mixed_ratio,
        lr=a.lr,
        seed=a.seed,
        config=a.config,
        extra_overrides=list(a.set),
    )


class Stages:
    """Prints numbered stage headers and their durations with rich."""

    def __init__(self, total: int) -> None:
        from rich.console import Console

        self.console = Console()
        self.total = total
        self.n = 0
        self.t0 = time.monotonic()
        self._stage_t0 = self.t0
        self.durations: dict[str, float] = {}
        self._name = ""

    def start(self, name: str) -> None:
        self.done()
        self.n += 1
        self._name = name
        self._stage_t0 = time.monotonic()
        self.console.rule(f"[bold]({self.n}/{self.total}) {name}")

    def done(self) -> None:
        if self._name:
            d = time.monotonic() - self._stage_t0
            self.durations[self._name] = d
            self.console.print(f"[green]done[/] {self._name} in {d:.1f}s")
            self._name = ""

    def say(self, msg: str) -> None:
        self.console.print(msg)


def _held_out_jsonl(val_parquet: Path, out: Path, n: int) -> Path:
    """Writes the first ``n`` validation questions as FlashRAG jsonl (what the evaluator reads)."""
    from searchrl.trainer.data import read_parquet_examples

    rows = read_parquet_examples(val_parquet)[:n]
    with out.open("w", encoding="utf-8") as fh:
        for i, ex in enumerate(rows):
            qid = getattr(ex, "id", "") or f"heldout-{i}"
            fh.write(
                json.dumps(
                    {
                        "id": qid,
                        "question": ex.question,
                        "golden_answers": list(ex.golden_answers),
                        "metadata": {"source": ex.source},
                    }
                )
                + "\n"
            )
    return out


def _eval_config(a: DemoArgs, agent_response_prefix: str | None = None) -> Any:
    from searchrl.evaluator.methods import EvalConfig

    return EvalConfig(
        max_turns=a.max_turns,
        max_new_tokens_per_turn=a.max_new_tokens,
        max_response_tokens=a.max_turns * (a.max_new_tokens + 160),
        top_k=3,
        max_doc_chars=300,
        temperature=0.0,
        concurrency=8,
        seed=a.seed,
        **({} if agent_response_prefix is None else {"response_prefix": agent_response_prefix}),
    )


async def _evaluate(
    a: DemoArgs,
    endpoints: dict[str, str],
    tokenizer: Any,
    dataset: Path,
    out_dir: Path,
    label: str,
    mlflow_uri: str,
    prefix: str | None,
) -> Any:
    from searchrl.agent.search import RetrieverSearch
    from searchrl.client.policy import PolicyClient
    from searchrl.evaluator.driver import evaluate
    from searchrl.services.policy.engines.remote import RemotePolicyBackend

    async with PolicyClient(endpoints["policy"]) as pc:
        policy = RemotePolicyBackend(pc, tokenizer)
        search = RetrieverSearch(endpoints["retriever"])
        return await evaluate(
            policy,
            search,
            [str(dataset)],
            ["direct", "agent"],
            out_dir,
            config=_eval_config(a, prefix),
            model=label,
            search_name="retriever",
            mlflow=True,
            mlflow_uri=mlflow_uri,
            experiment="searchrl-demo-eval",
            run_name=f"demo-eval-{label}",
            progress=True,
        )


async def _load_weights(target: str, path: Path, version: str) -> str:
    from searchrl.client.policy import PolicyClient

    async with PolicyClient(target) as pc:
        resp = await pc.load_weights(str(path), policy_version=version)
        return str(resp.policy_version)


def _train_config(a: DemoArgs, endpoints: dict[str, str], train_parquet: Path, mlflow_uri: str) -> Any:
    from searchrl.trainer.config import RECIPES_DIR, load_config

    base = a.config or str(RECIPES_DIR / "local_demo.yaml")
    backend = {"mixed": "mixed", "retriever": "retriever", "simulator": "simulator"}[a.search]
    overrides = [
        f"seed={a.seed}",
        f"data.train=[{train_parquet}]",
        f"data.limit={a.train_questions}",
        f"data.batch_size={a.batch_size}",
        f"data.group_size={a.group_size}",
        f"rollout.agent.max_turns={a.max_turns}",
        f"rollout.agent.max_new_tokens_per_turn={a.max_new_tokens}",
        f"rollout.agent.max_response_tokens={a.max_turns * (a.max_new_tokens + 160)}",
        f"rollout.search.backend={backend}",
        f"rollout.search.retriever_target={endpoints['retriever']}",
        f"rollout.search.simulator_target={endpoints['simulator']}",
        f"rollout.search.mix_ratio={a.mixed_ratio}",
        f"algorithm.lr={a.lr}",
        f"trainer.max_steps={a.steps}",
        f"trainer.output_dir={a.out / 'train'}",
        f"logging.mlflow_tracking_uri={mlflow_uri}",
        "logging.experiment=searchrl-demo",
        "logging.metrics_port=0",
        f"logging.rollout_redis_url={endpoints['redis']}",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        *a.extra_overrides,
    ]
    return load_config(base, overrides)


def _curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("reward/mean", "reward"),
        ("reward/f1", "F1"),
        ("rollout/searches_per_episode", "searches / episode"),
        ("rollout/noisy_share", "noisy-document share"),
    ]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    steps = [int(h.get("step", i + 1)) for i, h in enumerate(history)]
    for ax, (k, title) in zip(axes, keys, strict=True):
        ax.plot(steps, [h.get(k, float("nan")) for h in history], marker="o")
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _summary_rows(result: Any) -> list[dict[str, Any]]:
    import dataclasses

    return [dataclasses.asdict(r) for r in result.rows]


def write_report(
    a: DemoArgs,
    report: Path,
    before: Any,
    after: Any,
    history: list[dict[str, float]],
    train_result: Any,
    stages: Stages,
    endpoints: dict[str, str],
    mlflow_uri: str,
) -> dict[str, Any]:
    """Writes report.md, report.json, before_after.csv and curves.png into ``report``; returns report.json's content."""
    report.mkdir(parents=True, exist_ok=True)
    b_rows, a_rows = _summary_rows(before), _summary_rows(after)
    metrics = ("em", "f1", "accuracy", "format_valid", "searches_per_question", "mean_turns")
    table = []
    for b in b_rows:
        match = next(
            (x for x in a_rows if x.get("method") == b.get("method") and x.get("dataset") == b.get("dataset")), None
        )
        if match is None:
            continue
        row: dict[str, Any] = {"dataset": b.get("dataset"), "method": b.get("method"), "n": b.get("n")}
        for m in metrics:
            if m in b:
                row[f"{m}_before"] = b[m]
                row[f"{m}_after"] = match.get(m)
        table.append(row)
    if history:
        _curves(history, report / "curves.png")
    traj = _read_jsonl(Path(train_result.output_dir) / "trajectories.jsonl")
    examples = sorted(traj, key=lambda t: (-len(t.get("searches", [])), -float(t.get("reward", 0))))[:3]
    data = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in a.__dict__.items()},
        "mlflow_tracking_uri": mlflow_uri,
        "train_run_id": train_result.run_id,
        "eval_before_run_id": getattr(before, "run_id", None),
        "eval_after_run_id": getattr(after, "run_id", None),
        "final_step": train_result.step,
        "checkpoint": str(train_result.checkpoint) if train_result.checkpoint else None,
        "stopped_by": train_result.stopped_by,
        "guard_events": [asdict(e) for e in train_result.guard_events],
        "training": history,
        "before_after": table,
        "stage_seconds": stages.durations,
        "endpoints": endpoints,
    }
    (report / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    import csv

    with (report / "before_after.csv").open("w", newline="") as fh:
        if table:
            w = csv.DictWriter(fh, fieldnames=list(table[0]))
            w.writeheader()
            w.writerows(table)
    md = ["# searchrl demo report", ""]
    md += [
        f"Policy SmolLM2-135M-Instruct, GRPO for {train_result.step} steps ({a.batch_size} questions x group {a.group_size}), "
        f"search during training: {a.search}"
        + (f" (simulator share {a.mixed_ratio}, ZeroSearch curriculum)" if a.search == "mixed" else "")
        + ".",
        f"Held-out questions: {a.eval_questions} FanOutQA sub-questions, evaluated with the real retriever, greedy decoding.",
        "",
    ]
    if train_result.stopped_by not in (None, "signal"):
        md += [
            f"**Training stopped early, at step {train_result.step}, by the `{train_result.stopped_by}` guard:** "
            + "; ".join(e.message for e in train_result.guard_events if e.guard == train_result.stopped_by),
            "",
        ]
    md += [
        "## Before / after training (same held-out questions)",
        "",
        "| dataset | method | n | " + " | ".join(f"{m} before | {m} after" for m in metrics) + " |",
        "|---|---|---|" + "---|---|" * len(metrics),
    ]
    for r in table:
        cells = []
        for m in metrics:
            cells += [_fmt(r.get(f"{m}_before")), _fmt(r.get(f"{m}_after"))]
        md.append(f"| {r['dataset']} | {r['method']} | {r['n']} | " + " | ".join(cells) + " |")
    md += ["", "## Training", "", "![curves](curves.png)", ""]
    cols = [
        ("reward/mean", "reward"),
        ("reward/f1", "F1"),
        ("reward/format_rate", "format ok"),
        ("rollout/searches_per_episode", "searches/episode"),
        ("rollout/search_failures", "failed searches"),
        ("rollout/noisy_share", "noisy share"),
        ("actor/kl", "KL"),
        ("time/total_s", "step s"),
    ]
    md += ["| step | " + " | ".join(c for _k, c in cols) + " |", "|---|" + "---|" * len(cols)]
    for i, h in enumerate(history):
        md.append(f"| {int(h.get('step', i + 1))} | " + " | ".join(_fmt(h.get(k)) for k, _c in cols) + " |")
    md += ["", "## Example trajectories", ""]
    for t in examples:
        md += [
            f"**Q:** {t.get('question', '')}  ",
            f"**gold:** {t.get('golden_answers', '')} — **reward** {_fmt(t.get('reward'))}, "
            f"**searches** {len(t.get('searches', []))}: {[x['query'] for x in t.get('searches', [])]}",
            "",
            "```text",
            str(t.get("response", t.get("response_text", "")))[:2500],
            "```",
            "",
        ]
    md += [
        "## Where things are",
        "",
        f"- MLflow tracking URI: `{mlflow_uri}` (open with `mlflow ui --backend-store-uri {mlflow_uri}`)",
        f"- training run id: `{train_result.run_id}`; eval runs: `{data['eval_before_run_id']}` (before), `{data['eval_after_run_id']}` (after)",
        f"- checkpoint: `{data['checkpoint']}`",
        f"- per-example eval records: `{a.out / 'eval_before'}`, `{a.out / f'eval_after_step{train_result.step}'}`",
        "",
        "Stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in stages.durations.items()),
    ]
    (report / "report.md").write_text("\n".join(md) + "\n")
    return data


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo; returns 0 on success, 130 when interrupted (run again to resume), 2 on a set-up error."""
    a = _parse(argv)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("searchrl").setLevel(logging.INFO)
    a.out.mkdir(parents=True, exist_ok=True)
    stages = Stages(total=7)
    mlflow_uri = f"sqlite:///{(a.out / 'mlflow.db').resolve()}"
    sup = None
    try:
        stages.start("policy model and Wikipedia index")
        from searchrl.assets import policy_model_path
        from searchrl.retriever.index.wiki import ensure_wiki_index

        model_dir = policy_model_path()
        index_dir = ensure_wiki_index("flat")
        stages.say(f"policy: {model_dir}\nindex: {index_dir}")

        stages.start("training and held-out questions (FanOutQA sub-questions)")
        from searchrl.trainer.data import prepare

        prepared = prepare(
            ["fanoutqa-sub"],
            a.out / "data",
            limit=a.train_questions + a.eval_questions,
            val_size=a.eval_questions,
            seed=a.seed,
        )
        held_out = _held_out_jsonl(prepared.val_path, a.out / "data" / "heldout.jsonl", a.eval_questions)
        stages.say(
            f"{prepared.train_rows} training questions, {prepared.val_rows} held out -> {prepared.train_path.parent}"
        )

        stages.start("start the stack (redis, reward, retriever, simulator, policy)")
        from searchrl.stack import StackConfig, start_stack

        sup, endpoints = start_stack(
            StackConfig(state_dir=str(a.out / "stack"), index_dir=str(index_dir)), progress=stages.say
        )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        stages.start(f"evaluate the untrained policy on {a.eval_questions} held-out questions")
        # the agent is evaluated with the response prefix it is trained with (the demo config's search-first prefix)
        prefix = _train_config(a, endpoints, prepared.train_path, mlflow_uri).rollout.agent.response_prefix
        before = asyncio.run(
            _evaluate(a, endpoints, tokenizer, held_out, a.out / "eval_before", "untrained", mlflow_uri, prefix)
        )
        stages.say(before.markdown() if hasattr(before, "markdown") else str(before))

        stages.start(f"GRPO training: {a.steps} steps x {a.batch_size} questions x group {a.group_size}")
        from searchrl.trainer.local.trainer import train

        cfg = _train_config(a, endpoints, prepared.train_path, mlflow_uri)

        def on_step(step: int, m: dict[str, float]) -> None:
            stages.say(
                f"step {step}/{a.steps}: reward {m.get('reward/mean', 0):.3f}  F1 {m.get('reward/f1', 0):.3f}  "
                f"searches/ep {m.get('rollout/searches_per_episode', 0):.2f}  noisy {m.get('rollout/noisy_share', 0):.2f}  "
                f"KL {m.get('actor/kl', 0):.4f}  {m.get('time/total_s', 0):.0f}s"
            )

        result = train(cfg, resume=True, progress=on_step)
        if result.stopped_by == "signal":
            stages.say(
                f"[yellow]interrupted after step {result.step}; checkpoint {result.checkpoint}. Run the demo again to resume.[/]"
            )
            return 130
        if result.stopped_by not in (None, "signal"):
            why = "; ".join(e.message for e in result.guard_events if e.guard == result.stopped_by)
            stages.say(f"[yellow]training stopped at step {result.step} by the {result.stopped_by} guard: {why}[/]")
        if result.checkpoint is None:
            raise RuntimeError("training wrote no checkpoint")
        history = _read_jsonl(Path(result.output_dir) / "metrics.jsonl") or result.history

        stages.start("load the trained weights into the PolicyService and evaluate again")
        from searchrl.trainer.checkpoint import CheckpointInfo

        ckpt = CheckpointInfo(step=result.step, path=Path(result.checkpoint))
        version = asyncio.run(_load_weights(endpoints["policy"], ckpt.model_path, f"step-{result.step}"))
        stages.say(f"PolicyService now serves {version}")
        # one folder per checkpoint: an eval folder resumes from its records, which must come from the same weights
        after_dir = a.out / f"eval_after_step{result.step}"
        after = asyncio.run(
            _evaluate(a, endpoints, tokenizer, held_out, after_dir, f"grpo-step-{result.step}", mlflow_uri, prefix)
        )
        stages.say(after.markdown() if hasattr(after, "markdown") else str(after))

        stages.start("write the report")
        data = write_report(a, a.out / "report", before, after, history, result, stages, endpoints, mlflow_uri)
        stages.done()
        stages.say((a.out / "report" / "report.md").read_text())
        stages.say(
            f"[bold green]report: {a.out / 'report'}[/]  (train run {data['train_run_id']}; total {time.monotonic() - stages.t0:.0f}s)"
        )
        return 0
    except KeyboardInterrupt:
        stages.say("[yellow]interrupted; run the demo again to resume[/]")
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, SearchRLError) as exc:
        stages.say(f"[red]error:[/] {exc}")
        return 2
    finally:
        if sup is not None:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not orphan children
            try:
                sup.stop()
            finally:
                signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())
