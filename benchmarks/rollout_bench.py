"""Rollout throughput: ReSearch episodes searching through the real RetrievalService vs an instant in-process lookup.

Both sides run the same N concurrent episodes (same questions, same seeds) with the same CPU TransformersEngine
(SmolLM2-135M-Instruct, continuous batching). The *service* side sends every search over gRPC to a real
``searchrl serve retriever`` child process (FAISS flat index, MiniLM query encoder). The *in-process* side (the
limit: search costs nothing) answers each query from a dictionary filled with the documents the service returned
for it, so both sides insert identical documents and - with fixed seeds - sample the same tokens. The table reports
the median of ``--repeats`` interleaved runs per side, the ratio of the two and how many episodes came out
token-identical.

    .venv/bin/python benchmarks/rollout_bench.py                       # 16 episodes, ~2-4 min on 2 busy cores
    .venv/bin/python benchmarks/rollout_bench.py --episodes 64 --max-new-tokens-per-turn 128 --repeats 3

The index: ``--index-dir DIR`` (any ``searchrl index build`` output), else the bundled Wikipedia flat index when it
is already built (``searchrl index build wiki``), else a slice of ``--slice-size`` bundled summaries that contains the
FanOutQA evidence pages of the questions, built once into the cache directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from searchrl.agent.loop import (
    AgentLoop,
    AgentLoopConfig,
    Episode,
    EpisodeRequest,
    SearchContext,
    SearchOutcome,
    run_episodes,
)
from searchrl.agent.search import RetrieverSearch
from searchrl.rollout.v1 import rollout_pb2


def fanout_subquestions(n: int, seed: int) -> list[tuple[str, str, str]]:
    """``n`` FanOutQA dev sub-questions with scalar answers: ``(question, answer, evidence title)``."""
    from searchrl.assets import fanoutqa_dev_path

    out: list[tuple[str, str, str]] = []

    def walk(node: dict[str, Any]) -> None:
        for sub in node.get("decomposition") or []:
            ans = sub.get("answer")
            if sub.get("question") and isinstance(ans, (str, int, float)):
                out.append((sub["question"], str(ans), str((sub.get("evidence") or {}).get("title", ""))))
            walk(sub)

    for q in json.loads(fanoutqa_dev_path().read_text()):
        walk(q)
    return random.Random(seed).sample(out, n)


def resolve_index(arg: str, titles: set[str], slice_size: int) -> str:
    """The index directory to serve (see the module docstring)."""
    from searchrl.assets import cache_dir

    if arg:
        return arg
    wiki = cache_dir() / "indexes" / "wiki-all-minilm-l6-v2-flat"
    if (wiki / "manifest.json").exists():
        return str(wiki)
    from searchrl.retriever.corpus import iter_wiki
    from searchrl.retriever.index.build import build_index

    root = cache_dir() / "indexes" / f"rollout-bench-slice-{slice_size}"
    if (root / "flat" / "manifest.json").exists():
        return str(root / "flat")
    root.mkdir(parents=True, exist_ok=True)
    passages = list(iter_wiki())
    keep = [p for p in passages if p.title in titles]
    step = max(1, len(passages) // max(1, slice_size - len(keep)))
    keep += [p for p in passages[::step] if p.title not in titles][: max(0, slice_size - len(keep))]
    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        for p in keep:
            fh.write(json.dumps({"id": p.id, "contents": p.contents}) + "\n")
    print(f"building a flat index of {len(keep)} passages in {root} ...", file=sys.stderr)
    build_index(str(corpus), root / "flat", index_type="flat", shard_size=512, progress=False)
    return str(root / "flat")


class Recording:
    """Wraps a backend and remembers the documents of every query."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.docs: dict[str, list[rollout_pb2.Document]] = {}

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        outcome: SearchOutcome = await self.inner.search(query, top_k=top_k, context=context)
        self.docs[query] = list(outcome.documents)
        return outcome


class Replay:
    """The in-process limit: answers from the recorded documents at no cost (counts queries it never saw)."""

    name = "inprocess"

    def __init__(self, docs: dict[str, list[rollout_pb2.Document]]) -> None:
        self.docs = docs
        self.misses = 0

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        if query not in self.docs:
            self.misses += 1
        return SearchOutcome(self.docs.get(query, []), self.name)


@dataclass
class Run:
    seconds: float
    episodes: list[Episode]

    @property
    def sampled(self) -> int:
        return sum(sum(e.loss_mask) for e in self.episodes)

    @property
    def response_tokens(self) -> int:
        return sum(len(e.response_ids) for e in self.episodes)


async def one_run(engine: Any, search: Any, cfg: AgentLoopConfig, requests: list[EpisodeRequest]) -> Run:
    loop = AgentLoop(engine, search, cfg)
    t0 = time.perf_counter()
    episodes = await run_episodes(loop, requests, max_concurrency=len(requests))
    return Run(time.perf_counter() - t0, episodes)


async def main_async(args: argparse.Namespace) -> int:
    from searchrl.assets import policy_model_path
    from searchrl.services.policy.engines.transformers import TransformersEngine
    from searchrl.testing import ServiceProcess

    rows = fanout_subquestions(args.episodes, args.seed)
    index_dir = resolve_index(args.index_dir, {t for _, _, t in rows if t}, args.slice_size)
    engine = TransformersEngine(
        policy_model_path(), max_batch_size=args.max_batch_size, torch_threads=args.torch_threads
    )
    cfg = AgentLoopConfig(
        max_turns=args.max_turns,
        max_new_tokens_per_turn=args.max_new_tokens_per_turn,
        max_response_tokens=args.max_response_tokens,
        top_k=args.top_k,
        max_doc_chars=args.max_doc_chars,
        response_prefix=args.response_prefix,
        temperature=1.0,
    )
    requests = [EpisodeRequest(q, [a], question_id=str(i), seed=args.seed + i) for i, (q, a, _) in enumerate(rows)]
    with ServiceProcess("retriever", ["--index-dir", index_dir, "--http-port", "-1"], timeout_s=600) as proc:
        service = RetrieverSearch(proc.target)
        recording = Recording(service)
        try:
            # Warm-up: engine kernels, retriever encoder, and the recorded documents for the replay side.
            await one_run(
                engine,
                recording,
                AgentLoopConfig(**{**vars(cfg), "max_turns": 1, "max_new_tokens_per_turn": 4}),
                requests[:2],
            )
            first = await one_run(engine, recording, cfg, requests)
            replay = Replay(recording.docs)
            service_runs = [first]
            inproc_runs: list[Run] = []
            for r in range(args.repeats):
                inproc_runs.append(await one_run(engine, replay, cfg, requests))
                if r + 1 < args.repeats:
                    service_runs.append(await one_run(engine, recording, cfg, requests))
        finally:
            await service.close()
    engine.shutdown()

    def med(runs: list[Run], key: str) -> float:
        return statistics.median(
            getattr(r, key) / r.seconds if key != "episodes_per_s" else len(r.episodes) / r.seconds for r in runs
        )

    ref = first.episodes
    same = sum(1 for a, b in zip(ref, inproc_runs[0].episodes, strict=True) if a.response_ids == b.response_ids)
    searches = sum(len(e.searches) for e in ref)
    latencies = [s.latency_ms for e in ref for s in e.searches if not s.error]
    errors = sum(1 for e in ref for s in e.searches if s.error)
    rows_out = []
    for label, runs in (("retriever service (gRPC)", service_runs), ("in-process lookup (limit)", inproc_runs)):
        rows_out.append(
            (
                label,
                f"{med(runs, 'episodes_per_s'):.3f}",
                f"{med(runs, 'sampled'):.1f}",
                f"{med(runs, 'response_tokens'):.1f}",
                f"{statistics.median(r.seconds for r in runs):.1f}",
            )
        )
    ratio_eps = med(service_runs, "episodes_per_s") / med(inproc_runs, "episodes_per_s")
    ratio_tok = med(service_runs, "sampled") / med(inproc_runs, "sampled")
    print(
        f"\nrollout_bench: {args.episodes} concurrent episodes, SmolLM2-135M-Instruct on CPU (transformers engine), index {index_dir}"
    )
    print(
        f"max_turns={cfg.max_turns} max_new_tokens_per_turn={cfg.max_new_tokens_per_turn} max_response_tokens={cfg.max_response_tokens} "
        f"top_k={cfg.top_k} repeats={args.repeats} (median)\n"
    )
    header = ("search path", "episodes/s", "sampled tok/s", "response tok/s", "wall s")
    widths = [max(len(h), *(len(r[i]) for r in rows_out)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in rows_out:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print()
    print(f"service / in-process: episodes/s {ratio_eps:.3f}, sampled tokens/s {ratio_tok:.3f}  (target >= 0.80)")
    print(
        f"searches: {searches} in {len(ref)} episodes ({searches / len(ref):.2f}/episode), {errors} errors, "
        f"service latency median {statistics.median(latencies) if latencies else 0:.1f} ms"
    )
    print(
        f"token-identical episodes (service vs in-process, same seeds): {same}/{len(ref)}; replay misses: {replay.misses}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=16, help="concurrent episodes")
    p.add_argument("--repeats", type=int, default=2, help="runs per side (interleaved); the table shows medians")
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--max-new-tokens-per-turn", type=int, default=48)
    p.add_argument("--max-response-tokens", type=int, default=512)
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--max-doc-chars", type=int, default=300, help="cut each document to this many characters")
    p.add_argument(
        "--response-prefix",
        default="<think> I will search for it. </think>\n<search> {question} </search>",
        help="response prefix; the default forces a first search for the question so every episode searches",
    )
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--torch-threads", type=int, default=1, help="engine intra-op threads (1 suits a few shared cores)")
    p.add_argument("--index-dir", default="", help="index directory to serve (default: see the module docstring)")
    p.add_argument("--slice-size", type=int, default=1000, help="passages of the fallback Wikipedia slice")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
