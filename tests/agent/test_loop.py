"""The ReSearch agent loop: search insertion, loss masks, limits and bad input.

Pure-logic cases use a scripted GenerationBackend (fixed turn texts, the real SmolLM2 tokenizer); the last cases run
the real SmolLM2-135M policy on CPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from transformers import AutoTokenizer

from searchrl.agent.loop import (
    SEARCHES,
    AgentLoop,
    AgentLoopConfig,
    Episode,
    EpisodeRequest,
    GenerationOutput,
    SearchContext,
    format_documents,
    run_episodes,
)
from searchrl.agent.search import InProcessSearch, MixedSearch, NoSearch, RetrieverSearch, SimulatorSearch
from searchrl.client.simulation import SimulatorClient
from searchrl.errors import InvalidRequest
from searchrl.reward.scoring import extract_answer
from searchrl.rollout.v1 import rollout_pb2
from searchrl.simulation.v1 import simulation_pb2
from searchrl.testing import free_port

DOCS = {
    "eiffel": [
        ("Eiffel Tower", "The Eiffel Tower is a wrought-iron lattice tower in Paris, France."),
        ("Paris", "Paris is the capital of France."),
    ],
}


def lookup(query: str, top_k: int) -> list[rollout_pb2.Document]:
    hits = DOCS.get(query.lower().split()[0], [("Nothing", f"No page matches {query}.")])
    return [rollout_pb2.Document(id=str(i), title=t, text=x) for i, (t, x) in enumerate(hits[:top_k])]


@pytest.fixture(scope="module")
def tokenizer(policy_path: str):  # type: ignore[no-untyped-def]
    return AutoTokenizer.from_pretrained(policy_path)


class Scripted:
    """A GenerationBackend that 'samples' fixed texts, one per call; remembers what it was asked."""

    def __init__(self, tokenizer, turns: Sequence[str], finish: Sequence[str] | None = None) -> None:  # type: ignore[no-untyped-def]
        self.tokenizer = tokenizer
        self.turns = list(turns)
        self.finish = list(finish) if finish is not None else None
        self.calls: list[dict[str, object]] = []

    async def generate(self, prompt_ids, sampling, *, stop=(), seed=None):  # type: ignore[no-untyped-def]
        max_new_tokens = sampling.max_new_tokens
        i = len(self.calls)
        self.calls.append(
            {"prompt_ids": list(prompt_ids), "max_new_tokens": max_new_tokens, "stop": tuple(stop), "seed": seed}
        )
        text = self.turns[min(i, len(self.turns) - 1)]
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        reason = "stop" if any(text.endswith(s) for s in stop) else "eos"
        if self.finish is not None:
            reason = self.finish[min(i, len(self.finish) - 1)]
        if len(ids) > max_new_tokens:
            ids, reason = ids[:max_new_tokens], "length"
        if reason == "eos":
            ids = ids + [self.tokenizer.eos_token_id]
        return GenerationOutput(
            ids, [-0.5] * len(ids), self.tokenizer.decode(ids, skip_special_tokens=True), reason, "v-test"
        )


def zero_spans(ep: Episode) -> list[list[int]]:
    spans: list[list[int]] = []
    prev = 1
    for tok, m in zip(ep.response_ids, ep.loss_mask, strict=True):
        if m == 0:
            if prev == 1:
                spans.append([])
            spans[-1].append(tok)
        prev = m
    return spans


def counter(backend: str, outcome: str) -> float:
    return SEARCHES.labels(backend, outcome)._value.get()


def check_mask_layout(ep: Episode, tokenizer, prefix: str = "<think>") -> None:  # type: ignore[no-untyped-def]
    """Loss-mask zeros decode to exactly the prefix and the inserted observations, in order."""
    assert len(ep.response_ids) == len(ep.loss_mask) == len(ep.response_logprobs)
    inserted = ([prefix] if prefix else []) + [t.observation_text for t in ep.turns if t.observation_text]
    spans = [tokenizer.decode(s) for s in zero_spans(ep)]
    # The prefix and the first observation are adjacent when the prefix itself carried the search.
    assert "".join(spans) == "".join(inserted)
    assert all(lp == 0.0 for lp, m in zip(ep.response_logprobs, ep.loss_mask, strict=True) if m == 0)
    sampled = [t for t, m in zip(ep.response_ids, ep.loss_mask, strict=True) if m == 1]
    assert sum(t.generated_tokens for t in ep.turns) == len(sampled)


async def test_search_inserts_documents_with_zero_mask(tokenizer) -> None:  # type: ignore[no-untyped-def]
    gen = Scripted(
        tokenizer,
        [
            " I need the location. </think>\n<search> Eiffel Tower location </search>",
            "\n<think> It is in Paris. </think>\n<answer> The final answer is \\boxed{Paris} </answer>",
        ],
    )
    before = counter("inprocess", "ok")
    loop = AgentLoop(gen, InProcessSearch(lookup), AgentLoopConfig(top_k=2))
    ep = await loop.run("Where is the Eiffel Tower?", ["Paris"], question_id="q1", seed=3)
    assert ep.finish_reason == "answer" and ep.ended_with_eos and ep.answer == "Paris"
    assert [t.finish_reason for t in ep.turns] == ["search", "answer"]
    assert ep.searches[0].query == "Eiffel Tower location" and len(ep.searches[0].documents) == 2
    expected_obs = " <result>\n" + format_documents(lookup("eiffel", 2)) + "\n</result>"
    assert ep.turns[0].observation_text == expected_obs
    assert "Doc 1 (Title: Eiffel Tower) The Eiffel Tower" in ep.response_text
    check_mask_layout(ep, tokenizer)
    # The second turn saw the documents: its prompt ends with the observation tokens.
    second_prompt = gen.calls[1]["prompt_ids"]
    assert tokenizer.decode(second_prompt).endswith(expected_obs)
    assert gen.calls[0]["stop"] == ("</search>", "</answer>")
    assert gen.calls[0]["seed"] == 3 and gen.calls[1]["seed"] != 3
    assert counter("inprocess", "ok") == before + 1
    msg = ep.to_proto(reward=0.5, group_index=2)
    assert (
        list(msg.loss_mask) == ep.loss_mask
        and msg.reward == 0.5
        and msg.turns[0].search.documents[0].title == "Eiffel Tower"
    )
    assert msg.policy_version == "v-test" and msg.ended_with_eos and not msg.mixed_policy_versions
    assert msg.turns[0].search.outcome == "ok"
    # What a trainer reading the rollout stream rebuilds is the episode the worker had.
    back = Episode.from_proto(msg)
    assert back.to_record() == ep.to_record()
    assert back.searches[0].sent and not back.searches[0].failed


async def test_an_episode_knows_when_the_weights_changed_under_it(tokenizer) -> None:  # type: ignore[no-untyped-def]
    class Swapped(Scripted):
        async def generate(self, prompt_ids, sampling, *, stop=(), seed=None):  # type: ignore[no-untyped-def]
            out = await super().generate(prompt_ids, sampling, stop=stop, seed=seed)
            out.policy_version = f"step-{len(self.calls)}"  # every turn from newer weights
            return out

    turns = [" x </think>\n<search> eiffel </search>", "<answer> \\boxed{Paris} </answer>"]
    ep = await AgentLoop(Swapped(tokenizer, turns), InProcessSearch(lookup), AgentLoopConfig()).run("Q?")
    assert ep.policy_version == "step-2" and ep.mixed_policy_versions
    same = await AgentLoop(Scripted(tokenizer, turns), InProcessSearch(lookup), AgentLoopConfig()).run("Q?")
    assert same.policy_version == "v-test" and not same.mixed_policy_versions
    assert Episode.from_proto(ep.to_proto()).mixed_policy_versions


async def test_search_r1_protocol_uses_information_tags(tokenizer) -> None:  # type: ignore[no-untyped-def]
    gen = Scripted(tokenizer, [" x </think><search> eiffel </search>", "<answer> Paris </answer>"])
    ep = await AgentLoop(
        gen, InProcessSearch(lookup), AgentLoopConfig(protocol="search_r1", template="research_base")
    ).run("Q?")
    assert ep.turns[0].observation_text.startswith(" <information>\n") and ep.turns[0].observation_text.endswith(
        "\n</information>"
    )
    assert ep.answer == "Paris"
    check_mask_layout(ep, tokenizer)


async def test_turn_limit_ends_episode(tokenizer) -> None:  # type: ignore[no-untyped-def]
    gen = Scripted(tokenizer, ["</think><search> eiffel </search>"])
    ep = await AgentLoop(gen, InProcessSearch(lookup), AgentLoopConfig(max_turns=3)).run("Q?")
    assert ep.finish_reason == "turn_limit" and not ep.ended_with_eos
    assert len(ep.turns) == 3 and len(ep.searches) == 2  # no search on the last turn: nobody would read it
    assert ep.turns[-1].finish_reason == "turn_limit" and ep.turns[-1].observation_text == ""
    check_mask_layout(ep, tokenizer)


async def test_token_budget_ends_episode(tokenizer) -> None:  # type: ignore[no-untyped-def]
    long_turn = "</think> " + "thinking " * 100 + "<search> eiffel </search>"
    gen = Scripted(tokenizer, [long_turn])
    ep = await AgentLoop(
        gen, InProcessSearch(lookup), AgentLoopConfig(max_response_tokens=150, max_new_tokens_per_turn=40)
    ).run("Q?")
    assert ep.finish_reason == "token_budget"
    assert len(ep.response_ids) <= 150
    # Turn 0 was cut by the per-turn cap with no action: an error observation, then the budget shrinks the next turn.
    assert ep.turns[0].finish_reason == "length" and "Invalid action: no action" in ep.turns[0].observation_text
    used = len(tokenizer.encode("<think>")) + 40 + len(tokenizer.encode(ep.turns[0].observation_text))
    assert gen.calls[1]["max_new_tokens"] == min(40, 150 - used)
    check_mask_layout(ep, tokenizer)
    # Documents that do not fit end the episode instead of being cut.
    gen2 = Scripted(tokenizer, ["</think><search> eiffel </search>"])
    ep2 = await AgentLoop(gen2, InProcessSearch(lookup), AgentLoopConfig(max_response_tokens=30)).run("Q?")
    assert ep2.finish_reason == "token_budget" and len(ep2.searches) == 1 and ep2.turns[0].observation_text == ""
    assert len(ep2.response_ids) <= 30


@pytest.mark.parametrize("query,error", [("   ", "empty query"), ("x" * 10_000, "query too long")])
async def test_bad_query_gets_error_observation(tokenizer, query: str, error: str) -> None:  # type: ignore[no-untyped-def]
    calls: list[str] = []

    def spy(q: str, k: int) -> list[rollout_pb2.Document]:
        calls.append(q)
        return lookup(q, k)

    gen = Scripted(tokenizer, [f"</think><search>{query}</search>", "<answer> \\boxed{x} </answer>"])
    before = counter("inprocess", "invalid_query")
    cfg = AgentLoopConfig(max_new_tokens_per_turn=4096, max_response_tokens=6000)  # room for a 10 kB query
    ep = await AgentLoop(gen, InProcessSearch(spy), cfg).run("Q?")
    assert calls == []  # never sent to the backend
    assert ep.searches[0].error.startswith(error)
    assert "Search error" in ep.turns[0].observation_text and ep.finish_reason == "answer"
    assert counter("inprocess", "invalid_query") == before + 1
    check_mask_layout(ep, tokenizer)


async def test_unclosed_and_unopened_tags_get_error_observation(tokenizer) -> None:  # type: ignore[no-untyped-def]
    gen = Scripted(
        tokenizer,
        ["</think><search> eiffel tower and more", "</think> oops </search>", "<answer> \\boxed{Paris} </answer>"],
        finish=["length", "stop", "stop"],
    )
    ep = await AgentLoop(gen, InProcessSearch(lookup), AgentLoopConfig(max_turns=4)).run("Q?")
    assert ep.finish_reason == "answer"
    assert "Invalid action: unclosed search tag" in ep.turns[0].observation_text
    assert "Invalid action: a closing search tag without an opening one" in ep.turns[1].observation_text
    # error observations never contain literal tags, which the reward's format rules would count
    for turn in ep.turns:
        assert "<search>" not in turn.observation_text and "<answer>" not in turn.observation_text
    assert ep.searches == []
    check_mask_layout(ep, tokenizer)


async def test_eos_without_answer(tokenizer) -> None:  # type: ignore[no-untyped-def]
    gen = Scripted(tokenizer, [" I give up. </think>"])
    ep = await AgentLoop(gen, NoSearch(), AgentLoopConfig()).run("Q?")
    assert ep.finish_reason == "eos" and ep.ended_with_eos and ep.answer == ""
    assert ep.response_ids[-1] == tokenizer.eos_token_id


async def test_backend_down_gives_error_observation_and_continues(tokenizer) -> None:  # type: ignore[no-untyped-def]
    dead = RetrieverSearch(f"127.0.0.1:{free_port()}", timeout_s=2.0)
    gen = Scripted(tokenizer, ["</think><search> eiffel </search>", "<answer> \\boxed{Paris} </answer>"])
    before = counter("retriever", "error")
    try:
        ep = await AgentLoop(gen, dead, AgentLoopConfig()).run("Q?")
    finally:
        await dead.close()
    assert ep.finish_reason == "answer" and len(ep.turns) == 2
    assert ep.searches[0].error.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
    assert ep.turns[0].observation_text == " <result>\nSearch error: the search engine is unavailable.\n</result>"
    assert counter("retriever", "error") == before + 1
    check_mask_layout(ep, tokenizer)


async def test_raising_and_slow_backends(tokenizer) -> None:  # type: ignore[no-untyped-def]
    class Boom:
        name = "boom"

        async def search(self, query: str, *, top_k: int, context: SearchContext):  # type: ignore[no-untyped-def]
            raise ConnectionError("refused")

    class Slow:
        name = "slow"

        async def search(self, query: str, *, top_k: int, context: SearchContext):  # type: ignore[no-untyped-def]
            await asyncio.sleep(5)

    script = ["</think><search> eiffel </search>", "<answer> \\boxed{Paris} </answer>"]
    ep = await AgentLoop(Scripted(tokenizer, script), Boom(), AgentLoopConfig()).run("Q?")
    assert ep.searches[0].error == "ConnectionError: refused" and ep.finish_reason == "answer"
    before = counter("slow", "timeout")
    ep = await AgentLoop(Scripted(tokenizer, script), Slow(), AgentLoopConfig(search_timeout_s=0.2)).run("Q?")
    assert "timed out" in ep.searches[0].error and ep.finish_reason == "answer"
    assert counter("slow", "timeout") == before + 1


async def test_over_long_prompt_and_bad_config(tokenizer) -> None:  # type: ignore[no-untyped-def]
    gen = Scripted(tokenizer, ["<answer> x </answer>"])
    with pytest.raises(InvalidRequest, match="max_prompt_tokens"):
        await AgentLoop(gen, None, AgentLoopConfig(max_prompt_tokens=100)).run("word " * 500)
    with pytest.raises(InvalidRequest, match="question is empty"):
        await AgentLoop(gen, None, AgentLoopConfig()).run("  ")
    with pytest.raises(InvalidRequest, match="template"):
        AgentLoop(gen, None, AgentLoopConfig(template="nope"))
    with pytest.raises(InvalidRequest, match="max_turns"):
        AgentLoop(gen, None, AgentLoopConfig(max_turns=0))


async def test_forced_search_in_response_prefix(tokenizer) -> None:  # type: ignore[no-untyped-def]
    prefix = "<think> I should look it up. </think>\n<search> Eiffel Tower </search>"
    gen = Scripted(tokenizer, ["\n<answer> \\boxed{Paris} </answer>"])
    ep = await AgentLoop(gen, InProcessSearch(lookup), AgentLoopConfig(response_prefix=prefix)).run("Q?")
    assert len(gen.calls) == 1 and ep.turns[0].generated_tokens == 0
    assert ep.searches[0].query == "Eiffel Tower" and ep.answer == "Paris"
    check_mask_layout(ep, tokenizer, prefix)


async def test_episodes_overlap_their_searches(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """Concurrent episodes: while one waits for a slow search, the others keep going (searches overlap in time)."""
    in_flight = 0
    peak = 0

    async def slow_lookup(query: str, top_k: int) -> list[rollout_pb2.Document]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.2)
        in_flight -= 1
        return lookup(query, top_k)

    gen = Scripted(tokenizer, ["</think><search> eiffel </search>", "<answer> \\boxed{Paris} </answer>"])

    class PerEpisode:  # each episode needs its own script position
        tokenizer = gen.tokenizer

        async def generate(self, prompt_ids, sampling, **kw):  # type: ignore[no-untyped-def]
            text = tokenizer.decode(prompt_ids)
            turn = 1 if text.endswith("</result>") else 0
            return await Scripted(tokenizer, [gen.turns[turn]]).generate(prompt_ids, sampling, **kw)

    loop = AgentLoop(PerEpisode(), InProcessSearch(slow_lookup), AgentLoopConfig())
    episodes = await run_episodes(
        loop, [EpisodeRequest(f"Q{i}?", ["Paris"], question_id=str(i), seed=i) for i in range(8)], max_concurrency=8
    )
    assert [e.question_id for e in episodes] == [str(i) for i in range(8)]
    assert all(e.answer == "Paris" for e in episodes)
    assert peak == 8


async def test_mixed_search_is_seeded(tokenizer) -> None:  # type: ignore[no-untyped-def]
    a, b = InProcessSearch(lookup, name="a"), InProcessSearch(lookup, name="b")
    mixed = MixedSearch(a, b, ratio=0.5, seed=1)
    ctx = SearchContext("q", [], seed=7)
    names = [(await mixed.search(f"eiffel {i}", top_k=1, context=ctx)).backend for i in range(40)]
    again = [(await mixed.search(f"eiffel {i}", top_k=1, context=ctx)).backend for i in range(40)]
    assert names == again and 8 < names.count("a") < 32
    assert {(await MixedSearch(a, b, ratio=1.0).search("x", top_k=1, context=ctx)).backend} == {"a"}


class RecordingSimulator:
    """A SimulatorClient without a server: records the SearchRequest each search sends."""

    def __init__(self) -> None:
        self.requests: list[simulation_pb2.SearchRequest] = []

    async def search(self, queries, top_k=0, *, timeout_s=None, **kw):  # type: ignore[no-untyped-def]
        self.requests.append(SimulatorClient.build_request(queries, top_k, **kw))
        return simulation_pb2.SearchResponse()


async def sent(sim: SimulatorSearch, query: str, ctx: SearchContext) -> simulation_pb2.SearchRequest:
    """The request ``sim`` sends for one search of ``query``."""
    await sim.search(query, top_k=5, context=ctx)
    return sim.client.requests[-1]  # type: ignore[attr-defined,no-any-return]


async def test_simulator_request_carries_curriculum_and_context() -> None:
    sim = SimulatorSearch(RecordingSimulator())  # type: ignore[arg-type]
    ctx = SearchContext("Who wrote Dracula?", ["Bram Stoker"], step=3, total_steps=10, seed=5)
    req = await sent(sim, "Dracula author", ctx)
    assert req.curriculum.step == 3 and req.curriculum.total_steps == 10
    assert req.question == "Who wrote Dracula?" and list(req.golden_answers) == ["Bram Stoker"] and req.seed != 0
    assert req.seed == (await sent(sim, "Dracula author", ctx)).seed != (await sent(sim, "other", ctx)).seed
    ev = SimulatorSearch(RecordingSimulator(), training=False, quality="useful")  # type: ignore[arg-type]
    req = await sent(ev, "Dracula author", ctx)
    assert req.question == "" and not req.golden_answers and req.quality == rollout_pb2.DOCUMENT_QUALITY_USEFUL
    assert req.WhichOneof("quality_source") == "quality"


def test_extract_answer() -> None:
    assert extract_answer("<answer> so \\boxed{Bram {Stoker}} </answer>") == "Bram {Stoker}"
    assert extract_answer("<answer>a</answer> <answer> b </answer>") == "b"
    assert extract_answer("<answer> unclosed") == ""


# ----------------------------------------------------------------------------------------------- the real policy


@pytest.fixture(scope="module")
def engine(policy_path: str):  # type: ignore[no-untyped-def]
    from searchrl.services.policy.engines.transformers import TransformersEngine

    eng = TransformersEngine(policy_path, max_batch_size=8, torch_threads=1)
    yield eng
    eng.shutdown()


async def test_real_model_forced_search_gets_documents(engine, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prefix = "<think> I need to find where the Eiffel Tower is. </think>\n<search> Eiffel Tower </search>"
    cfg = AgentLoopConfig(
        response_prefix=prefix, max_turns=2, max_new_tokens_per_turn=48, max_response_tokens=200, temperature=0.7
    )
    loop = AgentLoop(engine, InProcessSearch(lookup), cfg)
    ep = await loop.run("In which city is the Eiffel Tower?", ["Paris"], seed=11)
    assert ep.searches[0].query == "Eiffel Tower" and ep.searches[0].documents[0].title == "Eiffel Tower"
    assert "Doc 1 (Title: Eiffel Tower)" in ep.response_text
    assert ep.turns[0].observation_text in ep.response_text
    check_mask_layout(ep, tokenizer, prefix)
    assert sum(ep.loss_mask) >= 1 and ep.finish_reason in ("answer", "eos", "turn_limit", "token_budget")
    # Sampled log-probs are real (negative) numbers from the model.
    assert all(lp <= 0.0 for lp in ep.response_logprobs) and any(lp < 0 for lp in ep.response_logprobs)
    # Same seed, same episode.
    again = await loop.run("In which city is the Eiffel Tower?", ["Paris"], seed=11)
    assert again.response_ids == ep.response_ids


async def test_real_model_concurrent_episodes_end_cleanly(engine, tokenizer) -> None:  # type: ignore[no-untyped-def]
    cfg = AgentLoopConfig(max_turns=2, max_new_tokens_per_turn=24, max_response_tokens=64)
    loop = AgentLoop(engine, InProcessSearch(lookup), cfg)
    eps = await run_episodes(
        loop, [EpisodeRequest("Who wrote the novel Dracula?", ["Bram Stoker"], seed=s) for s in range(4)]
    )
    for ep in eps:
        assert ep.finish_reason in ("answer", "eos", "turn_limit", "token_budget")
        assert len(ep.response_ids) <= 64
        check_mask_layout(ep, tokenizer)


async def test_answer_prefix_scaffolds_the_last_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The answer prefix follows the observation that the last turn reads, with loss mask 0, and counts as part of the
    answer the reward parses; it is not written before an earlier turn, nor when the loop has turns to spare."""
    prefix = "<think> I should look it up. </think>\n<search>"
    scaffold = "\n<answer> \\boxed{"
    gen = Scripted(tokenizer, [" Eiffel Tower </search>", "Paris} </answer>"])
    cfg = AgentLoopConfig(response_prefix=prefix, answer_prefix=scaffold, max_turns=2)
    ep = await AgentLoop(gen, InProcessSearch(lookup), cfg).run("Q?")
    assert ep.answer == "Paris" and ep.finish_reason == "answer"
    text = tokenizer.decode(gen.calls[1]["prompt_ids"][-8:])  # the last turn's context ends with the scaffold
    assert text.endswith("<answer> \\boxed{"), text
    generated = tokenizer.decode([t for t, m in zip(ep.response_ids, ep.loss_mask, strict=True) if m])
    assert "boxed" not in generated and "Paris" in generated
    # three turns allowed: after the first search the next turn is not the last, so no scaffold yet
    gen3 = Scripted(tokenizer, [" Eiffel Tower </search>", "<answer> \\boxed{Paris} </answer>"])
    cfg3 = AgentLoopConfig(response_prefix=prefix, answer_prefix=scaffold, max_turns=3)
    ep3 = await AgentLoop(gen3, InProcessSearch(lookup), cfg3).run("Q?")
    assert ep3.answer == "Paris" and ep3.response_text.count("<answer>") == 1


def test_short_template_keeps_the_tag_rules_in_a_quarter_of_the_tokens(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from searchrl.agent.prompts import render_prompt

    long = render_prompt(tokenizer, "Who wrote Dracula?", "research_instruct")
    short = render_prompt(tokenizer, "Who wrote Dracula?", "research_short", "search_r1")
    assert len(short.ids) * 2 < len(long.ids)
    for tag in ("<search>", "</search>", "<information>", "</information>", "<answer> \\boxed{", "Who wrote Dracula?"):
        assert tag in short.text, tag
    assert short.text.endswith("<|im_start|>assistant\n")
