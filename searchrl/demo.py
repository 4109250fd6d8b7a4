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

ANSWERABLE_TOP_K = 3
"""Questions are kept when their gold answer is in the top-3 passages retrieved for them: the agent's ``top_k``."""

SIZES: dict[str, dict[str, int]] = {
    # training questions (at most), held-out questions (0: the whole held-out split), GRPO steps, questions per step,
    # group size, tokens per turn, turns
    "tiny": {"train": 8, "eval": 2, "steps": 2, "batch": 2, "group": 2, "tokens": 24, "turns": 2},
    "default": {"train": 512, "eval": 0, "steps": 10, "batch": 4, "group": 4, "tokens": 24, "turns": 2},
    "large": {"train": 512, "eval": 0, "steps": 80, "batch": 4, "group": 8, "tokens": 24, "turns": 2},
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
    lr: float | None
    seed: int
    config: str
    extra_overrides: list[str] = field(default_factory=list)
    rollout_mode: str = "sync"
    rollout_workers: int = 1


def _parse(argv: Sequence[str] | None) -> DemoArgs:
    p = argparse.ArgumentParser(
        prog="searchrl demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/demo", help="run folder (report in <out>/report)")
    p.add_argument("--size", choices=sorted(SIZES), default="default", help="preset sizes (flags below override)")
    p.add_argument("--train-questions", type=int)
    p.add_argument(
        "--eval-questions", type=int, help="held-out questions evaluated before and after (0: the whole split)"
    )
    p.add_argument("--steps", type=int, help="GRPO steps")
    p.add_argument("--batch-size", type=int, help="questions per GRPO step")
    p.add_argument("--group-size", type=int, help="responses per question (GRPO group size n)")
    p.add_argument("--max-new-tokens", type=int, help="tokens the policy may sample per turn")
    p.add_argument("--max-turns", type=int, help="assistant turns per episode")
    p.add_argument(
        "--search",
        choices=["mixed", "retriever", "simulator"],
        default="retriever",
        help="training search backend (default the retriever: the evaluation's; mixed adds the ZeroSearch simulator)",
    )
    p.add_argument("--mixed-ratio", type=float, default=0.5, help="share of searches sent to the simulator when mixed")
    p.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--config", default="", help="base trainer YAML (default: trainer/searchrl/trainer/configs/local_demo.yaml)"
    )
    p.add_argument(
        "--rollout-mode",
        choices=("sync", "async"),
        default="sync",
        help="async: rollout workers sample groups through the PolicyService while the trainer updates "
        "(rollout.mode=async, README 'Asynchronous rollouts')",
    )
    p.add_argument("--rollout-workers", type=int, default=1, help="rollout workers with --rollout-mode async")
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
        rollout_mode=a.rollout_mode,
        rollout_workers=a.rollout_workers,
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


def _answerable_sets(a: DemoArgs, stages: Stages, max_doc_chars: int) -> Any:
    """The entity-disjoint train / dev / held-out sets of questions the corpus can answer
    (:func:`searchrl.trainer.answerable.build_answerable_sets`: the gold answer is in the part of the top-3 passages
    the agent reads), built once per machine under the cache folder (a few minutes: it retrieves for every bundled
    question) and reused; the split never depends on ``--seed``."""
    from searchrl.assets import cache_dir
    from searchrl.retriever.index.build import file_lock
    from searchrl.trainer.answerable import build_answerable_sets, load_answerable_sets

    folder = cache_dir() / "data" / f"answerable-top{ANSWERABLE_TOP_K}-chars{max_doc_chars}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(folder.with_suffix(".lock")):  # two demos (or a demo and the tests) build it once
        try:
            sets = load_answerable_sets(folder)
            stages.say(f"reusing {folder}")
        except FileNotFoundError:
            sets = build_answerable_sets(out_dir=folder, top_k=ANSWERABLE_TOP_K, seed=0, max_doc_chars=max_doc_chars)
    stages.say(sets.coverage_md.read_text(encoding="utf-8"))
    return sets


def _first_jsonl(src: Path, out: Path, n: int) -> Path:
    """Writes the first ``n`` rows of the jsonl ``src`` (all when ``n`` is 0) to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    out.write_text("".join(line + "\n" for line in (lines[:n] if n else lines)), encoding="utf-8")
    return out


def _eval_config(a: DemoArgs, agent: Any) -> Any:
    """Evaluation settings: the agent settings the policy is trained with (template, prefixes, top-k, document
    length, turns, token budgets), with greedy decoding."""
    from searchrl.evaluator.methods import EvalConfig

    shared = {k: getattr(agent, k) for k in type(agent).model_fields if k in EvalConfig.model_fields}
    return EvalConfig(**{**shared, "temperature": 0.0, "concurrency": 16, "seed": a.seed})


async def _evaluate(
    a: DemoArgs,
    endpoints: dict[str, str],
    tokenizer: Any,
    dataset: Path,
    out_dir: Path,
    label: str,
    mlflow_uri: str,
    agent: Any,
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
            # the search agent only: the direct-answer baseline cannot answer in the agent's 24-token turn (0 before
            # and after in every run) and cost a third of the evaluation time; `searchrl eval --method all` has it
            ["agent"],
            out_dir,
            config=_eval_config(a, agent),
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
        f"rollout.agent.max_response_tokens={a.max_turns * (a.max_new_tokens + 200)}",
        f"rollout.search.backend={backend}",
        f"rollout.search.retriever_target={endpoints.get('retriever', '')}",
        f"rollout.search.simulator_target={endpoints.get('simulator', '')}",
        f"rollout.search.mix_ratio={a.mixed_ratio}",
        *([f"algorithm.lr={a.lr}"] if a.lr is not None else []),
        f"trainer.max_steps={a.steps}",
        f"trainer.output_dir={a.out / 'train'}",
        f"logging.mlflow_tracking_uri={mlflow_uri}",
        "logging.experiment=searchrl-demo",
        "logging.metrics_port=0",
        f"logging.rollout_redis_url={endpoints.get('redis', '')}",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        *(async_overrides(a, endpoints) if a.rollout_mode == "async" and endpoints else []),
        *a.extra_overrides,
    ]
    return load_config(base, overrides)


def async_overrides(a: DemoArgs, endpoints: dict[str, str]) -> list[str]:
    """What ``--rollout-mode async`` changes in the training config: workers and trainer on the stack's PolicyService
    and Redis, a stream prefix of this run, a checkpoint per step (groups are acknowledged once checkpointed)."""
    from searchrl.stack import worker_overrides

    return [*worker_overrides(endpoints), f"rollout.queue.prefix=searchrl:demo:{a.out.resolve().name}:{a.seed}"]


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
    sets: Any = None,
    restarts: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Writes report.md, report.json, before_after.csv and curves.png into ``report``; returns report.json's content.
    ``restarts``: how often the stack's supervisor restarted each service during the run."""
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
    effect = learning_effect(before, after, seed=a.seed)
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
        "learning_effect": effect,
        "stage_seconds": stages.durations,
        "answer_coverage": json.loads(sets.coverage_json.read_text(encoding="utf-8")) if sets is not None else None,
        "endpoints": endpoints,
        "service_restarts": dict(restarts or {}),
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
        + (
            f"; asynchronous rollouts ({a.rollout_workers} worker(s); the last step's groups lagged the weights "
            f"by {train_result.metrics.get('stream/group_age_versions', 0):.1f} versions on average)"
            if a.rollout_mode == "async"
            else ""
        )
        + ".",
        f"Held-out questions: {effect[0]['n'] if effect else 0} questions the corpus can answer (entity-disjoint from "
        "the training and dev questions), evaluated with the real retriever, greedy decoding, the agent settings of "
        "training, scored with the training reward (ReSearch: format + answer F1).",
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
    md += [
        "",
        "## Did training help? (agent, held-out, after minus before, paired bootstrap 95% CI)",
        "",
        "| metric | n | before | after | after - before | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    for e in effect:
        md.append(
            f"| {e['metric']} | {e['n']} | {e['before']:.3f} | {e['after']:.3f} | {e['diff']:+.3f} | "
            f"[{e['ci_low']:+.3f}, {e['ci_high']:+.3f}] |"
        )
    if sets is not None:
        md += ["", sets.coverage_md.read_text(encoding="utf-8").replace("# Answer coverage", "## Answer coverage")]
    crashed = {k: v for k, v in (restarts or {}).items() if v}
    md += [
        "",
        "Service restarts during the run (the supervisor restarts a crashed service): "
        + (", ".join(f"{k} {v}" for k, v in sorted(crashed.items())) if crashed else "none"),
    ]
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


def learning_effect(before: Any, after: Any, *, method: str = "agent", seed: int = 0) -> list[dict[str, Any]]:
    """After minus before on the held-out questions, per metric, with a paired bootstrap 95% CI.

    The records of both evaluations are paired by (dataset, id) (:func:`searchrl.evaluator.compare.compare_records`
    for EM and F1; :func:`searchrl.evaluator.metrics.paired_bootstrap` for the format-valid rate and the reward, the
    ReSearch reward the policy is trained on).

    Returns:
        One dict per metric: ``metric``, ``n``, ``before``, ``after``, ``diff``, ``ci_low``, ``ci_high``.

    Raises:
        InvalidRequest: the two evaluations share no example of ``method``.
    """
    from searchrl.evaluator.compare import compare_records
    from searchrl.evaluator.metrics import paired_bootstrap

    out: list[dict[str, Any]] = []
    rows = compare_records(before.records, after.records, method_a=method, method_b=method, seed=seed)
    b_idx = {(r["dataset"], r["id"]): r for r in before.records if r["method"] == method}
    a_idx = {(r["dataset"], r["id"]): r for r in after.records if r["method"] == method}
    shared = [k for k in b_idx if k in a_idx]
    for row in rows:
        for name, res in (("em", row.em), ("f1", row.f1)):
            out.append({"metric": name, "dataset": row.dataset, **_effect(res)})
    for name in ("format_valid", "reward"):
        res = paired_bootstrap(
            [float(b_idx[k][name]) for k in shared], [float(a_idx[k][name]) for k in shared], seed=seed
        )
        out.append({"metric": name, "dataset": "all", **_effect(res)})
    return out


def _effect(res: Any) -> dict[str, Any]:
    return {
        "n": res.n,
        "before": res.mean_a,
        "after": res.mean_b,
        "diff": res.diff,
        "ci_low": res.ci_low,
        "ci_high": res.ci_high,
    }


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

        stages.start("questions the corpus can answer: training, dev and held-out sets")
        sets = _answerable_sets(a, stages, _train_config(a, {}, Path("train.parquet"), "").rollout.agent.max_doc_chars)
        held_out = _first_jsonl(sets.heldout_path, a.out / "data" / "heldout.jsonl", a.eval_questions)
        n_held = sum(1 for _ in held_out.open(encoding="utf-8"))
        stages.say(
            f"{sets.train_rows} training, {sets.dev_rows} dev, {sets.heldout_rows} held-out questions "
            f"(entity-disjoint, answer recall@{sets.top_k} = 100%); evaluating {n_held} held-out -> {sets.train_path.parent}"
        )

        stages.start("start the stack (redis, reward, retriever, simulator, policy)")
        from searchrl.stack import StackConfig, start_stack

        sup, endpoints = start_stack(
            StackConfig(state_dir=str(a.out / "stack"), index_dir=str(index_dir), weights_roots=(str(a.out),)),
            progress=stages.say,
        )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)

        stages.start(f"evaluate the untrained policy on {n_held} held-out questions")
        # the agent is evaluated with the settings it is trained with (prompt template, prefixes, top-k, budgets)
        agent = _train_config(a, endpoints, sets.train_path, mlflow_uri).rollout.agent
        before = asyncio.run(
            _evaluate(a, endpoints, tokenizer, held_out, a.out / "eval_before", "untrained", mlflow_uri, agent)
        )
        stages.say(before.markdown() if hasattr(before, "markdown") else str(before))

        stages.start(f"GRPO training: {a.steps} steps x {a.batch_size} questions x group {a.group_size}")
        from searchrl.trainer.local.trainer import train

        cfg = _train_config(a, endpoints, sets.train_path, mlflow_uri)
        workers: list[str] = []
        if a.rollout_mode == "async":
            from searchrl.stack import start_rollout_workers

            worker_cfg = a.out / "worker_config.yaml"
            worker_cfg.write_text(cfg.to_yaml())
            workers = start_rollout_workers(sup, endpoints, a.rollout_workers, str(worker_cfg))
            stages.say(f"{len(workers)} rollout worker(s) sample groups into {cfg.rollout.queue.prefix}-groups")

        def on_step(step: int, m: dict[str, float]) -> None:
            stages.say(
                f"step {step}/{a.steps}: reward {m.get('reward/mean', 0):.3f}  F1 {m.get('reward/f1', 0):.3f}  "
                f"searches/ep {m.get('rollout/searches_per_episode', 0):.2f}  noisy {m.get('rollout/noisy_share', 0):.2f}  "
                f"KL {m.get('actor/kl', 0):.4f}  {m.get('time/total_s', 0):.0f}s"
            )

        result = train(cfg, resume=True, progress=on_step)
        for name in workers:  # the groups still queued are not needed; the evaluation gets the machine to itself
            sup.stop_child(name)
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
            _evaluate(a, endpoints, tokenizer, held_out, after_dir, f"grpo-step-{result.step}", mlflow_uri, agent)
        )
        stages.say(after.markdown() if hasattr(after, "markdown") else str(after))

        stages.start("write the report")
        data = write_report(
            a,
            a.out / "report",
            before,
            after,
            history,
            result,
            stages,
            endpoints,
            mlflow_uri,
            sets=sets,
            restarts=dict(sup.restarts) if sup is not None else None,
        )
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
