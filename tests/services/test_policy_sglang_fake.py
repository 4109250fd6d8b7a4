"""SGLangEngine against a CPU fake of SGLang 0.5.23 (``tests/services/fake_sglang``; its README maps each faked
behaviour to the real source). Covers the weight hot-swap on the serving loop (GPU audit #5), seeds (#7), log-probs
at T != 1 (#9) and the SIGTERM drain with SGLang's signal handlers installed (#11).

The real-GPU counterparts are in ``test_policy_sglang.py`` (marker ``gpu``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from searchrl.agent.settings import SamplingParams
from searchrl.errors import InvalidRequest
from searchrl.services.policy.engines.sglang import SGLangEngine

FAKE_ROOT = Path(__file__).resolve().parent / "fake_sglang"
RAW_LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"  # what SGLang 0.5.23's sampler.py reads


@pytest.fixture
def fake_sglang(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``import sglang`` finds the fake; ``SGLANG_RETURN_ORIGINAL_LOGPROB`` starts unset and is restored after."""
    monkeypatch.syspath_prepend(str(FAKE_ROOT))
    monkeypatch.delenv(RAW_LOGPROB_ENV, raising=False)
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
        monkeypatch.delitem(sys.modules, name)
    import sglang

    assert sglang.__version__.endswith("+fake")
    yield sglang
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
        del sys.modules[name]


@pytest.fixture
def checkpoint_b(tmp_path: Path, policy_path: str) -> str:
    """A second "checkpoint" (the fake's toy weights are keyed by the path; the loader needs config.json)."""
    dst = tmp_path / "step-2"
    dst.mkdir()
    shutil.copy(Path(policy_path) / "config.json", dst / "config.json")
    return str(dst)


def prompt_of(eng: SGLangEngine) -> list[int]:
    return [int(x) for x in eng.tokenizer.encode("The capital of France is", add_special_tokens=False)]


def raw_logprobs(weights: str, prompt: list[int], completion: list[int], vocab: int) -> list[float]:
    """log_softmax(logits) of each completion token under the fake's toy model (the convention we promise)."""
    from sglang.srt.managers.scheduler import log_softmax, toy_logits

    return [
        float(log_softmax(toy_logits(weights, prompt + completion[:i], vocab))[t]) for i, t in enumerate(completion)
    ]


# ----------------------------------------------------------------------------------------- fidelity of the fake
async def test_fake_rejects_what_sglang_rejects(fake_sglang: Any, policy_path: str) -> None:
    from sglang.srt.sampling.sampling_params import SamplingParams

    with pytest.raises(TypeError):
        SamplingParams(seed=3)  # the key is sampling_seed
    sp = SamplingParams(stop=["</search>"])
    with pytest.raises(ValueError, match="skip_tokenizer_init"):
        sp.normalize(None)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0).verify(100)
    with pytest.raises(TypeError):
        fake_sglang.Engine(model_path=policy_path, not_a_server_arg=1)


@pytest.mark.filterwarnings("ignore:coroutine 'TokenizerManager.update_weights_from_disk' was never awaited")
async def test_fake_blocking_wrapper_fails_like_sglang(fake_sglang: Any, policy_path: str) -> None:
    """What the old ``asyncio.to_thread(engine.update_weights_from_disk)`` did, on the fake as on SGLang 0.5.23."""
    # Engine built on the running loop (the GPU test's case): run_until_complete on a running loop.
    eng = fake_sglang.Engine(model_path=policy_path)
    try:
        with pytest.raises(RuntimeError, match="already running"):
            await asyncio.to_thread(eng.update_weights_from_disk, policy_path)
    finally:
        eng.shutdown()
    # Engine built in a worker thread (the old server's case): the coroutine runs on that thread's private loop,
    # handle_loop (bound to this loop by the first generate) resolves its future without waking it: a hang.
    eng = await asyncio.to_thread(fake_sglang.Engine, model_path=policy_path)
    try:
        out = await eng.async_generate(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 2})
        assert len(out["output_ids"]) == 2
        swap = asyncio.ensure_future(asyncio.to_thread(eng.update_weights_from_disk, policy_path))
        try:
            done, _ = await asyncio.wait({swap}, timeout=3)
            assert not done, "expected the blocking wrapper to hang on the other thread's loop"
        finally:
            # Wake the private loop (set_result from handle_loop's thread never does) until the worker thread is
            # through, so that no executor thread stays blocked past the test.
            for _ in range(300):
                if swap.done():
                    break
                eng.loop.call_soon_threadsafe(lambda: None)
                await asyncio.sleep(0.1)
        assert swap.result()[0] is True
    finally:
        eng.shutdown()


# ----------------------------------------------------------------------------------------- audit #5: weight swap
async def test_in_process_engine_binds_sglang_to_the_serving_loop(fake_sglang: Any, policy_path: str) -> None:
    eng = SGLangEngine(policy_path)
    try:
        tm = eng._engine.tokenizer_manager
        assert eng._engine.loop is asyncio.get_running_loop()
        assert tm.event_loop is asyncio.get_running_loop()  # handle_loop (and SGLang's signal handlers) bound now
    finally:
        await eng.close()
    with pytest.raises(RuntimeError, match="event loop that serves it"):
        await asyncio.to_thread(SGLangEngine, policy_path)  # the old server's build, refused


async def test_load_weights_swaps_on_the_serving_loop(
    fake_sglang: Any, policy_path: str, checkpoint_b: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_SGLANG_LOAD_DELAY_S", "0.5")
    eng = SGLangEngine(policy_path)
    try:
        prompt = prompt_of(eng)
        before = await eng.generate(prompt, SamplingParams(max_new_tokens=4, temperature=0.0))
        assert before.policy_version == "0"
        swap = asyncio.create_task(eng.load_weights(checkpoint_b, "step-2"))
        await asyncio.sleep(0.1)  # the swap holds SGLang's writer lock now
        during = asyncio.create_task(eng.generate(prompt, SamplingParams(max_new_tokens=4, temperature=0.0)))
        assert await asyncio.wait_for(swap, 10) == "step-2" and eng.version == "step-2"
        after = await asyncio.wait_for(during, 10)
        # The request sent during the swap waited for it and ran on the new weights.
        assert after.policy_version == "step-2"
        vocab = eng.vocab_size
        assert after.logprobs == pytest.approx(raw_logprobs(checkpoint_b, prompt, after.token_ids, vocab), abs=1e-9)
        assert eng._engine.tokenizer_manager.weight_version == "step-2"
        # A failed load: InvalidRequest, the version is unchanged, and the writer lock is released.
        with pytest.raises(InvalidRequest, match="could not load weights"):
            await asyncio.wait_for(eng.load_weights("/nonexistent/ckpt", "step-3"), 10)
        assert eng.version == "step-2"
        again = await asyncio.wait_for(eng.generate(prompt, SamplingParams(max_new_tokens=2, temperature=0.0)), 10)
        assert again.policy_version == "step-2"
        assert not await eng._engine.tokenizer_manager.model_update_lock.is_locked()
    finally:
        await eng.close()


async def test_cancelled_load_weights_does_not_kill_sglang(
    fake_sglang: Any, policy_path: str, checkpoint_b: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled RPC must not cancel SGLang's update: its handle_loop would set_result on a cancelled future and
    SGLang's print_exception_wrapper kills the process."""
    monkeypatch.setenv("FAKE_SGLANG_LOAD_DELAY_S", "0.5")
    eng = SGLangEngine(policy_path)
    try:
        call = asyncio.create_task(eng.load_weights(checkpoint_b, "step-2"))
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        out = await asyncio.wait_for(
            eng.generate(prompt_of(eng), SamplingParams(max_new_tokens=2, temperature=0.0)), 10
        )
        assert eng._engine.tokenizer_manager.crashed is None
        assert out.policy_version == "step-2" and eng.version == "step-2"  # the swap finished in the background
    finally:
        await eng.close()


# ----------------------------------------------------------------------------------------- audit #9: log-probs
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
async def test_logprobs_are_raw_at_any_temperature(fake_sglang: Any, policy_path: str, temperature: float) -> None:
    eng = SGLangEngine(policy_path)
    try:
        prompt = prompt_of(eng)
        out = await eng.generate(prompt, SamplingParams(max_new_tokens=12, temperature=temperature, top_p=0.95))
        assert len(out.token_ids) == len(out.logprobs) == 12
        ref = raw_logprobs(policy_path, prompt, out.token_ids, eng.vocab_size)
        assert out.logprobs == pytest.approx(ref, abs=1e-9)
    finally:
        await eng.close()


# ----------------------------------------------------------------------------------------- audit #7: seeds
async def test_seeds_reproduce_only_with_deterministic_inference(
    fake_sglang: Any, policy_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    eng = SGLangEngine(policy_path, deterministic=True)
    try:
        assert eng._engine.server_args.enable_deterministic_inference is True
        prompt = prompt_of(eng)
        a = await eng.generate(prompt, SamplingParams(max_new_tokens=16), seed=5)
        b = await eng.generate(prompt, SamplingParams(max_new_tokens=16), seed=5)
        assert a.token_ids == b.token_ids
        # Unseeded requests must not all get SGLang's default seed 42 (a GRPO group would be n copies).
        c, d = await asyncio.gather(*(eng.generate(prompt, SamplingParams(max_new_tokens=16)) for _ in range(2)))
        assert c.token_ids != d.token_ids
    finally:
        await eng.close()
    eng = SGLangEngine(policy_path)  # seeds off: SGLang ignores sampling_seed, and we say so
    try:
        with caplog.at_level(logging.WARNING, logger="searchrl.policy.engines"):
            a = await eng.generate(prompt, SamplingParams(max_new_tokens=16), seed=5)
            b = await eng.generate(prompt, SamplingParams(max_new_tokens=16), seed=5)
        assert a.token_ids != b.token_ids
        assert sum("ignores sampling seeds" in r.getMessage() for r in caplog.records) == 1
    finally:
        await eng.close()


# ----------------------------------------------------------------------------------------- sampling parameters
async def test_sampling_params_pass_sglang_validation(fake_sglang: Any, policy_path: str) -> None:
    # skip_tokenizer_init=True would make SGLang reject stop strings; the engine keeps the tokenizer.
    eng = SGLangEngine(policy_path, engine_kwargs={"skip_tokenizer_init": True})
    try:
        prompt = prompt_of(eng)
        free = await eng.generate(prompt, SamplingParams(max_new_tokens=12, temperature=0.0, top_k=5), seed=2**64 - 1)
        assert free.finish_reason == "length" and len(free.token_ids) == 12
        stop = eng.tokenizer.decode(free.token_ids[3:5])
        stopped = await eng.generate(
            prompt, SamplingParams(max_new_tokens=12, temperature=0.0), stop=[stop, "never-seen"]
        )
        assert stopped.finish_reason == "stop" and stop in stopped.text and len(stopped.token_ids) <= 5
        with pytest.raises(InvalidRequest):
            await eng.generate(prompt, SamplingParams(max_new_tokens=2, top_p=1.5))
    finally:
        await eng.close()


# ----------------------------------------------------------------------------------------- the served policy
@pytest.mark.slow  # a child policy process (imports torch and transformers)
async def test_policy_server_on_sglang_hot_swaps_and_drains_on_sigterm(policy_path: str, checkpoint_b: str) -> None:
    """``searchrl serve policy --engine sglang`` (the fake) in a child process: LoadWeights works, and SIGTERM after
    SGLang installed its handlers still drains the gRPC server (the in-flight call completes, exit 0)."""
    from searchrl.client.policy import PolicyClient
    from searchrl.testing import ServiceProcess

    env = {
        "PYTHONPATH": os.pathsep.join([str(FAKE_ROOT), os.environ.get("PYTHONPATH", "")]),
        "FAKE_SGLANG_STEP_DELAY_S": "0.1",
    }
    roots = str(Path(checkpoint_b).parent)
    proc = ServiceProcess(
        "policy", ["--engine", "sglang", "--grace-s", "30", "--weights-roots", roots], env=env, timeout_s=300
    )
    try:
        async with PolicyClient(proc.target) as pc:
            info = await pc.model_info()
            assert info.engine == "sglang"
            first = await pc.generate(text="Hello", max_new_tokens=2)  # SGLang's first request
            assert len(first.completions[0].token_ids) == 2
            loaded = await asyncio.wait_for(pc.load_weights(checkpoint_b, "step-2"), 30)
            assert loaded.policy_version == "step-2"
            slow = asyncio.create_task(pc.generate(text="Tell me a story", max_new_tokens=30, seed=1))
            await asyncio.sleep(1.0)
            proc.signal(signal.SIGTERM)
            t0 = time.monotonic()
            resp = await asyncio.wait_for(slow, 30)
        assert len(resp.completions[0].token_ids) == 30 and resp.policy_version == "step-2"
        assert await asyncio.to_thread(proc.proc.wait, 30) == 0
        assert time.monotonic() - t0 < 25
        log = proc.output()
        assert "policy: signal received, draining" in log
        assert "FAKE-SGLANG: SIGTERM received" not in log
    except grpc.aio.AioRpcError as exc:
        pytest.fail(f"{exc.code()}: {exc.details()}\n--- log ---\n{proc.output()[-3000:]}")
    finally:
        with contextlib.suppress(Exception):
            proc.stop()
