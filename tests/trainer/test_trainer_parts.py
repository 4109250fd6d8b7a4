"""Pieces of the local trainer without the full model: data order, seeds, batch layout, reward shaping and custom
reward functions, checkpoints, Prometheus gauges, MLflow runs, the RayJob entry point's config check."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
import torch

from searchrl.agent.settings import episode_seed
from searchrl.errors import InvalidRequest
from searchrl.reward.shaping import format_progress, load_reward_function
from searchrl.trainer import checkpoint as ckpt
from searchrl.trainer.local.batching import collate
from searchrl.trainer.local.cursor import DataCursor


def test_data_cursor_epochs_and_resume() -> None:
    c = DataCursor(5, 2, seed=3)
    batches = [c.next_batch() for _ in range(5)]  # 10 draws = 2 epochs
    flat = [i for b in batches for i in b]
    assert sorted(flat[:5]) == [0, 1, 2, 3, 4] and sorted(flat[5:]) == [0, 1, 2, 3, 4]
    assert flat[:5] != flat[5:]  # each epoch has its own permutation
    # A cursor restored from a state continues with the same batches.
    c2 = DataCursor(5, 2, seed=3)
    c2.next_batch()
    state = c2.state_dict()
    c3 = DataCursor(5, 2, seed=3)
    c3.load_state_dict(state)
    assert [c3.next_batch() for _ in range(4)] == batches[1:]
    assert DataCursor(4, 3, seed=0, shuffle=False).next_batch() == [0, 1, 2]
    with pytest.raises(InvalidRequest):
        DataCursor(0, 1, seed=0)


def test_episode_seeds_are_pure_and_distinct() -> None:
    seeds = {episode_seed(0, step, slot, j) for step in range(1, 4) for slot in range(4) for j in range(5)}
    assert len(seeds) == 60
    assert episode_seed(0, 2, 1, 3) == episode_seed(0, 2, 1, 3)
    assert episode_seed(1, 2, 1, 3) != episode_seed(0, 2, 1, 3)


def test_collate_layout() -> None:
    """Prompts left-padded, responses right-padded; logits of the last R+1 positions predict the R response tokens."""
    b = collate([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], [[1, 0], [1, 1, 0]], pad_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert b.position_ids[1].tolist()[2:] == [0, 1, 2, 3]
    assert b.responses.tolist() == [[1, 2, 0], [3, 4, 9]]
    assert b.response_mask.tolist() == [[1, 0, 0], [1, 1, 0]]
    assert b.response_len == 3
    # Position P-1+t of input_ids is followed by response token t in every row.
    p = 3
    for row in range(2):
        for t in range(3):
            if b.attention_mask[row, p + t]:
                assert b.input_ids[row, p + t] == b.responses[row, t]


def test_format_progress() -> None:
    full = "<think> a </think><search> q </search> <result>x</result><think> b </think><answer> \\boxed{y} </answer>"
    assert format_progress(full) == 1.0
    assert format_progress("nothing here") == 0.0
    assert format_progress("<think> a </think> <answer> y </answer>") == pytest.approx(0.5)
    assert format_progress("<think> a </think> <answer> y </answer>", "search_r1") == pytest.approx(2 / 3)
    assert format_progress("<answer> a </answer><answer> b </answer>") == 0.0
    # Tags inside an inserted observation (e.g. an "invalid action" hint) are not the policy's.
    hint = "<think> x </think> <result>\nInvalid action: search with <search> query </search> or <answer> ... </answer>.\n</result>"
    assert format_progress(hint) == pytest.approx(0.25)
    assert format_progress(hint.replace("result>", "information>"), "search_r1") == pytest.approx(1 / 3)


def test_load_reward_function(tmp_path: Path) -> None:
    fn = load_reward_function("pkg://searchrl.reward.verl_reward:compute_score")
    out = fn(
        data_source="x",
        solution_str="<think>k</think><answer> \\boxed{Paris} </answer>",
        ground_truth={"target": ["Paris"]},
        extra_info={},
    )
    assert out["score"] == pytest.approx(1.0)
    f = tmp_path / "my_reward.py"
    f.write_text(
        "def score(data_source, solution_str, ground_truth, extra_info=None):\n    return float(len(solution_str))\n"
    )
    assert load_reward_function(f"{f}:score")(data_source="", solution_str="abc", ground_truth={}, extra_info={}) == 3.0
    for bad in ("no_colon", f"{f}:missing", f"{tmp_path}/nope.py:score"):
        with pytest.raises(InvalidRequest):
            load_reward_function(bad)


def _tiny_model() -> tuple[object, object]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from searchrl.assets import policy_model_path

    tok = AutoTokenizer.from_pretrained(policy_model_path())
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(cfg), tok


def test_checkpoints_are_atomic_pruned_and_restore_rng(tmp_path: Path) -> None:
    import random

    import numpy as np
    from transformers import AutoModelForCausalLM

    model, tok = _tiny_model()
    root = tmp_path / "ckpt"
    for step in (1, 2, 3):
        torch.manual_seed(step)
        info = ckpt.save_checkpoint(
            root,
            step,
            model=model,
            tokenizer=tok,
            state={"cursor": {"epoch": 0, "position": step}},
            config_yaml="seed: 0\n",
            keep_last=2,
        )
    assert [c.step for c in ckpt.list_checkpoints(root)] == [2, 3]
    assert (root / "latest").read_text().strip() == "step_000003"
    # A half-written checkpoint (crash mid-save) is ignored.
    (root / "step_000004.tmp").mkdir()
    (root / "step_000005").mkdir()
    assert ckpt.latest_checkpoint(root) == info
    state = ckpt.load_state(info)
    assert state["step"] == 3 and state["cursor"]["position"] == 3
    # RNG states round-trip.
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.set_rng_state(state["rng"])
    random.random(), np.random.rand(), torch.rand(1)  # advance, then restore again
    ckpt.set_rng_state(state["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected
    # The model folder is a plain Hugging Face checkpoint.
    loaded = AutoModelForCausalLM.from_pretrained(info.model_path)
    for (n1, p1), (_n2, p2) in zip(model.named_parameters(), loaded.named_parameters(), strict=True):
        assert torch.equal(p1, p2), n1


def test_prometheus_gauges_served() -> None:
    from searchrl.testing import free_port
    from searchrl.trainer.telemetry import TrainerGauges

    port = free_port()
    g = TrainerGauges(port=port)
    try:
        metrics = {"reward/mean": 0.25, "reward/f1": 0.5, "rollout/searches_per_episode": 1.5, "actor/kl": 0.01,
                   "rollout/noisy_share": 0.3, "time/rollout_s": 2.0, "time/update_s": 3.0, "time/total_s": 5.5,
                   "rollout/search_failure_rate": 0.125}  # fmt: skip
        g.update(7, metrics, {"no_search": True})
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        g.close()
    assert "searchrl_train_step 7.0" in body
    assert "searchrl_train_reward_mean 0.25" in body
    assert "searchrl_train_f1_mean 0.5" in body
    assert "searchrl_train_searches_per_episode 1.5" in body
    assert "searchrl_train_kl 0.01" in body
    assert "searchrl_train_noisy_share 0.3" in body
    assert 'searchrl_train_step_seconds{phase="update"} 3.0' in body
    assert 'searchrl_train_guard_tripped{guard="no_search"} 1.0' in body
    assert 'searchrl_train_guard_tripped{guard="kl_explosion"} 0.0' in body
    assert "searchrl_train_search_failure_ratio 0.125" in body
    assert 'searchrl_train_guard_tripped{guard="search_failure"} 0.0' in body


def test_mlflow_run_create_and_reopen(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from searchrl.tracking import MlflowRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = MlflowRun(uri, "exp", run_name="r1", tags={"k": "v"})
    run.log_params({"algorithm.lr": 1e-5, "long": "x" * 7000})
    run.log_metrics({"reward/mean": 0.5, "actor/kl": 0.01}, step=1)
    run.finish("KILLED")
    again = MlflowRun(uri, "exp", run_id=run.run_id)
    again.log_metrics({"reward/mean": 0.7}, step=2)
    again.finish()
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.data.tags["k"] == "v"
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "reward/mean")] == [(1, 0.5), (2, 0.7)]
    assert len(r.data.params["long"]) == 6000
    # A run id the store does not know (a checkpoint moved to another MLflow) starts a new run instead of failing.
    other = MlflowRun(f"sqlite:///{tmp_path / 'other.db'}", "exp", run_id=run.run_id)
    assert other.run_id != run.run_id


def test_rayjob_entrypoint_check(tmp_path: Path) -> None:
    pytest.importorskip("verl")
    from searchrl.trainer import rayjob_entrypoint as rj

    cfg = rj.compose("research_grpo", [f"data.train_files={tmp_path}/missing.parquet"])
    problems = rj.check(cfg)
    assert any("data.train_files" in p and "missing.parquet" in p for p in problems)
    bad = rj.compose("research_grpo", ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=null"])
    assert any("verl rejects" in p for p in rj.check(bad, require_data=False))
    assert rj.main(["--config-name=research_grpo", "--check-only", f"data.train_files={tmp_path}/missing.parquet"]) == 2


def test_shared_prompt_forward_matches_plain_forward() -> None:
    """A GRPO group's prompt computed once (KV cache, expanded) gives the same log-probs and parameter gradients as the
    plain padded forward pass."""
    from searchrl.trainer import grpo
    from searchrl.trainer.local.batching import response_logits

    torch.manual_seed(0)
    model, _tok = _tiny_model()
    model.train()
    prompt_a, prompt_b = [11, 12, 13, 14, 15], [21, 22, 23]
    prompts = [prompt_a, prompt_a, prompt_a, prompt_b]
    responses = [[31, 32, 33], [41, 42], [51, 52, 53, 54], [61]]
    masks = [[1, 0, 1], [1, 1], [1, 1, 0, 1], [1]]
    mb = collate(prompts, responses, masks, pad_id=0)
    results = {}
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        logits = response_logits(model, mb, share_prompt=share)
        logp = grpo.token_log_probs(logits.float(), mb.responses)
        loss = grpo.aggregate(-logp * torch.linspace(0.5, 1.5, logp.shape[1]), mb.response_mask, "token-mean")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[share] = (logp.detach(), grads)
    (lp_plain, g_plain), (lp_shared, g_shared) = results[False], results[True]
    valid = mb.response_mask.bool() | (mb.responses != 0)
    for row, r in enumerate(responses):
        torch.testing.assert_close(lp_shared[row, : len(r)], lp_plain[row, : len(r)], rtol=1e-5, atol=1e-5)
    assert valid.any()
    assert g_plain.keys() == g_shared.keys()
    for name in g_plain:
        torch.testing.assert_close(g_shared[name], g_plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_train_cli_config_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from searchrl.trainer.cli import main

    assert main(["--help-config"]) == 0
    listing = capsys.readouterr().out
    assert "algorithm.kl_coef" in listing and "guards.no_search.steps" in listing
    cfg_file = Path(__file__).resolve().parents[2] / "trainer" / "searchrl" / "trainer" / "configs" / "local_demo.yaml"
    assert main(["--config", str(cfg_file), "--print-config", "algorithm.lr=3e-5", "data.batch_size=2"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["algorithm"]["lr"] == pytest.approx(3e-5) and printed["data"]["batch_size"] == 2
    assert main(["--config", str(cfg_file), "--print-config", "algorithm.nope=1"]) == 2
    assert "algorithm.nope" in capsys.readouterr().err
