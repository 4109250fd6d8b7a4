"""The local GRPO trainer end to end on CPU: SmolLM2-135M-Instruct, FanOutQA sub-questions, a real FAISS index of the
bundled Wikipedia summaries searched in-process, MLflow in a temporary sqlite store.

Must-shows: 3 GRPO steps run with a finite loss and parameters that change; loss-mask-0 tokens get no gradient
(through the trainer's own forward pass); a run stopped after step 2 and resumed gives the same step-3 metrics as an
uninterrupted run; checkpoints are Hugging Face folders the policy engine can hot-load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from searchrl.agent.settings import SamplingParams
from searchrl.trainer.config import TrainConfig, load_config

pytestmark = pytest.mark.slow

# Episodes are tiny so that a step takes seconds on two busy cores: 1 question x 2 samples, <= 2 turns.
BASE_OVERRIDES = [
    "seed=7",
    "data.train=[fanoutqa-sub]",
    "data.limit=8",
    "data.batch_size=1",
    "data.group_size=2",
    "rollout.concurrency=1",  # one generate call at a time: bit-identical sampling across runs
    "rollout.search.backend=inprocess",
    "rollout.agent.max_turns=2",
    "rollout.agent.max_new_tokens_per_turn=32",
    "rollout.agent.max_response_tokens=112",
    "rollout.agent.top_k=2",
    "rollout.agent.max_doc_chars=120",
    "rollout.agent.temperature=0.9",
    "algorithm.lr=5e-5",
    "algorithm.micro_batch_size=2",
    "reward.format_bonus=0.2",
    "trainer.max_steps=3",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=5",
    "logging.metrics_port=0",
]
# Metrics that must be equal between an uninterrupted and a resumed run (timings are not).
COMPARED_PREFIXES = ("reward/", "rollout/", "actor/", "guard/", "train/")
# The policy engine batches rows continuously as searches return, so which rows share a forward pass depends on
# timing; the log-probs it reports then differ from the trainer's recomputation at the 1e-7 level per token. Episodes
# (per-row seeds), rewards, advantages, loss and KL are exact; this diagnostic is only bounded.
TIMING_DEPENDENT = {"actor/rollout_logprob_gap"}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real flat FAISS index over the first 300 bundled Wikipedia summaries (all-MiniLM-L6-v2)."""
    from searchrl.retriever.index.build import build_index

    out = tmp_path_factory.mktemp("index") / "wiki300"
    build_index("wiki", out, limit=300, progress=False)
    return str(out)


def _config(out: Path, index_dir: str, *extra: str) -> TrainConfig:
    return load_config(
        None, [*BASE_OVERRIDES, f"rollout.search.index_dir={index_dir}", f"trainer.output_dir={out}", *extra]
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, index_dir: str) -> Iterator[tuple[Any, TrainConfig]]:
    """Three GRPO steps in this process. Its folder (three full checkpoints, about 5 GB) is removed after the module."""
    from searchrl.trainer.local.trainer import train

    out = tmp_path_factory.mktemp("run_a")
    cfg = _config(out, index_dir)
    seen: list[int] = []
    result = train(cfg, resume=False, progress=lambda step, _m: seen.append(step), handle_signals=False)
    assert seen == [1, 2, 3]
    yield result, cfg
    shutil.rmtree(out, ignore_errors=True)


def _metrics_by_step(out: Path) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[int(row.pop("step"))] = row
    return rows


def test_three_grpo_steps(uninterrupted: tuple[Any, TrainConfig], policy_path: str) -> None:
    from safetensors.torch import load_file

    result, cfg = uninterrupted
    assert result.step == 3 and result.stopped_by is None
    assert len(result.history) == 3
    for m in result.history:
        for key in ("actor/loss", "actor/pg_loss", "actor/kl", "actor/entropy", "actor/grad_norm", "reward/mean"):
            assert math.isfinite(m[key]), key
        assert m["rollout/episodes"] == 2
        assert m["actor/loss_tokens"] > 0
        # On-policy: the first (only) PPO epoch starts at ratio 1, so nothing is clipped.
        assert m["actor/clip_fraction"] == 0.0
        assert m["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6)
        # The engine's sampling log-probs agree with the trainer's forward pass (float32).
        assert m["actor/rollout_logprob_gap"] < 1e-3
    # The policy moved away from the reference: KL > 0 after the first update, and the weights differ.
    assert result.history[-1]["actor/kl"] > 0
    assert any(m["actor/grad_norm"] > 0 for m in result.history)
    initial = load_file(str(Path(policy_path) / "model.safetensors"))
    final = load_file(str(result.checkpoint / "model" / "model.safetensors"))
    changed = [k for k in initial if k in final and not torch.equal(initial[k], final[k])]
    assert len(changed) > 10, "parameters did not change"
    # MLflow has every step's metrics.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=result.tracking_uri)
    history = client.get_metric_history(result.run_id, "reward/mean")
    assert sorted(h.step for h in history) == [1, 2, 3]
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.kl_coef"] == "0.001"
    for key in ("actor/kl", "actor/entropy", "actor/clip_fraction", "actor/grad_norm", "reward/f1", "reward/em",
                "reward/format_rate", "rollout/searches_per_episode", "rollout/response_length",
                "rollout/noisy_share", "time/rollout_s", "time/reward_s", "time/update_s"):  # fmt: skip
        assert key in run.data.metrics, key
    # Checkpoints: one per step, newest three kept, the last one named in "latest".
    ckpts = sorted(p.name for p in cfg.checkpoint_path.iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_000001", "step_000002", "step_000003"]
    assert (cfg.checkpoint_path / "latest").read_text().strip() == "step_000003"


async def test_checkpoint_hot_loads_into_the_policy_engine(uninterrupted: tuple[Any, TrainConfig]) -> None:
    """The checkpoint's model folder is what the PolicyService's LoadWeights reads."""
    from searchrl.services.policy.engines.transformers import TransformersEngine

    result, _ = uninterrupted
    engine = TransformersEngine(str(result.checkpoint / "model"), max_batch_size=2)
    try:
        version = await engine.load_weights(str(result.checkpoint / "model"), version="step-3")
        assert version == "step-3"
        out = await engine.generate(
            engine.tokenizer.encode("The capital of France is"), SamplingParams(max_new_tokens=3, temperature=0.0)
        )
        assert len(out.token_ids) >= 1
    finally:
        await engine.close()


def test_stop_after_step_two_then_resume_matches(
    uninterrupted: tuple[Any, TrainConfig], index_dir: str, tmp_path: Path
) -> None:
    """A real `searchrl train` process gets SIGTERM during step 2: it finishes the step, checkpoints and exits 0.
    Resuming runs step 3 with exactly the metrics of the uninterrupted run."""
    from searchrl.trainer.local.trainer import train

    result_a, _cfg_a = uninterrupted
    out = tmp_path / "run_b"
    cfg = _config(out, index_dir)
    cfg_file = tmp_path / "b.yaml"
    cfg_file.write_text(cfg.to_yaml())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp_path / "b.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "searchrl", "train", "--config", str(cfg_file)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 900
        while "step 2 started" not in (tmp_path / "b.log").read_text(errors="replace"):
            assert proc.poll() is None, (tmp_path / "b.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "step 2 did not start in time"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # step 2 is running now
        rc = proc.wait(600)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (tmp_path / "b.log").read_text()
    assert rc == 0, output[-3000:]
    steps_b = _metrics_by_step(out)
    assert sorted(steps_b) == [1, 2], "the stopped run must finish step 2 and not start step 3"
    assert (cfg.checkpoint_path / "latest").read_text().strip() == "step_000002"
    from mlflow.tracking import MlflowClient

    # Resume in this process: only step 3 runs.
    resumed = train(cfg, resume=True, handle_signals=False)
    assert resumed.step == 3 and len(resumed.history) == 1
    expected = {k: v for k, v in result_a.history[2].items() if k.startswith(COMPARED_PREFIXES)}
    got = {k: v for k, v in resumed.history[0].items() if k.startswith(COMPARED_PREFIXES)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key in TIMING_DEPENDENT:  # same tokens, float rounding of whichever rows the engine batched together
            assert abs(got[key]) < 1e-4 and abs(value) < 1e-4, key
            continue
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    # The same MLflow run continues, now with steps 1-3.
    client = MlflowClient(tracking_uri=resumed.tracking_uri)
    assert sorted({h.step for h in client.get_metric_history(resumed.run_id, "reward/mean")}) == [1, 2, 3]


def test_loss_mask_zero_tokens_get_no_gradient(policy_path: str) -> None:
    """Through the trainer's own forward pass and loss: d(loss)/d(logits) is 0 at inserted (mask-0) positions, and
    changing the advantages / old / reference log-probs there leaves the loss and every parameter gradient unchanged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from searchrl.trainer import grpo
    from searchrl.trainer.local.batching import collate, response_logits

    tok = AutoTokenizer.from_pretrained(policy_path)
    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    prompt = tok.encode("Question: Who wrote Hamlet?\n", add_special_tokens=False)
    sampled_1 = tok.encode(
        "<think> I should search. </think> <search> Hamlet author </search>", add_special_tokens=False
    )
    inserted = tok.encode(
        " <result>\nDoc 1 (Title: Hamlet) Hamlet is a tragedy by William Shakespeare.\n</result>",
        add_special_tokens=False,
    )
    sampled_2 = tok.encode("<answer> \\boxed{William Shakespeare} </answer>", add_special_tokens=False)
    response = sampled_1 + inserted + sampled_2
    mask = [1] * len(sampled_1) + [0] * len(inserted) + [1] * len(sampled_2)
    mb = collate([prompt], [response], [mask], int(tok.pad_token_id or 0))
    cfg = grpo.actor_config(kl_loss_coef=0.001)

    captured: dict[str, torch.Tensor] = {}

    def run(adv_value_at_masked: float, old_shift_at_masked: float) -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        logits = response_logits(model, mb, share_prompt=True)  # the trainer's forward (prompt computed once)
        logits.retain_grad()
        captured["logits"] = logits
        logp = grpo.token_log_probs(logits, mb.responses)
        masked = mb.response_mask == 0
        old = logp.detach().clone()
        old[masked] += old_shift_at_masked
        ref = logp.detach().clone() - 0.05
        ref[masked] -= old_shift_at_masked
        adv = torch.full_like(logp, 0.7)
        adv[masked] = adv_value_at_masked
        loss = grpo.grpo_objective(logp, old, ref, adv, mb.response_mask, cfg).loss
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    loss_a, grads_a = run(0.7, 0.0)
    logits_grad = captured["logits"].grad
    assert logits_grad is not None
    masked = (mb.response_mask == 0)[0]
    assert int(masked.sum()) == len(inserted)
    assert torch.count_nonzero(logits_grad[0, masked]) == 0
    assert torch.count_nonzero(logits_grad[0, ~masked]) > 0
    loss_b, grads_b = run(-50.0, 3.0)
    assert loss_b == pytest.approx(loss_a, abs=1e-7)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=0, msg=name)


def test_remote_policy_rollout_store_and_stopping_guard(tmp_path: Path, policy_path: str, redis_url: str) -> None:
    """engine=remote: episodes come from a real PolicyService, which receives the updated weights through LoadWeights
    after the step; the trajectories land in the Redis rollout stream; with search disabled the no-search guard
    (action stop) ends the run after step 1 of 2 with a checkpoint."""
    import asyncio

    from searchrl.client.policy import PolicyClient
    from searchrl.services.rollouts.store import RolloutStore
    from searchrl.testing import ServiceProcess
    from searchrl.trainer.local.trainer import train

    stream = f"searchrl:test:{tmp_path.name}"
    with ServiceProcess(
        "policy", ["--model", policy_path, "--max-batch-size", "2", "--weights-roots", str(tmp_path)]
    ) as svc:
        cfg = load_config(
            None,
            [*BASE_OVERRIDES, "rollout.search.backend=none", "rollout.engine=remote", f"rollout.policy_target={svc.target}",
             "trainer.max_steps=2", "rollout.agent.max_turns=1", f"trainer.output_dir={tmp_path / 'run'}",
             f"logging.rollout_redis_url={redis_url}", f"logging.rollout_stream={stream}",
             "guards.no_search.steps=1", "guards.no_search.action=stop"],
        )  # fmt: skip
        result = train(cfg, resume=False, handle_signals=False)
        assert result.step == 1 and result.stopped_by == "no_search"
        assert [e.guard for e in result.guard_events] == ["no_search"]
        assert result.metrics["guard/no_search"] == 1.0
        assert result.checkpoint is not None and result.checkpoint.name == "step_000001"
        assert math.isfinite(result.metrics["actor/loss"])
        assert result.metrics["time/weight_sync_s"] > 0

        async def check() -> tuple[str, list[Any]]:
            client = PolicyClient(svc.target)
            store = RolloutStore(redis_url, stream=stream)
            try:
                version = (await client.model_info()).policy_version
                entries = [e async for e in store.iter_all()]
                return version, entries
            finally:
                await client.close()
                await store.close()

        version, entries = asyncio.run(check())
        assert version == "step-1"
        assert len(entries) == 2  # 1 question x 2 samples
        trajectories = [t for _entry_id, t in entries]
        assert {t.group_index for t in trajectories} == {0}
        for t in trajectories:
            assert len(t.response_ids) == len(t.loss_mask) > 0
            assert t.policy_version  # the weights that generated it (the service's initial version here)


def test_redis_killed_mid_step_and_trainer_killed_mid_checkpoint_lose_and_repeat_nothing(
    uninterrupted: tuple[Any, TrainConfig], index_dir: str, tmp_path: Path
) -> None:
    """#17 fault test, sync mode, real processes. A `searchrl train` run publishes every step's trajectories to a
    Redis rollout stream (AOF). Redis is SIGKILLed during step 2 and restarted only once the trainer is retrying its
    publish; then the trainer itself is SIGKILLed while it writes the step-2 checkpoint. Afterwards: the checkpoint
    on disk is the complete step 1 (the half-written step 2 is ignored); the resumed run's steps 2-3 have exactly the
    uninterrupted run's metrics; the stream holds every step's trajectories exactly once (none lost to the outage,
    none repeated by the re-run of step 2), the same ids as the trainer's record."""
    from searchrl.services.rollouts.store import RolloutStore
    from searchrl.serving.process import start_redis, stop_process_group
    from searchrl.testing import free_port
    from searchrl.trainer import checkpoint as ckpt
    from searchrl.trainer.local.trainer import train

    result_a, _cfg_a = uninterrupted
    port = free_port()
    (tmp_path / "redis").mkdir()
    redis, url = start_redis(port, tmp_path / "redis", appendfsync="always")
    out = tmp_path / "run_f"
    cfg = _config(out, index_dir, f"logging.rollout_redis_url={url}", "logging.rollout_stream=faults")
    (tmp_path / "f.yaml").write_text(cfg.to_yaml())
    log_path = tmp_path / "f.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "searchrl", "train", "--config", str(tmp_path / "f.yaml")],
                            stdout=log, stderr=subprocess.STDOUT, env=env)  # fmt: skip

    def wait_for(what: str, check: Any, timeout_s: float = 900, poll_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert proc.poll() is None, f"trainer exited waiting for {what}:\n" + log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(poll_s)

    half = cfg.checkpoint_path / "step_000002.tmp"
    try:
        wait_for("step 2", lambda: "step 2 started" in log_path.read_text(errors="replace"))
        os.kill(redis.pid, signal.SIGKILL)
        redis.wait(10)
        wait_for("the publish retry", lambda: "retrying the batch of 2" in log_path.read_text(errors="replace"))
        redis, _ = start_redis(port, tmp_path / "redis", appendfsync="always")
        wait_for("the step-2 checkpoint write", half.exists, poll_s=0.005)
        proc.send_signal(signal.SIGKILL)  # mid-write: the folder is still step_000002.tmp
        assert proc.wait(30) == -signal.SIGKILL
        assert half.exists() and not (cfg.checkpoint_path / "step_000002").exists()
        assert (cfg.checkpoint_path / "latest").read_text().strip() == "step_000001"
        assert [c.step for c in ckpt.list_checkpoints(cfg.checkpoint_path)] == [1]

        resumed = train(cfg, resume=True, handle_signals=False)  # steps 2 and 3 again, from the step-1 checkpoint
        assert resumed.step == 3 and len(resumed.history) == 2
        for got_row, want_row in zip(resumed.history, result_a.history[1:], strict=True):
            for key, value in want_row.items():
                if not key.startswith(COMPARED_PREFIXES):
                    continue
                if key in TIMING_DEPENDENT:
                    assert abs(got_row[key]) < 1e-4 and abs(value) < 1e-4, key
                else:
                    assert got_row[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key

        async def stream_ids() -> list[str]:
            async with RolloutStore(url, "faults") as store:
                return [t.id async for _entry, t in store.iter_all()]

        import asyncio

        ids = asyncio.run(stream_ids())
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        stop_process_group(redis, group=False)
    run_id = resumed.run_id
    assert ids == [f"{run_id}-{s:06d}-{i:04d}" for s in (1, 2, 3) for i in range(2)], ids
    recorded = [json.loads(x)["id"] for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert sorted(set(recorded)) == sorted(ids)


def test_search_simulator_and_policy_services_killed_mid_rollout_are_restarted_and_the_run_does_not_notice(
    index_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """#17 fault test, sync mode, real processes: the trainer samples from a PolicyService (rollout.engine=remote) and
    searches both a RetrievalService and the SimulatedSearchService (rollout.search.backend=mixed), all three run by
    `searchrl up`'s supervisor; every episode searches first (the demo's response prefix), and step 2's searches go to
    both search services. A baseline run on that stack, then a second run in which the three services are SIGKILLed as
    step 2 starts. The supervisor restarts them; the trainer's calls wait for them (gRPC wait-for-ready, within their
    deadlines) instead of failing; the restarted policy serves its start-up model, so the trainer's backend sees the
    wrong version, loads the run's step-1 weights into it again and repeats the call. The second run has no failed
    search, exactly the baseline's metrics, one reload, and the supervisor counted one restart of each service.
    (Mutations: without wait-for-ready, step 2 has failed searches; without the version check, no reload.)"""
    from searchrl.stack import StackConfig, start_stack
    from searchrl.trainer.local.trainer import train

    sup, endpoints = start_stack(
        StackConfig(
            state_dir=str(tmp_path / "stack"),
            services=("retriever", "simulator", "policy"),
            index_dir=index_dir,
            weights_roots=(str(tmp_path),),
        ),
        progress=lambda _m: None,
    )
    overrides = [
        "trainer.max_steps=2",
        "rollout.agent.max_response_tokens=320",
        "rollout.agent.response_prefix=<think> I need to search for this. </think>\n<search> {question} </search>",
        "rollout.engine=remote",
        f"rollout.policy_target={endpoints['policy']}",
        "rollout.search.backend=mixed",
        "rollout.search.mix_ratio=0.5",
        "rollout.search.timeout_s=180",  # a restart on 2 busy cores can take longer than the 30 s default
        f"rollout.search.retriever_target={endpoints['retriever']}",
        f"rollout.search.simulator_target={endpoints['simulator']}",
    ]
    killed: list[int] = []

    def kill_all(step: int, _metrics: dict[str, float]) -> None:
        if step == 1:  # step 2 starts as this returns
            for name in ("retriever", "simulator", "policy"):
                killed.append(sup.procs[name].pid)
                os.kill(killed[-1], signal.SIGKILL)

    try:
        baseline = train(_config(tmp_path / "base", index_dir, *overrides), resume=False, handle_signals=False)
        assert all(h["rollout/searches_per_episode"] >= 1 for h in baseline.history), "the episodes must search"
        assert 0 < baseline.history[1]["rollout/simulator_search_share"] < 1, "step 2 must search both services"
        with caplog.at_level("WARNING", logger="searchrl.policy.remote"):
            result = train(
                _config(tmp_path / "run_k", index_dir, *overrides),
                resume=False,
                progress=kill_all,
                handle_signals=False,
            )
        restarts = dict(sup.restarts)
    finally:
        sup.stop()
    killed_names = ("retriever", "simulator", "policy")
    assert len(killed) == 3 and [restarts[n] for n in killed_names] == [1, 1, 1], (killed, restarts)
    reloads = [r.getMessage() for r in caplog.records if "loading" in r.getMessage()]
    assert len(reloads) == 1 and "instead of 'step-1'" in reloads[0], reloads
    assert result.step == 2
    assert [h["rollout/search_failures"] for h in result.history] == [0.0, 0.0]
    # The second run finds the baseline's queries in the stack's search cache: its hit rate is not the baseline's.
    backend_only = {"rollout/search_cache_hit_rate"}
    for got_row, want_row in zip(result.history, baseline.history, strict=True):
        for key, value in want_row.items():
            if key.startswith(COMPARED_PREFIXES) and key not in TIMING_DEPENDENT | backend_only:
                assert got_row[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
