"""TransformersEngine with the real SmolLM2-135M-Instruct on CPU: log-probs, batching, seeds, stops, hot-swap."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator

import pytest
import torch

from searchrl.agent.settings import SamplingParams
from searchrl.errors import InvalidRequest
from searchrl.services.policy.engines.transformers import TransformersEngine


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Reference forward passes in the test thread: one thread (OpenMP oversubscription thrashes 2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(policy_path: str):  # type: ignore[no-untyped-def]
    eng = TransformersEngine(policy_path, max_batch_size=8, batch_wait_ms=2, torch_threads=1)
    yield eng
    eng.shutdown()


def chat(engine: TransformersEngine, text: str) -> list[int]:
    return engine.apply_chat_template([{"role": "user", "content": text}])


def forward_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:  # type: ignore[no-untyped-def]
    """Log-probs of ``completion`` after ``prompt`` from one plain forward pass (no cache, no padding)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion)]


async def test_logprobs_match_forward_pass_under_continuous_batching(engine: TransformersEngine) -> None:
    from searchrl.agent.prompts import render_prompt

    questions = (
        "What is the capital of France?",
        "Name a colour.",
        "Tell me a long story about a cat who likes to sail the sea.",
    )
    prompts = [render_prompt(engine.tokenizer, q).ids for q in questions]  # they share the long ReSearch system prompt
    first = [
        asyncio.create_task(engine.generate(p, SamplingParams(max_new_tokens=12, temperature=1.0), seed=i))
        for i, p in enumerate(prompts[:2])
    ]
    while engine.num_running == 0 and not all(t.done() for t in first):
        await asyncio.sleep(0.01)
    # The third request joins a batch that is already decoding (different length, merged cache, cached prefix).
    late = asyncio.create_task(
        engine.generate(prompts[2], SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9), seed=7)
    )
    outs = await asyncio.gather(*first, late)
    assert engine._prefix is not None and len(engine._prefix[1]) >= 100  # the shared-prefix KV was used
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out.token_ids) == len(out.logprobs) >= 1
        ref = forward_logprobs(engine.model, prompt, out.token_ids)
        assert max(abs(a - b) for a, b in zip(ref, out.logprobs, strict=True)) < 1e-4
        assert out.finish_reason in ("eos", "length")
        assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    # A single later request (a second turn of an episode) reuses the cached prefix: same log-probs as a forward pass.
    turn2 = prompts[0] + outs[0].token_ids
    out = await engine.generate(turn2, SamplingParams(max_new_tokens=6), seed=3)
    ref = forward_logprobs(engine.model, turn2, out.token_ids)
    assert max(abs(a - b) for a, b in zip(ref, out.logprobs, strict=True)) < 1e-4


async def test_seeded_sampling_is_reproducible_and_batch_independent(engine: TransformersEngine) -> None:
    p = chat(engine, "Write a word.")
    alone = await engine.generate(p, SamplingParams(max_new_tokens=10), seed=123)
    crowd = await asyncio.gather(
        engine.generate(chat(engine, "Something else entirely, please."), SamplingParams(max_new_tokens=10), seed=5),
        engine.generate(p, SamplingParams(max_new_tokens=10), seed=123),
        engine.generate(p, SamplingParams(max_new_tokens=10), seed=124),
    )
    assert crowd[1].token_ids == alone.token_ids
    assert crowd[2].token_ids != alone.token_ids


async def test_greedy_matches_transformers_generate(engine: TransformersEngine) -> None:
    p = chat(engine, "What is 2 + 2?")
    out = await engine.generate(p, SamplingParams(max_new_tokens=10, temperature=0.0))
    with torch.no_grad():
        ref = engine.model.generate(
            torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=engine.pad_token_id
        )[0, len(p) :]
    n = len(out.token_ids)
    assert out.token_ids == ref[:n].tolist()
    if out.finish_reason == "eos":
        assert out.token_ids[-1] in engine.eos_token_ids


async def test_stop_string_is_kept_and_ends_generation(engine: TransformersEngine) -> None:
    p = chat(engine, "Count from 1 to 20, one number per line.")
    free = await engine.generate(p, SamplingParams(max_new_tokens=16, temperature=0.0))
    assert "3." in free.text  # SmolLM2 writes "1. 1\n2. 2\n3. 3 ..."
    stopped = await engine.generate(p, SamplingParams(max_new_tokens=16, temperature=0.0), stop=["3.", "never-seen"])
    assert stopped.finish_reason == "stop"
    assert stopped.text.endswith("3.") and "4." not in stopped.text
    assert free.token_ids[: len(stopped.token_ids)] == stopped.token_ids
    length = await engine.generate(p, SamplingParams(max_new_tokens=3, temperature=0.0))
    assert length.finish_reason == "length" and len(length.token_ids) == 3


async def test_generate_text(engine: TransformersEngine) -> None:
    texts = await engine.generate_text(
        ["The capital of France is", "One, two,"], SamplingParams(max_new_tokens=4, temperature=0.0)
    )
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


async def test_bad_input(engine: TransformersEngine) -> None:
    with pytest.raises(InvalidRequest, match="context window"):
        await engine.generate([5] * engine.max_context_tokens, SamplingParams(max_new_tokens=4))
    with pytest.raises(InvalidRequest, match="empty"):
        await engine.generate([], SamplingParams(max_new_tokens=4))
    with pytest.raises(InvalidRequest, match="token ids"):
        await engine.generate([engine.vocab_size + 5], SamplingParams(max_new_tokens=4))
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        await engine.generate([5], SamplingParams(max_new_tokens=0))
    with pytest.raises(InvalidRequest, match="top_p"):
        await engine.generate([5], SamplingParams(max_new_tokens=2, top_p=0.0))
    # Still serving afterwards.
    assert (await engine.generate([5, 6], SamplingParams(max_new_tokens=2, temperature=0.0))).token_ids


async def test_cancelled_request_does_not_stall_others(engine: TransformersEngine) -> None:
    p = chat(engine, "Tell me about the sea.")
    doomed = asyncio.create_task(engine.generate(p, SamplingParams(max_new_tokens=200), seed=1))
    other = asyncio.create_task(engine.generate(p, SamplingParams(max_new_tokens=6), seed=2))
    await asyncio.sleep(0.3)
    doomed.cancel()
    out = await asyncio.wait_for(other, 300)
    assert len(out.token_ids) <= 6
    with pytest.raises(asyncio.CancelledError):
        await doomed


async def test_hot_swap_in_flight_finish_on_old_weights(policy_path: str) -> None:
    eng = TransformersEngine(policy_path, max_batch_size=4, version="v1", torch_threads=1)
    try:
        old_model = eng.model
        new_model = copy.deepcopy(old_model)
        with torch.no_grad():
            new_model.model.norm.weight.mul_(1.5)  # different next-token distributions everywhere
        p = chat(eng, "Describe a forest.")
        in_flight = asyncio.create_task(eng.generate(p, SamplingParams(max_new_tokens=16), seed=3))
        while eng.num_running == 0 and not in_flight.done():  # wait until it decodes on v1
            await asyncio.sleep(0.01)
        version = await eng.swap_model(new_model, "v2")
        assert version == "v2" and eng.version == "v2"
        old_out = await in_flight
        new_out = await eng.generate(p, SamplingParams(max_new_tokens=6), seed=3)
        assert old_out.policy_version == "v1" and new_out.policy_version == "v2"
        old_ref = forward_logprobs(old_model, p, old_out.token_ids)
        assert max(abs(a - b) for a, b in zip(old_ref, old_out.logprobs, strict=True)) < 1e-4
        new_ref = forward_logprobs(new_model, p, new_out.token_ids)
        assert max(abs(a - b) for a, b in zip(new_ref, new_out.logprobs, strict=True)) < 1e-4
        # load_weights from a checkpoint directory; set_model shares a live object without waiting.
        assert await eng.load_weights(policy_path, "from-disk") == "from-disk"
        assert (await eng.generate(p, SamplingParams(max_new_tokens=2), seed=1)).policy_version == "from-disk"
        eng.set_model(old_model, "live-7")
        assert (await eng.generate(p, SamplingParams(max_new_tokens=2), seed=1)).policy_version == "live-7"
        with pytest.raises(InvalidRequest, match="does not exist"):
            await eng.load_weights("/nonexistent/ckpt")
    finally:
        await eng.close()


async def test_rows_on_the_old_prefix_and_a_new_prefix_group_admitted_together(engine: TransformersEngine) -> None:
    """Regression: a GRPO group (identical prompts) arriving with a row on the cached prefix replaced the prefix before
    that row was prefilled, which crashed the prefill ("cannot reshape tensor of 0 elements") or used wrong KV."""
    p1 = chat(engine, "Which river flows through Paris?")
    await asyncio.gather(
        *(engine.generate(p1, SamplingParams(max_new_tokens=2), seed=s) for s in (1, 2))
    )  # caches p1[:-1]
    assert engine._prefix is not None and engine._prefix[1] == p1[:-1]
    r1 = p1 + engine.tokenizer.encode(" The Seine", add_special_tokens=False)
    p2 = chat(engine, "Describe, in many words and with great care, " * 12 + "the history of the city of Lyon.")
    assert len(p2) > len(r1) + 10 and p2[: len(p1) - 1] != p1[:-1]
    outs = await asyncio.gather(
        engine.generate(r1, SamplingParams(max_new_tokens=4), seed=3),
        *(engine.generate(p2, SamplingParams(max_new_tokens=4), seed=s) for s in (4, 5, 6, 7)),
    )
    assert engine._prefix is not None and engine._prefix[1] == p2[:-1]  # the group's prefix replaced the old one
    for prompt, out in zip([r1, p2, p2, p2, p2], outs, strict=True):
        ref = forward_logprobs(engine.model, prompt, out.token_ids)
        assert max(abs(a - b) for a, b in zip(ref, out.logprobs, strict=True)) < 1e-4
