"""Simulation engines with the real CPU model, and the OpenAI-compatible engine against real local HTTP servers."""

from __future__ import annotations

import pytest

from searchrl.agent.settings import SamplingParams
from searchrl.errors import DeadlineExceeded, FailedPrecondition, InvalidRequest, Unavailable
from searchrl.simulator.curriculum import Quality
from searchrl.simulator.engines import OpenAISimulationEngine, cut_at_stop, make_engine, render_chat, seeds_for
from searchrl.simulator.prompts import build_messages
from searchrl.testing import free_port

MSGS = build_messages("capital of France", Quality.USEFUL, 2)


def test_render_chat_continues_the_assistant_prefill(sim_engine) -> None:
    text = render_chat(sim_engine.tokenizer, MSGS)
    assert text.endswith('<|im_start|>assistant\nUseful documents for "capital of France":\nDoc 1:')
    plain = render_chat(sim_engine.tokenizer, MSGS[:2])
    assert plain.endswith("<|im_start|>assistant\n")
    with pytest.raises(InvalidRequest):
        render_chat(sim_engine.tokenizer, [])


def test_helpers() -> None:
    assert seeds_for(3, 10) == [10, 11, 12]
    assert seeds_for(2, [5, 9]) == [5, 9]
    assert seeds_for(2, None) == [None, None]
    with pytest.raises(InvalidRequest):
        seeds_for(2, [1])
    assert cut_at_stop("abc Doc 3: x", ["Doc 3:", "zz"]) == ("abc ", True)
    assert cut_at_stop("abc", ["Doc 3:"]) == ("abc", False)
    with pytest.raises(InvalidRequest):
        make_engine("nope", "m")
    with pytest.raises(InvalidRequest):
        OpenAISimulationEngine([], "m")


async def test_transformers_engine_is_seeded_and_cuts_at_stop(sim_engine) -> None:
    a, b, c = await sim_engine.generate(
        [MSGS, MSGS, MSGS], SamplingParams(max_new_tokens=12, temperature=1.0), seed=[3, 3, 4]
    )
    assert a.text == b.text and a.tokens == b.tokens > 0
    assert a.finish_reason in ("stop", "length")
    assert (a.text, a.tokens) != (c.text, c.tokens) or a.tokens < 3  # another seed samples differently
    # a stop string that the completion contains is cut off, as OpenAI servers do
    probe = a.text.strip()[:3]
    if probe:
        [cut] = await sim_engine.generate(
            [MSGS], SamplingParams(max_new_tokens=12, temperature=1.0), seed=3, stop=[probe]
        )
        assert probe not in cut.text and cut.finish_reason == "stop"
    with pytest.raises(InvalidRequest):
        await sim_engine.generate([MSGS], SamplingParams(max_new_tokens=0))
    with pytest.raises(InvalidRequest):
        await sim_engine.generate([MSGS], SamplingParams(max_new_tokens=4, top_p=0.0))


async def test_openai_engine_chat_and_completions_match_the_engine_behind(sim_engine, openai_server_factory) -> None:
    server = openai_server_factory(sim_engine)
    remote = OpenAISimulationEngine([server.url + "/v1"], "smollm2", timeout_s=120)
    try:
        prompt_text = render_chat(sim_engine.tokenizer, MSGS)
        chat, comp = await remote.generate(
            [MSGS, prompt_text], SamplingParams(max_new_tokens=10, temperature=1.0), seed=[21, 21], stop=["Doc 3:"]
        )
        [direct] = await sim_engine.generate(
            [MSGS], SamplingParams(max_new_tokens=10, temperature=1.0), seed=21, stop=["Doc 3:"]
        )
        assert chat.text == direct.text and chat.tokens == direct.tokens > 0
        assert comp.text == direct.text  # the same prompt rendered locally, through /v1/completions
        chat_body, comp_body = sorted(server.bodies, key=lambda b: "messages" in b, reverse=True)
        assert chat_body["continue_final_message"] is True and chat_body["add_generation_prompt"] is False
        assert chat_body["model"] == "smollm2" and chat_body["seed"] == 21 and chat_body["stop"] == ["Doc 3:"]
        assert comp_body["prompt"] == prompt_text
    finally:
        await remote.close()


async def test_openai_engine_round_robin_and_retry(sim_engine, openai_server_factory) -> None:
    a = openai_server_factory(sim_engine)
    b = openai_server_factory(sim_engine, fail_first=1)
    remote = OpenAISimulationEngine([a.url, b.url], "m", timeout_s=120)
    try:
        outs = await remote.generate([MSGS] * 4, SamplingParams(max_new_tokens=2), seed=1)
        assert len(outs) == 4 and all(o.tokens > 0 for o in outs)
        # 4 prompts + 1 retry of the 503 spread over both servers
        assert a.requests + b.requests == 5
        assert a.requests >= 2 and b.requests >= 2
    finally:
        await remote.close()


async def test_openai_engine_down_is_unavailable() -> None:
    remote = OpenAISimulationEngine([f"http://127.0.0.1:{free_port()}"], "m", max_attempts=2)
    try:
        with pytest.raises(Unavailable, match="after 2 attempts"):
            await remote.generate([MSGS], SamplingParams(max_new_tokens=4))
    finally:
        await remote.close()


async def test_openai_engine_server_errors_exhaust_retries(openai_server_factory) -> None:
    broken = openai_server_factory(None)  # answers 500 to everything
    remote = OpenAISimulationEngine([broken.url], "m", max_attempts=3)
    try:
        with pytest.raises(Unavailable, match="HTTP 500"):
            await remote.generate([MSGS], SamplingParams(max_new_tokens=4))
        assert broken.requests == 3
    finally:
        await remote.close()


async def test_openai_engine_slow_server_is_deadline_exceeded(openai_server_factory) -> None:
    slow = openai_server_factory(None, delay_s=3.0)
    remote = OpenAISimulationEngine([slow.url], "m", timeout_s=0.3)
    try:
        with pytest.raises(DeadlineExceeded):
            await remote.generate([MSGS], SamplingParams(max_new_tokens=4))
    finally:
        await remote.close()


async def test_openai_engine_wrong_path_is_failed_precondition(openai_server_factory) -> None:
    server = openai_server_factory(None)
    remote = OpenAISimulationEngine([server.url + "/wrong"], "m")
    try:
        with pytest.raises(FailedPrecondition, match="404"):
            await remote.generate([MSGS], SamplingParams(max_new_tokens=4))
    finally:
        await remote.close()


@pytest.mark.gpu
async def test_vllm_engine_generates_on_gpu(policy_path: str) -> None:
    from searchrl.simulator.engines import VLLMSimulationEngine

    engine = VLLMSimulationEngine(policy_path, engine_kwargs={"gpu_memory_utilization": 0.3, "max_model_len": 2048})
    try:
        a, b = await engine.generate(
            [MSGS, MSGS], SamplingParams(max_new_tokens=32, temperature=1.0), seed=[5, 5], stop=["Doc 3:"]
        )
        assert a.text == b.text and a.tokens > 0 and "Doc 3:" not in a.text
    finally:
        await engine.close()
