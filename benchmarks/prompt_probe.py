"""How often the policy searches and keeps the ReSearch format, per response prefix (prompt tuning probe).

Runs N FanOutQA dev sub-questions through the agent loop with the real policy on CPU for each response prefix and
prints searches per episode, the share of episodes with a search, the ReSearch format pass rate and the mean reward
(``searchrl.reward.scoring``, scheme ``research``). Documents come from a real RetrievalService when
``--retriever HOST:PORT`` is given, else from an instant in-process stub that echoes the query (the probe measures the
policy's behaviour, not retrieval quality).

    .venv/bin/python benchmarks/prompt_probe.py                 # 20 questions x 2 prefixes, ~2-5 min on 2 busy cores
    .venv/bin/python benchmarks/prompt_probe.py --questions 100 --template research_base
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter

from searchrl.agent.loop import AgentLoop, AgentLoopConfig, EpisodeRequest, run_episodes
from searchrl.agent.prompts import SEARCH_FIRST_PREFIX, THINK_PREFIX
from searchrl.agent.search import InProcessSearch, RetrieverSearch
from searchrl.rollout.v1 import rollout_pb2


def echo(query: str, top_k: int) -> list[rollout_pb2.Document]:
    return [rollout_pb2.Document(title="Result", text=f"Information about {query}.")]


async def main_async(args: argparse.Namespace) -> int:
    from rollout_bench import fanout_subquestions  # type: ignore[import-not-found]  # same folder

    from searchrl.assets import policy_model_path
    from searchrl.reward.scoring import score
    from searchrl.services.policy.engines.transformers import TransformersEngine

    rows = fanout_subquestions(args.questions, args.seed)
    engine = TransformersEngine(policy_model_path(), max_batch_size=args.questions, torch_threads=args.torch_threads)
    search = RetrieverSearch(args.retriever) if args.retriever else InProcessSearch(echo)
    table = []
    for label, prefix in (("<think>", THINK_PREFIX), ("search-first", SEARCH_FIRST_PREFIX)):
        cfg = AgentLoopConfig(
            template=args.template,
            max_turns=args.max_turns,
            max_new_tokens_per_turn=args.max_new_tokens_per_turn,
            max_response_tokens=args.max_response_tokens,
            response_prefix=prefix,
            max_doc_chars=300,
        )
        t0 = time.perf_counter()
        eps = await run_episodes(
            AgentLoop(engine, search, cfg),
            [EpisodeRequest(q, [a], seed=args.seed + i) for i, (q, a, _) in enumerate(rows)],
        )
        secs = time.perf_counter() - t0
        scores = [score(e.response_text, e.golden_answers, "research", e.ended_with_eos) for e in eps]
        n = len(eps)
        finish = Counter(e.finish_reason for e in eps)
        table.append(
            (
                label,
                f"{sum(len(e.searches) for e in eps) / n:.2f}",
                f"{100 * sum(1 for e in eps if e.searches) / n:.0f}%",
                f"{100 * sum(s.format_ok for s in scores) / n:.0f}%",
                f"{sum(s.reward for s in scores) / n:.3f}",
                " ".join(f"{k}:{v}" for k, v in sorted(finish.items())),
                f"{secs:.0f}",
            )
        )
    engine.shutdown()
    header = (
        "response prefix",
        "searches/episode",
        "episodes with search",
        "format ok",
        "mean reward",
        "finish reasons",
        "s",
    )
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
    print(
        f"\nprompt_probe: {len(rows)} FanOutQA dev sub-questions, SmolLM2-135M-Instruct, template {args.template}, "
        f"documents from {'the retriever ' + args.retriever if args.retriever else 'an echo stub'}\n"
    )
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for r in table:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=20)
    p.add_argument("--template", default="research_instruct", choices=("research_instruct", "research_base"))
    p.add_argument("--max-turns", type=int, default=3)
    p.add_argument("--max-new-tokens-per-turn", type=int, default=48)
    p.add_argument("--max-response-tokens", type=int, default=400)
    p.add_argument("--retriever", default="", help="HOST:PORT of a RetrievalService (default: echo stub)")
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
