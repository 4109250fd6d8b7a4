"""Simulator SFT end to end on CPU: rollout store -> sft-data -> TRL SFT -> checkpoint served by `searchrl serve simulator`."""

from __future__ import annotations

import asyncio
import json
import math
import urllib.request
import uuid
from pathlib import Path

import pytest

from searchrl.rollout.v1 import rollout_pb2
from searchrl.simulator import cli
from searchrl.simulator.curriculum import Quality
from searchrl.simulator.prompts import Conditioning, build_messages
from searchrl.simulator.sft import label_trajectory, read_jsonl

PARIS = "Paris is the capital and largest city of France. It lies on the Seine and has about two million inhabitants."
LYON = "Lyon is the third-largest city of France, at the confluence of the Rhone and the Saone rivers."


def _trajectory(tid: str, answer: str, backend: str = "retriever", error: str = "", query: str = "capital of France"):
    docs = [
        rollout_pb2.Document(id="w1", title="Paris", text=PARIS, score=0.8),
        rollout_pb2.Document(id="w2", title="Lyon", text=LYON, score=0.5),
    ]
    call = rollout_pb2.SearchCall(query=query, backend=backend, error=error, documents=[] if error else docs)
    return rollout_pb2.Trajectory(
        id=tid,
        question="What is the capital of France?",
        golden_answers=["Paris"],
        answer=answer,
        turns=[rollout_pb2.Turn(index=0, search=call), rollout_pb2.Turn(index=1, finish_reason="answer")],
    )


TRAJECTORIES = [
    _trajectory("right", "Paris"),  # useful
    _trajectory("wrong", "Lyon", query="largest French city"),  # noisy
    _trajectory("simulated", "Paris", backend="simulator"),  # not a real engine: skipped
    _trajectory("failed", "Paris", error="retriever down"),  # the search failed: skipped
    _trajectory("partial", "Paris city centre"),  # F1 between the thresholds: skipped
]


def test_labels_follow_answer_f1() -> None:
    assert label_trajectory(TRAJECTORIES[0]) is Quality.USEFUL
    assert label_trajectory(TRAJECTORIES[1]) is Quality.NOISY
    assert label_trajectory(TRAJECTORIES[4]) is None
    assert label_trajectory(rollout_pb2.Trajectory(answer="x")) is None  # no gold answers


async def _fill(redis_url: str, stream: str) -> None:
    from searchrl.services.rollouts.store import RolloutStore

    async with RolloutStore(redis_url, stream=stream) as store:
        await store.add_many(TRAJECTORIES)


@pytest.fixture(scope="module")
def sft_checkpoint(redis_url: str, policy_path: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs `searchrl simulator sft-data` then `searchrl simulator sft` (2 steps) once for the module."""
    import torch

    work = tmp_path_factory.mktemp("sim-sft")
    stream = f"test-rollouts-{uuid.uuid4().hex}"
    asyncio.run(_fill(redis_url, stream))
    data = work / "sft.jsonl"
    assert cli.main(["sft-data", "--redis-url", redis_url, "--stream", stream, "--out", str(data)]) == 0
    out = work / "ckpt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from searchrl.simulator.sft import train_sft

        rows = read_jsonl(data)
        result = train_sft(rows * 2, policy_path, out, max_steps=2, learning_rate=1e-4, batch_size=2, max_length=512)
    finally:
        torch.set_num_threads(threads)
    return {"data": data, "out": out, "result": result}


@pytest.mark.slow
def test_sft_data_rows_use_the_serving_prompt(sft_checkpoint: dict) -> None:
    rows = [json.loads(line) for line in Path(sft_checkpoint["data"]).read_text().splitlines()]
    assert [(r["trajectory_id"], r["quality"]) for r in rows] == [("right", "useful"), ("wrong", "noisy")]
    useful = rows[0]
    cond = Conditioning("What is the capital of France?", ("Paris",))
    assert useful["prompt"] == build_messages("capital of France", Quality.USEFUL, 2, cond)[:2]
    content = useful["completion"][0]["content"]
    assert content.startswith('Useful documents for "capital of France":\nDoc 1: Paris\nParis is the capital')
    assert "\nDoc 2: Lyon\nLyon is the third-largest" in content
    assert rows[1]["prompt"] == build_messages("largest French city", Quality.NOISY, 2, cond)[:2]


@pytest.mark.slow
def test_sft_writes_a_loadable_checkpoint_with_finite_loss(sft_checkpoint: dict, policy_path: str) -> None:
    import torch
    from safetensors.torch import load_file

    result, out = sft_checkpoint["result"], Path(sft_checkpoint["out"])
    assert result.steps == 2 and math.isfinite(result.train_loss) and 0 < result.train_loss < 20
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert (out / "config.json").exists() and (out / "tokenizer_config.json").exists()
    tuned = load_file(str(out / "model.safetensors"))
    base = load_file(str(Path(policy_path) / "model.safetensors"))
    changed = [k for k in base if k in tuned and not torch.equal(base[k], tuned[k])]
    assert changed, "two SFT steps at lr 1e-4 must move the weights"


@pytest.mark.slow
def test_the_service_process_serves_the_fine_tuned_simulator(sft_checkpoint: dict, redis_url: str) -> None:
    from searchrl.client.base import ChannelOptions
    from searchrl.client.simulation import SimulatorClient
    from searchrl.testing import ServiceProcess

    out = str(sft_checkpoint["out"])
    args = [
        "--model",
        out,
        "--redis-url",
        redis_url,
        "--torch-threads",
        "1",
        "--top-k",
        "2",
        "--tokens-per-doc",
        "24",
        "--max-retries",
        "1",
    ]
    with ServiceProcess("simulator", args, timeout_s=300) as proc:

        async def calls() -> tuple:
            async with SimulatorClient(proc.target, ChannelOptions(timeout_s=300)) as client:
                info = await client.info()
                q = f"capital of France {uuid.uuid4().hex[:6]}"
                first = await client.search(
                    [q], quality="useful", question="What is the capital of France?", golden_answers=["Paris"]
                )
                second = await client.search(
                    [q], quality="useful", question="What is the capital of France?", golden_answers=["Paris"]
                )
                return info, first, second

        info, first, second = asyncio.run(calls())
        assert info.engine == "transformers" and info.model == out
        assert len(first.results[0].documents) == 2 and not first.results[0].cache_hit
        assert second.results[0].cache_hit
        assert [d.text for d in second.results[0].documents] == [d.text for d in first.results[0].documents]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10).read().decode()
        assert 'searchrl_simulator_queries_total{quality="useful"} 2.0' in metrics
        assert "searchrl_simulator_engine_tokens_total" in metrics
        assert 'searchrl_grpc_requests_total{code="OK",method="Search",service="simulator"} 2.0' in metrics
