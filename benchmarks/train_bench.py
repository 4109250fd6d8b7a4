"""Local GRPO step time on CPU, variant by variant in one process: today's settings, each single change, all together.

Runs the real trainer (``searchrl.trainer.local``) with SmolLM2-135M-Instruct on FanOutQA sub-questions, 4 questions x
group 4 by default, searching a FAISS index of the first ``--index-docs`` bundled Wikipedia summaries in-process (built
once in a temporary folder). Every variant is a fresh trainer that first runs one warm-up update on a tiny synthetic
group (first-touch allocation of gradients and optimizer state; not counted), then ``--steps`` timed GRPO steps.

    python benchmarks/train_bench.py                                   # every variant, 2 timed steps each
    python benchmarks/train_bench.py --variants today,new --steps 2    # the headline ratio only
    python benchmarks/train_bench.py --set new:rollout.agent.template=research_short     # change one variant
    python benchmarks/train_bench.py --add "threads2=rollout.torch_threads=2"          # one more single change
    python benchmarks/train_bench.py --shape rollout.agent.max_turns=2 --shape rollout.agent.max_response_tokens=192

Variants (``VARIANTS``): ``today`` is the desk demo as of issue #15 written out field by field (full fine-tuning,
float32, KL 0.001 with a reference model, logits over every response position, the long-document agent settings), so
the baseline does not move when ``local_demo.yaml`` does; each single-change row is ``today`` plus one change; ``new``
is ``today`` plus every chosen change (what the demo recipe uses). ``--shape`` overrides go to every variant alike.

Arithmetic (FLOP, the usual count: 2 x N per token for a forward pass, 6 x N for a trained forward+backward, 4 x N for
a LoRA pass whose frozen weights need activation gradients but no weight gradients; N = decoder parameters without
the embedding, plus the LM head (vocab x hidden) only for tokens that get logits):

* update: the trainer's own count, ``perf/update_gflop`` (decoder tokens per pass x passes; see
  ``GRPOUpdater.work``);
* rollout: ~2 x N x (every response token once, sampled or inserted, plus each group's prompt once) plus the LM head
  for the sampled tokens (the engine's prefix cache and batching make this an estimate).

The machine's reference throughput is the best of a few ``torch.matmul`` of two 2048 x 2048 float32 matrices with
torch's default thread count, timed in the same run; "% matmul" is the step's achieved GFLOP/s against it.
Timings on a shared machine move with the other load: the table prints the load average seen by each variant.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The desk demo (trainer/searchrl/trainer/configs/local_demo.yaml) before issue #15, field by field.
TODAY = [
    "model.dtype=float32",
    "model.lora_rank=0",
    "model.gradient_checkpointing=false",
    "rollout.engine=inprocess",
    "rollout.concurrency=16",
    "rollout.max_batch_size=16",
    "rollout.torch_threads=1",
    "rollout.agent.template=research_instruct",
    "rollout.agent.protocol=research",
    "rollout.agent.max_turns=3",
    "rollout.agent.max_new_tokens_per_turn=96",
    "rollout.agent.max_response_tokens=384",
    "rollout.agent.top_k=3",
    "rollout.agent.max_doc_chars=300",
    'rollout.agent.response_prefix="<think> I need to search for this. </think>\\n<search>"',
    "rollout.agent.temperature=1.0",
    "algorithm.lr=1e-5",
    "algorithm.kl_coef=0.001",
    "algorithm.kl_type=low_var_kl",
    "algorithm.clip_ratio=0.2",
    "algorithm.loss_agg_mode=token-mean",
    "algorithm.micro_batch_size=4",
    "algorithm.max_grad_norm=1.0",
    "algorithm.share_prompt=true",
    "algorithm.loss_token_logits=false",
    "reward.scheme=research",
    "reward.format_bonus=0.1",
]
#: One change each, applied on top of TODAY; "new" applies every one named in NEW.
VARIANTS: dict[str, list[str]] = {
    # the demo's episode since #15: the first search is the question (written by the environment), an answer
    # scaffold after the documents, two turns of at most 24 sampled tokens, temperature 0.7
    "episode": [
        'rollout.agent.response_prefix="<think> I need to search for this. </think>\\n<search> {question} </search>"',
        'rollout.agent.answer_prefix="\\n<answer> \\\\boxed{"',
        "rollout.agent.max_turns=2",
        "rollout.agent.max_new_tokens_per_turn=24",
        "rollout.agent.max_response_tokens=400",
        "rollout.agent.temperature=0.7",
    ],
    "short_prompt": ["rollout.agent.template=research_short"],
    "kl0": ["algorithm.kl_coef=0"],
    "loss_logits": ["algorithm.loss_token_logits=true"],
    "lora": ["model.lora_rank=16", "model.lora_alpha=32", "algorithm.lr=3e-4"],
    "bf16": ["model.dtype=bfloat16"],
}
#: The single changes that make up "new" (bf16 is measured but left out on CPUs without bf16 units).
NEW = ["episode", "short_prompt", "kl0", "loss_logits", "lora"]


@dataclass
class Variant:
    name: str
    overrides: list[str]
    changes: str
    steps: list[dict[str, float]] = field(default_factory=list)
    warmup_s: float = 0.0
    peak_rss_mb: float = 0.0
    load: float = 0.0


class PeakRss:
    """Samples this process's resident set size every 0.2 s while active; ``peak_mb`` is the maximum seen."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self._proc.memory_info().rss / 2**20)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of ``torch.matmul`` of two ``n x n`` float32 matrices (2 n^3 FLOP each) at torch's thread count."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def model_sizes(path: str) -> tuple[int, int]:
    """``(decoder parameters without the embedding, LM-head parameters)`` of the policy model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    head = sum(p.numel() for p in model.get_output_embeddings().parameters())
    return sum(p.numel() for p in model.parameters()) - head, head


def warm_up(trainer: Any) -> None:
    """One update on a tiny synthetic group (two 8-token episodes): the gradients and the optimizer state get
    allocated and touched (tens of seconds for full fine-tuning on a busy CPU) before the timed steps. Moves the
    weights by one small optimizer step, which does not change what a step costs."""
    from searchrl.trainer.local.update import EpisodeData

    ids = list(range(1000, 1008))
    trainer.updater.update([EpisodeData(ids, ids, [1] * 8, [], r, "warm-up") for r in (0.0, 1.0)])
    if trainer.merged is not None:
        trainer.merged.refresh()


def rollout_gflop(m: dict[str, float], group_size: int, body: int, head: int) -> float:
    """Estimated rollout arithmetic of one step (see the module docstring), GFLOP."""
    episodes = m["rollout/episodes"]
    tokens = episodes * m["rollout/response_length"] + episodes / group_size * m["rollout/prompt_length"]
    return 2.0 * (body * tokens + head * episodes * m["rollout/generated_tokens"]) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="timed GRPO steps per variant")
    parser.add_argument(
        "--single-steps", type=int, default=None, help="timed steps of the single-change rows (default --steps)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="untimed warm-up updates per variant (see warm_up; 0: none)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="questions per step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per question (GRPO n)")
    parser.add_argument(
        "--variants", default="", help="comma-separated variants to run (default: today, every single change, new)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="VARIANT:KEY=VALUE",
        help="extra override for one variant (today, new or a single change), e.g. new:rollout.agent.top_k=2",
    )
    parser.add_argument(
        "--add",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE[;KEY=VALUE]",
        help="an extra single-change variant (not part of new unless --with-new)",
    )
    parser.add_argument("--with-new", action="append", default=[], help="also put this --add variant into new")
    parser.add_argument(
        "--shape", action="append", default=[], metavar="KEY=VALUE", help="override applied to every variant alike"
    )
    parser.add_argument("--index-docs", type=int, default=300, help="Wikipedia summaries in the benchmark index")
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from searchrl.assets import policy_model_path
    from searchrl.trainer.config import load_config
    from searchrl.trainer.local.trainer import LocalTrainer

    singles = dict(VARIANTS)
    new_parts = list(NEW)
    for spec in args.add:
        name, _, rest = spec.partition("=")
        singles[name] = [x for x in rest.split(";") if x]
    new_parts += args.with_new
    variants = [Variant("today", [], "desk demo before #15")]
    variants += [Variant(k, v, " ".join(v)) for k, v in singles.items()]
    variants.append(Variant("new", [o for k in new_parts for o in singles[k]], " + ".join(new_parts)))
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = set(wanted) - {v.name for v in variants}
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {[v.name for v in variants]}")
        variants = [v for v in variants if v.name in wanted]
    for item in args.set:
        name, _, kv = item.partition(":")
        match = [v for v in variants if v.name == name]
        if not match or "=" not in kv:
            parser.error(f"--set {item!r}: expected VARIANT:KEY=VALUE with a variant of this run")
        match[0].overrides.append(kv)
        match[0].changes += f" {kv}"

    console = Console(width=200)
    gflops = matmul_gflops()
    body, head = model_sizes(policy_model_path())
    console.print(
        f"machine: torch.matmul 2048x2048 float32 at {torch.get_num_threads()} threads: {gflops:.1f} GFLOP/s; "
        f"policy N = {body / 1e6:.1f}M decoder + {head / 1e6:.1f}M LM head; load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory(prefix="searchrl-train-bench-") as tmp:
        from searchrl.retriever.index.build import build_index

        t = time.perf_counter()
        build_index("wiki", Path(tmp) / "index", limit=args.index_docs, progress=False)
        console.print(f"[dim]benchmark index of {args.index_docs} summaries built in {time.perf_counter() - t:.1f}s")
        for v in variants:
            steps = args.steps if v.name in ("today", "new") else (args.single_steps or args.steps)
            overrides = [
                "seed=0",
                "data.train=[fanoutqa-sub]",
                f"data.batch_size={args.batch_size}",
                f"data.group_size={args.group_size}",
                f"trainer.max_steps={steps}",
                f"trainer.output_dir={tmp}/{v.name}",
                "checkpoint.every_steps=0",
                "checkpoint.save_final=false",
                "logging.metrics_port=0",
                "rollout.search.backend=inprocess",
                f"rollout.search.index_dir={Path(tmp) / 'index'}",
                *TODAY,
                *v.overrides,
                *args.shape,
            ]
            cfg = load_config(None, overrides)
            load_before = os.getloadavg()[0]
            with PeakRss() as rss:
                trainer = LocalTrainer(cfg)
                try:
                    trainer.setup(resume=False)
                    t = time.perf_counter()
                    for _ in range(args.warmup):
                        warm_up(trainer)
                    v.warmup_s = time.perf_counter() - t
                    result = trainer.fit()
                finally:
                    trainer.close()
            v.peak_rss_mb, v.load = rss.peak_mb, (load_before + os.getloadavg()[0]) / 2
            v.steps = result.history
            m = mean(v.steps)
            console.print(
                f"[dim]{v.name}: step {m['time/total_s']:.1f}s (rollout {m['time/rollout_s']:.1f}s, update "
                f"{m['time/update_s']:.1f}s), warm-up {v.warmup_s:.1f}s"
            )

    gflops_after = matmul_gflops()
    console.print(
        f"torch.matmul again after the variants: {gflops_after:.1f} GFLOP/s; the table uses the better of the two "
        f"({max(gflops, gflops_after):.1f}), the machine's throughput with the least interference"
    )
    gflops = max(gflops, gflops_after)
    base = mean(variants[0].steps) if variants[0].name == "today" else None
    table = Table(
        title=f"local GRPO step on CPU: batch {args.batch_size} x group {args.group_size}, SmolLM2-135M-Instruct "
        f"(mean of the timed steps; matmul {gflops:.1f} GFLOP/s)"
    )
    for col in ("variant", "change", "steps", "rollout s", "update s", "step s", "resp tok/ep", "update tok",
                "GFLOP/step", "GFLOP/s", "% matmul", "update x", "step x", "peak RSS MiB", "load"):  # fmt: skip
        table.add_column(col, justify="right" if col not in ("variant", "change") else "left")
    for v in variants:
        m = mean(v.steps)
        work = m["perf/update_gflop"] + rollout_gflop(m, args.group_size, body, head)
        rate = work / m["time/total_s"]
        table.add_row(
            v.name,
            v.changes,
            str(len(v.steps)),
            f"{m['time/rollout_s']:.1f}",
            f"{m['time/update_s']:.1f}",
            f"{m['time/total_s']:.1f}",
            f"{m['rollout/response_length']:.0f}",
            f"{m['perf/decoder_tokens']:.0f}",
            f"{work:.0f}",
            f"{rate:.1f}",
            f"{100 * rate / gflops:.0f}",
            f"{base['time/update_s'] / m['time/update_s']:.2f}" if base else "",
            f"{base['time/total_s'] / m['time/total_s']:.2f}" if base else "",
            f"{v.peak_rss_mb:.0f}",
            f"{v.load:.1f}",
        )
    console.print(table)
    console.print(
        "update x / step x: today's mean time divided by the variant's (higher is faster). update tok: tokens "
        "through the decoder per update pass. The policy's responses differ between variants (other weights, other "
        "documents), so part of a ratio is the response length, shown in resp tok/ep."
    )
    return 0


def mean(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per-key mean of step metrics (keys of the first row)."""
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


if __name__ == "__main__":
    sys.exit(main())
