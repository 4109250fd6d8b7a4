"""LoRA (peft) and the KL-free update of the local trainer, on the real SmolLM2-135M-Instruct through transformers.

Must-shows: a LoRA update changes only adapter weights and moves the policy the same way full fine-tuning does; the
merged export loads in plain transformers and gives the adapted model's logits; a LoRA run resumed from its checkpoint
continues exactly like an uninterrupted one; ``algorithm.kl_coef == 0`` runs no reference forward pass (counted with a
forward hook on the real decoder); the off-policy update of ``rollout.mode=async`` takes the PPO ratio against the
sampling policy's log-probs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from searchrl.trainer.config import TrainConfig, load_config

pytestmark = pytest.mark.slow

LORA = ["model.lora_rank=8", "model.lora_alpha=16"]


def _updater_config(*extra: str) -> TrainConfig:
    return load_config(None, ["data.group_size=2", "algorithm.micro_batch_size=2", "algorithm.lr=1e-3", *extra])


@pytest.fixture(scope="module")
def tokenizer(policy_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_path)


def _episodes(tokenizer: Any) -> list[Any]:
    """One GRPO group: the right answer (reward 1) and a wrong one (reward 0), with an inserted (mask-0) document."""
    from searchrl.trainer.local.update import EpisodeData

    prompt = tokenizer.encode("Question: What is the capital of France?\nAnswer:", add_special_tokens=False)
    doc = tokenizer.encode(" <result> Paris is the capital of France. </result>", add_special_tokens=False)
    good = tokenizer.encode(" <answer> \\boxed{Paris} </answer>", add_special_tokens=False)
    bad = tokenizer.encode(" <answer> \\boxed{Berlin} </answer>", add_special_tokens=False)
    return [
        EpisodeData(prompt, doc + good, [0] * len(doc) + [1] * len(good), [], 1.0, "g"),
        EpisodeData(prompt, doc + bad, [0] * len(doc) + [1] * len(bad), [], 0.0, "g"),
    ]


def _margin(updater: Any, episodes: list[Any]) -> float:
    """Summed log-prob of the rewarded response minus the other one's, under the policy."""
    mb = updater._collate(episodes, [0, 1])
    with torch.no_grad():
        logp, _ = updater.forward_logprobs(updater.model, mb, with_entropy=False)
    sums = (logp * mb.response_mask).sum(-1)
    return float(sums[0] - sums[1])


@pytest.fixture(scope="module")
def lora_update(policy_path: str, tokenizer: Any) -> dict[str, Any]:
    """One LoRA update and one full fine-tuning update on the same group, from the same initial model."""
    from transformers import AutoModelForCausalLM

    from searchrl.trainer.local.lora import add_adapters
    from searchrl.trainer.local.update import GRPOUpdater

    torch.manual_seed(0)
    episodes = _episodes(tokenizer)
    out: dict[str, Any] = {"episodes": episodes}
    cfg = _updater_config(*LORA)
    model = add_adapters(AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32), cfg.model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    updater = GRPOUpdater(model.eval(), None, cfg, int(tokenizer.pad_token_id or 0))
    margin0 = _margin(updater, episodes)
    out["lora_metrics"] = updater.update(episodes)
    out["lora"] = (updater, before, margin0, _margin(updater, episodes))

    full_cfg = _updater_config("algorithm.lr=1e-5")
    full = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval().requires_grad_(False)
    full_updater = GRPOUpdater(full.eval(), ref, full_cfg, int(tokenizer.pad_token_id or 0))
    f0 = _margin(full_updater, episodes)
    full_updater.update(episodes)
    out["full"] = (f0, _margin(full_updater, episodes))
    return out


def test_lora_update_changes_only_adapters_in_the_direction_of_full_fine_tuning(lora_update: dict[str, Any]) -> None:
    updater, before, margin0, margin1 = lora_update["lora"]
    after = updater.model.state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    adapters = {k for k in before if "lora_" in k}
    assert adapters and changed, "nothing changed"
    assert changed <= adapters, f"base weights changed: {sorted(changed - adapters)[:5]}"
    assert any("lora_B" in k for k in changed)
    # AdamW holds state only for the adapters, which are the only trainable parameters.
    trainable = [p for p in updater.model.parameters() if p.requires_grad]
    assert len(updater.optimizer.state) == len(trainable) == len(adapters)
    assert sum(p.numel() for p in trainable) < 0.05 * sum(p.numel() for p in updater.model.parameters())
    # Both updates raise the rewarded answer's log-prob against the other one's.
    full0, full1 = lora_update["full"]
    assert full1 > full0
    assert margin1 > margin0
    m = lora_update["lora_metrics"]
    assert m["actor/grad_norm"] > 0 and m["actor/loss_tokens"] > 0
    # The reference is the model with its adapters off; with lora_B = 0 at the start both are the same policy.
    assert m["actor/kl"] == pytest.approx(0.0, abs=1e-7)


def test_merged_export_loads_in_transformers_with_the_adapted_logits(
    lora_update: dict[str, Any], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from searchrl.trainer.local.lora import MergedPolicy

    updater = lora_update["lora"][0]
    model = updater.model
    merged = MergedPolicy(model)
    merged.model.save_pretrained(tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert saved["model_type"] == "llama"
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "merged" / "model.safetensors")).keys()
    assert not any("lora" in k or "base_layer" in k for k in keys)
    ids = torch.tensor([lora_update["episodes"][0].prompt_ids + lora_update["episodes"][0].response_ids])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        exported = plain(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    torch.testing.assert_close(exported, adapted, atol=1e-4, rtol=0)
    assert float((adapted - base).abs().max()) > 1e-3, "the adapters did not change the logits"


def _count_decoder_calls(updater: Any, episodes: list[Any]) -> tuple[int, dict[str, float]]:
    from searchrl.trainer.local.batching import causal_lm_parts

    calls = [0]
    handle = causal_lm_parts(updater.model)[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        metrics = updater.update(episodes)
    finally:
        handle.remove()
    return calls[0], metrics


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_kl_coef_zero_runs_no_reference_forward(policy_path: str, tokenizer: Any, lora: bool) -> None:
    """Policy passes only: with LoRA the reference would run on the same decoder (adapters off), so the count
    halves; with full fine-tuning no reference model is needed at all."""
    from transformers import AutoModelForCausalLM

    from searchrl.trainer.local.lora import add_adapters
    from searchrl.trainer.local.update import GRPOUpdater

    episodes = _episodes(tokenizer)
    counts = {}
    for kl in ("0.001", "0"):
        cfg = _updater_config(*(LORA if lora else []), f"algorithm.kl_coef={kl}")
        model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        ref = None
        if lora:
            model = add_adapters(model, cfg.model)
        elif kl != "0":
            ref = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval()
        updater = GRPOUpdater(model.eval(), ref, cfg, int(tokenizer.pad_token_id or 0))
        counts[kl], metrics = _count_decoder_calls(updater, episodes)
        if kl == "0":
            assert metrics["actor/kl"] == 0.0
            assert metrics["perf/no_grad_passes"] == 0
    # share_prompt: one prompt pass and one response pass per group and forward.
    assert counts["0"] == 2
    assert counts["0.001"] == (4 if lora else 2)  # full fine-tuning: the reference pass runs on the other model
    with pytest.raises(ValueError, match="reference model"):
        GRPOUpdater(AutoModelForCausalLM.from_pretrained(policy_path), None, _updater_config(), 0)


def test_behaviour_logprobs_set_the_ppo_ratio(policy_path: str, tokenizer: Any) -> None:
    """Sampling log-probs equal to the current policy's give exactly the on-policy update (ratio 1); log-probs of a
    policy that liked the sampled tokens less (a stale one) make the ratio e > 1 + clip, so the positive-advantage
    tokens are clipped; an episode without a log-prob per token is refused."""
    import dataclasses

    from transformers import AutoModelForCausalLM

    from searchrl.trainer.local.update import GRPOUpdater

    episodes = _episodes(tokenizer)
    cfg = _updater_config("algorithm.kl_coef=0")

    def updater() -> Any:
        model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32)
        return GRPOUpdater(model.eval(), None, cfg, int(tokenizer.pad_token_id or 0))

    on_policy = updater()
    mb = on_policy._collate(episodes, [0, 1])
    with torch.no_grad():
        logp, _ = on_policy.forward_logprobs(on_policy.model, mb, with_entropy=False)
    sampled = [
        dataclasses.replace(e, rollout_logprobs=[float(logp[i, t]) if m else 0.0 for t, m in enumerate(e.loss_mask)])
        for i, e in enumerate(episodes)
    ]
    recomputed = on_policy.update(sampled)
    behaviour = updater()
    same = behaviour.update(sampled, behaviour_logprobs=True)
    assert same["actor/pg_loss"] == pytest.approx(recomputed["actor/pg_loss"], abs=1e-6)
    assert same["actor/clip_fraction"] == recomputed["actor/clip_fraction"] == 0.0
    assert same["perf/no_grad_passes"] == 0
    for (name, a), b in zip(on_policy.model.named_parameters(), behaviour.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=name)

    stale = [
        dataclasses.replace(e, rollout_logprobs=[x - 1.0 if x else 0.0 for x in e.rollout_logprobs]) for e in sampled
    ]
    clipped = updater().update(stale, behaviour_logprobs=True)
    # the rewarded episode's tokens (advantage > 0) are clipped: about half of the loss tokens
    good_tokens = sum(episodes[0].loss_mask) / (sum(episodes[0].loss_mask) + sum(episodes[1].loss_mask))
    assert clipped["actor/clip_fraction"] == pytest.approx(good_tokens, abs=1e-6)
    with pytest.raises(ValueError, match="no sampling log-prob"):
        updater().update(episodes, behaviour_logprobs=True)


# Tiny episodes, no search: a step takes seconds.
RUN = [
    "seed=11",
    "data.train=[fanoutqa-sub]",
    "data.limit=8",
    "data.batch_size=1",
    "data.group_size=3",
    "rollout.concurrency=1",
    "rollout.search.backend=none",
    "rollout.agent.max_turns=1",
    "rollout.agent.max_new_tokens_per_turn=24",
    "rollout.agent.max_response_tokens=24",
    "rollout.agent.temperature=1.0",
    "algorithm.lr=1e-3",
    "algorithm.micro_batch_size=3",
    "reward.format_bonus=0.3",
    "checkpoint.every_steps=0",  # one checkpoint at the end of each run
    "logging.metrics_port=0",
    "guards.no_search.enabled=false",
    *LORA,
]
COMPARED = ("reward/", "rollout/", "actor/", "guard/", "train/", "perf/")


def test_lora_run_resumes_exactly(tmp_path: Path) -> None:
    """3 LoRA steps in one go vs 2 steps, then a resumed third: the same step-3 metrics, adapter and merged model;
    checkpoints hold the merged model (plain transformers) and the adapter."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from searchrl.errors import InvalidRequest
    from searchrl.trainer.local.trainer import train

    full = train(
        load_config(None, [*RUN, "trainer.max_steps=3", f"trainer.output_dir={tmp_path / 'a'}"]),
        False,
        handle_signals=False,
    )
    assert full.step == 3
    assert any(m["actor/grad_norm"] > 0 for m in full.history), "no step had a learning signal"
    # The in-process engine samples from the adapted policy: its log-probs match the trainer's LoRA forward pass
    # although the policy has moved away from the base model (KL > 0).
    assert full.history[-1]["actor/kl"] > 0
    assert all(m["actor/rollout_logprob_gap"] < 1e-4 for m in full.history)
    cfg_b = load_config(None, [*RUN, "trainer.max_steps=2", f"trainer.output_dir={tmp_path / 'b'}"])
    assert train(cfg_b, resume=False, handle_signals=False).step == 2
    cfg_c = cfg_b.model_copy(update={"trainer": cfg_b.trainer.model_copy(update={"max_steps": 3})})
    resumed = train(cfg_c, handle_signals=False)
    assert resumed.step == 3 and len(resumed.history) == 1
    expected = {k: v for k, v in full.history[2].items() if k.startswith(COMPARED)}
    got = {k: v for k, v in resumed.history[0].items() if k.startswith(COMPARED)}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key == "actor/rollout_logprob_gap":  # float rounding of whichever rows the engine batched together
            assert abs(got[key]) < 1e-4 and abs(value) < 1e-4
            continue
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert full.checkpoint is not None and resumed.checkpoint is not None
    for sub in ("adapter/adapter_model.safetensors", "model/model.safetensors"):
        a, b = load_file(str(full.checkpoint / sub)), load_file(str(resumed.checkpoint / sub))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sub, k)
    # The checkpoint's model folder is a plain transformers model (what LoadWeights and eval read).
    AutoModelForCausalLM.from_pretrained(full.checkpoint / "model")
    # A LoRA checkpoint cannot be resumed as full fine-tuning.
    with pytest.raises(InvalidRequest, match="LoRA"):
        train(cfg_c.model_copy(update={"model": cfg_b.model.model_copy(update={"lora_rank": 0})}), handle_signals=False)


def test_loss_token_logits_give_the_full_logits_log_probs(policy_path: str, tokenizer: Any) -> None:
    """The LM head at loss-mask-1 positions only: the same log-probs and entropies there, 0 elsewhere."""
    from transformers import AutoModelForCausalLM

    from searchrl.trainer.local.update import GRPOUpdater

    model = AutoModelForCausalLM.from_pretrained(policy_path, dtype=torch.float32).eval()
    episodes = _episodes(tokenizer)
    out = {}
    for flag in ("true", "false"):
        cfg = _updater_config("algorithm.kl_coef=0", f"algorithm.loss_token_logits={flag}")
        updater = GRPOUpdater(model, None, cfg, int(tokenizer.pad_token_id or 0))
        mb = updater._collate(episodes, [0, 1])
        with torch.no_grad():
            out[flag] = updater.forward_logprobs(model, mb, with_entropy=True)
    keep = mb.response_mask > 0
    (lp_sel, ent_sel), (lp_all, ent_all) = out["true"], out["false"]
    assert ent_sel is not None and ent_all is not None
    torch.testing.assert_close(lp_sel[keep], lp_all[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent_sel[keep], ent_all[keep], atol=1e-5, rtol=0)
    assert not lp_sel[~keep].any() and not ent_sel[~keep].any()


def test_lora_config_fields() -> None:
    from searchrl.errors import InvalidRequest

    cfg = load_config(None, [])
    assert cfg.model.lora_rank == 0 and cfg.model.lora_dropout == 0.0
    assert "q_proj" in cfg.model.lora_target_modules and "down_proj" in cfg.model.lora_target_modules
    with pytest.raises(InvalidRequest, match="reference_path"):
        load_config(None, ["model.lora_rank=8", "model.reference_path=some/model"])
