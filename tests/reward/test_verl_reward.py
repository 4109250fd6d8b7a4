"""verl's reward hook: ``compute_score`` loaded the way verl loads ``custom_reward_function`` and run through verl's
``NaiveRewardManager`` on a real tokenizer (CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from searchrl.errors import InvalidRequest
from searchrl.reward import verl_reward
from searchrl.reward.verl_reward import compute_score, golden_answers_of

GOOD = "<think> Zola wrote it. </think> <answer> \\boxed{Émile Zola} </answer>"
WRONG = "<think> guess </think> <answer> \\boxed{Victor Hugo} </answer>"
SR1 = "<think> a </think> <answer> Paris </answer>"


def test_ground_truth_forms() -> None:
    assert golden_answers_of("Paris") == ["Paris"]
    assert golden_answers_of(["Paris", "City of Light"]) == ["Paris", "City of Light"]
    assert golden_answers_of({"target": np.array(["Paris", "paris"], dtype=object)}) == ["Paris", "paris"]
    assert golden_answers_of({"golden_answers": ["a"]}) == ["a"]
    assert golden_answers_of(None) == []


def test_compute_score_contract() -> None:
    out = compute_score("musique", GOOD, {"target": ["Emile Zola", "Émile Zola"]})
    assert out == {"score": 1.0, "f1": 1.0, "em": 1.0, "format_ok": 1.0}
    assert all(isinstance(v, float) for v in out.values())  # numeric: verl aggregates reward_extra_info
    assert compute_score("musique", WRONG, ["Émile Zola"])["score"] == pytest.approx(0.1)
    # extra_info carries the scheme and the EOS flag; it wins over reward_kwargs
    assert compute_score("nq", SR1, "Paris", {"scheme": "search_r1_em"}, scheme="research")["score"] == 1.0
    assert compute_score("nq", SR1, "Paris", scheme="search_r1_em")["score"] == 1.0
    assert compute_score("musique", GOOD, ["Émile Zola"], {"ended_with_eos": False})["score"] == 0.0
    # with an EOS text the response is checked for it (ReSearch style), then it is stripped
    assert compute_score("m", GOOD + "<|im_end|>", ["Émile Zola"], eos_token="<|im_end|>")["score"] == 1.0
    assert compute_score("m", GOOD, ["Émile Zola"], eos_token="<|im_end|>")["score"] == 0.0
    with pytest.raises(InvalidRequest):
        compute_score("m", GOOD, {"target": []})
    with pytest.raises(InvalidRequest):
        compute_score("m", GOOD, "x", {"scheme": "bogus"})


@pytest.fixture(scope="module")
def tokenizer(policy_path: str):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(policy_path)


@pytest.mark.parametrize("how", ["pkg", "file"])
def test_through_verl_naive_reward_manager(tokenizer, how: str) -> None:  # type: ignore[no-untyped-def]
    torch = pytest.importorskip("torch")
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.workers.reward_manager.naive import NaiveRewardManager

    path = "pkg://searchrl.reward.verl_reward" if how == "pkg" else str(Path(verl_reward.__file__).resolve())
    cfg = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": path,
                    "name": "compute_score",
                    "reward_kwargs": {"scheme": "research"},
                }
            }
        }
    )
    fn = get_custom_reward_fn(cfg)
    assert fn is not None

    prompts = ["Who wrote Germinal?", "Who wrote Germinal?", "Capital of France?"]
    responses = [GOOD + tokenizer.eos_token, WRONG + tokenizer.eos_token, SR1 + tokenizer.eos_token]
    ground_truths = [{"target": np.array(["Émile Zola"], dtype=object)}] * 2 + [
        {"target": np.array(["Paris"], dtype=object)}
    ]
    extra = [{}, {}, {"scheme": "search_r1_structured"}]
    p_len, r_len = 16, 48
    p_ids = torch.full((3, p_len), tokenizer.pad_token_id or 0, dtype=torch.long)
    r_ids = torch.full((3, r_len), tokenizer.pad_token_id or 0, dtype=torch.long)
    mask = torch.zeros((3, p_len + r_len), dtype=torch.long)
    resp_lens = []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        pi = tokenizer(p, add_special_tokens=False)["input_ids"][:p_len]
        ri = tokenizer(r, add_special_tokens=False)["input_ids"][:r_len]
        p_ids[i, p_len - len(pi) :] = torch.tensor(pi)  # prompts are left-padded
        r_ids[i, : len(ri)] = torch.tensor(ri)
        mask[i, p_len - len(pi) : p_len + len(ri)] = 1
        resp_lens.append(len(ri))
    data = DataProto.from_dict(
        tensors={"prompts": p_ids, "responses": r_ids, "attention_mask": mask},
        non_tensors={
            "data_source": np.array(["musique", "musique", "nq"], dtype=object),
            "reward_model": np.array([{"ground_truth": gt, "style": "rule"} for gt in ground_truths], dtype=object),
            "extra_info": np.array(extra, dtype=object),
        },
    )
    manager = NaiveRewardManager(tokenizer=tokenizer, num_examine=0, compute_score=fn)
    out = manager(data, return_dict=True)
    rewards = out["reward_tensor"]
    # verl puts the scalar on the last valid response token
    for i, expected in enumerate([1.0, 0.1, 1.0]):
        assert rewards[i, resp_lens[i] - 1].item() == pytest.approx(expected)
        assert rewards[i].sum().item() == pytest.approx(expected)
    info = out["reward_extra_info"]
    assert info["f1"] == [1.0, 0.0, 1.0]
    assert info["format_ok"] == [1.0, 1.0, 1.0]
