"""`searchrl data prepare`: FlashRAG / FanOutQA / bundled benchmarks -> verl RL parquet that verl's RLHFDataset reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from searchrl.errors import InvalidRequest
from searchrl.trainer import data


def test_fanoutqa_keeps_only_scalar_answers() -> None:
    from searchrl.assets import fanoutqa_dev_path

    raw = json.loads(fanoutqa_dev_path().read_text())
    scalar_top = [q for q in raw if not isinstance(q["answer"], (list, dict))]
    top = data.load_source("fanoutqa")
    assert len(top) == len(scalar_top) > 0
    assert {e.id for e in top} == {q["id"] for q in scalar_top}
    subs = data.load_source("fanoutqa-sub")
    assert len(subs) > 1000
    by_id = {}

    def walk(items: list[dict]) -> None:
        for it in items:
            by_id[it["id"]] = it
            walk(it.get("decomposition") or [])

    for q in raw:
        walk(q["decomposition"])
    for ex in subs:
        answer = by_id[ex.id]["answer"]
        assert not isinstance(answer, (list, dict))
        expected = ("yes" if answer else "no") if isinstance(answer, bool) else str(answer)
        assert ex.golden_answers == (expected,)
        assert ex.source == "fanoutqa_sub"


def test_sources_and_dedup(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    rows = [
        {"id": "a", "question": "Who wrote Hamlet?", "golden_answers": ["Shakespeare"], "metadata": {}},
        {
            "id": "b",
            "question": "who wrote  hamlet?",
            "golden_answers": ["W. Shakespeare"],
            "metadata": {},
        },  # duplicate
        {"id": "c", "question": "Capital of France?", "golden_answers": ["Paris"], "metadata": {}},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = data.load_examples([f"custom={f}", "bench:bamboogle"], limit=10)
    assert [e.id for e in got[:2]] == ["a", "c"]
    assert got[0].source == "custom" and got[2].source == "bamboogle"
    assert len(got) == 10
    with pytest.raises(InvalidRequest):
        data.load_examples(["bench:no_such_benchmark"])
    with pytest.raises(InvalidRequest):
        data.load_examples([])


def test_split_is_seeded() -> None:
    exs = data.load_source("bench:bamboogle")
    a_train, a_val = data.split_examples(exs, val_size=10, seed=1)
    b_train, b_val = data.split_examples(exs, val_size=10, seed=1)
    c_train, c_val = data.split_examples(exs, val_size=10, seed=2)
    assert [e.id for e in a_val] == [e.id for e in b_val] and len(a_val) == 10
    assert [e.id for e in a_val] != [e.id for e in c_val]
    assert {e.id for e in a_train} | {e.id for e in a_val} == {e.id for e in exs}
    assert not {e.id for e in a_train} & {e.id for e in a_val}
    _, val = data.split_examples(exs, val_fraction=0.25, seed=0)
    assert len(val) == 25
    with pytest.raises(InvalidRequest):
        data.split_examples(exs[:3], val_size=3)


def test_prepare_writes_verl_parquet_that_rlhf_dataset_reads(tmp_path: Path, policy_path: str) -> None:
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    res = data.prepare(["fanoutqa-sub", "bench:musique/train"], tmp_path / "out", limit=60, val_size=12, seed=5)
    assert (res.train_rows, res.val_rows) == (48, 12)
    manifest = json.loads(res.manifest_path.read_text())
    assert manifest["by_source"] == {"fanoutqa_sub": 60}  # the limit is reached inside the first source

    tok = AutoTokenizer.from_pretrained(policy_path)
    cfg = OmegaConf.create(
        {"prompt_key": "prompt", "max_prompt_length": 1024, "filter_overlong_prompts": True, "return_raw_chat": True,
         "cache_dir": str(tmp_path / "cache"), "filter_overlong_prompts_workers": 1}
    )  # fmt: skip
    ds = RLHFDataset(str(res.train_path), tok, cfg)
    assert len(ds) == 48  # no prompt was filtered as over-long
    item = ds[0]
    assert item["data_source"] == "fanoutqa_sub"
    assert item["agent_name"] == data.AGENT_NAME
    assert item["raw_prompt"][0]["role"] == "system" and item["raw_prompt"][1]["role"] == "user"
    assert item["reward_model"]["style"] == "rule"
    extra = item["extra_info"]
    assert extra["split"] == "train" and item["index"] == extra["index"]
    assert list(item["reward_model"]["ground_truth"]["target"]) == list(extra["golden_answers"])
    assert extra["question"] in item["raw_prompt"][1]["content"]
    assert "scheme" not in extra  # only written when asked for
    batch = collate_fn([ds[i] for i in range(4)])
    assert len(batch["raw_prompt"]) == 4
    # The chat-templated prompt is the one our agent loop renders for the same question.
    from searchrl.agent.prompts import render_prompt

    rendered = tok.apply_chat_template(item["raw_prompt"], tokenize=False, add_generation_prompt=True)
    assert rendered == render_prompt(tok, extra["question"]).text

    # The local trainer reads the same file back.
    back = data.read_parquet_examples(res.train_path)
    assert len(back) == 48 and back[0].question == extra["question"]


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = data.main(["prepare", "--source", "bench:bamboogle", "--limit", "20", "--val-size", "5", "--scheme", "research",
                    "--out", str(tmp_path / "b")])  # fmt: skip
    assert rc == 0
    assert "15 rows" in capsys.readouterr().out
    import pyarrow.parquet as pq

    rows = pq.read_table(tmp_path / "b" / "val.parquet").to_pylist()
    assert len(rows) == 5 and rows[0]["extra_info"]["scheme"] == "research"
    assert data.main(["prepare", "--source", "bench:nope", "--out", str(tmp_path / "c")]) == 2
