"""SGLangEngine on a GPU: in-process ``sglang.Engine`` and a remote SGLang server's native ``/generate``.

Skipped by default (marker ``gpu``); run with ``pytest -m gpu tests/services/test_policy_sglang.py`` on a machine
with CUDA and ``pip install sglang`` (stage 3 of ``scripts/gpu_smoke.sh``). Covers GPU audit #5 (``load_weights`` on
the serving loop), #7 (seeds with deterministic inference) and #9 (log-probs at T=1 and T=0.7). The CPU tests of the
same adapter against a fake of SGLang 0.5.23 are in ``test_policy_sglang_fake.py``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from searchrl.agent.settings import SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def sglang_available() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("sglang")


def forward_logprobs(model_path: str, prompt: list[int], completion: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion], device="cuda")).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(completion)]


async def test_in_process_engine(sglang_available: None, policy_path: str) -> None:
    from searchrl.agent.loop import AgentLoop, AgentLoopConfig
    from searchrl.agent.search import NoSearch
    from searchrl.services.policy.engines.sglang import SGLangEngine

    # deterministic: SGLang uses sampling_seed only with enable_deterministic_inference (GPU audit #7).
    eng = SGLangEngine(policy_path, engine_kwargs={"dtype": "float32", "mem_fraction_static": 0.3}, deterministic=True)
    try:
        prompt = eng.tokenizer.apply_chat_template(
            [{"role": "user", "content": "Count from 1 to 10."}], add_generation_prompt=True, tokenize=True
        )
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        # Log-probs are log_softmax(logits) before temperature at T=1 and at T=0.7 (GPU audit #9).
        for temperature in (1.0, 0.7):
            out = await eng.generate(prompt, SamplingParams(max_new_tokens=24, temperature=temperature), seed=5)
            assert len(out.token_ids) == len(out.logprobs) >= 1
            ref = forward_logprobs(policy_path, prompt, out.token_ids)
            gap = max(abs(a - b) for a, b in zip(ref, out.logprobs, strict=True))
            assert gap < 1e-2, f"T={temperature}: log-prob gap {gap}"  # GPU kernels differ from HF's
            again = await eng.generate(prompt, SamplingParams(max_new_tokens=24, temperature=temperature), seed=5)
            assert again.token_ids == out.token_ids
        stopped = await eng.generate(prompt, SamplingParams(max_new_tokens=40, temperature=0.0), stop=["3"])
        assert stopped.finish_reason == "stop" and "3" in stopped.text
        ep = await AgentLoop(
            eng, NoSearch(), AgentLoopConfig(max_turns=2, max_new_tokens_per_turn=32, max_response_tokens=128)
        ).run("Who wrote Dracula?", seed=1)
        assert ep.finish_reason in ("answer", "eos", "turn_limit", "token_budget") and sum(ep.loss_mask) >= 1
        # Hot-swap on the serving loop (GPU audit #5), then serving goes on with the new version.
        assert await asyncio.wait_for(eng.load_weights(policy_path, "v2"), 300) == "v2"
        after = await asyncio.wait_for(eng.generate(prompt, SamplingParams(max_new_tokens=4, temperature=0.0)), 60)
        assert after.policy_version == "v2" and len(after.token_ids) >= 1
    finally:
        await eng.close()


@pytest.fixture(scope="module")
def sglang_server(sglang_available: None, policy_path: str) -> Iterator[str]:
    from searchrl.testing import free_port

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sglang.launch_server",
            "--model-path",
            policy_path,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--mem-fraction-static",
            "0.3",
            "--dtype",
            "float32",
        ],
        # Raw log-probs (log_softmax(logits) before temperature), the PolicyService contract.
        env={**os.environ, "HF_HUB_OFFLINE": "1", "SGLANG_RETURN_ORIGINAL_LOGPROB": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail("sglang server exited")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    yield url
    proc.terminate()
    proc.wait(60)


async def test_remote_server(sglang_server: str, policy_path: str) -> None:
    from searchrl.services.policy.engines.sglang import SGLangEngine

    eng = SGLangEngine(policy_path, url=sglang_server)
    try:
        ids = eng.tokenizer.encode("The capital of France is")
        out = await eng.generate(ids, SamplingParams(max_new_tokens=8, temperature=0.0))
        assert len(out.token_ids) == len(out.logprobs) >= 1 and out.finish_reason in ("length", "eos")
        texts = await eng.generate_text(["One, two,"], SamplingParams(max_new_tokens=4, temperature=0.0))
        assert texts[0]
        warm = await eng.generate(ids, SamplingParams(max_new_tokens=16, temperature=0.7))
        ref = forward_logprobs(policy_path, ids, warm.token_ids)
        assert max(abs(a - b) for a, b in zip(ref, warm.logprobs, strict=True)) < 1e-2
        assert await eng.load_weights(policy_path, "v2") == "v2"
    finally:
        await eng.close()
