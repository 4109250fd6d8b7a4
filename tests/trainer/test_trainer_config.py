"""The trainer's typed config, its example files, and the guard rails."""

from __future__ import annotations

from pathlib import Path

import pytest

from searchrl.errors import InvalidRequest
from searchrl.trainer.config import TrainConfig, describe_fields, load_config
from searchrl.trainer.guards import Guards

CONFIG_DIR = Path(__file__).resolve().parents[2] / "trainer" / "searchrl" / "trainer" / "configs"


def test_defaults_follow_the_anchors() -> None:
    cfg = TrainConfig()
    assert cfg.algorithm.kl_coef == 0.001
    assert cfg.algorithm.kl_type == "low_var_kl"
    assert cfg.algorithm.clip_ratio == 0.2
    assert cfg.algorithm.loss_agg_mode == "token-mean"
    assert cfg.algorithm.lr == 1e-6
    assert cfg.algorithm.ppo_epochs == 1
    assert cfg.data.group_size == 5


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.data.batch_size >= 1
    # Round trip: the dumped YAML loads to the same config.
    dumped = path.parent / "does-not-exist.yaml"
    assert not dumped.exists()
    again = TrainConfig.model_validate(__import__("yaml").safe_load(cfg.to_yaml()))
    assert again == cfg


def test_example_configs_exist() -> None:
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"local_demo.yaml", "research_cpu.yaml", "zerosearch_cpu.yaml"} <= names


def test_overrides_are_parsed_as_yaml(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_size: 3\nalgorithm:\n  lr: 1.0e-6\n")
    cfg = load_config(
        f, ["algorithm.lr=2e-5", "data.train=[bench:bamboogle, fanoutqa]", "rollout.search.backend=simulator"]
    )
    assert cfg.algorithm.lr == pytest.approx(2e-5)
    assert cfg.data.train == ["bench:bamboogle", "fanoutqa"]
    assert cfg.data.batch_size == 3
    assert cfg.rollout.search.backend == "simulator"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("algorithm.lrr=1", "algorithm.lrr"),  # a typo is an error, not a silent default
        ("algorithm.clip_ratio=-1", "algorithm.clip_ratio"),
        ("rollout.search.backend=google", "rollout.search.backend"),
        ("model.dtype=float16", "model.dtype"),
        ("data.group_size=0", "data.group_size"),
        ("guards.action=panic", "guards.action"),
    ],
)
def test_bad_values_name_the_field(override: str, needle: str) -> None:
    with pytest.raises(InvalidRequest) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(InvalidRequest, match="mapping"):
        load_config(f)
    with pytest.raises(InvalidRequest, match="key.sub=value"):
        load_config(None, ["no-equals-sign"])


def test_mini_batches_cannot_exceed_episodes() -> None:
    with pytest.raises(InvalidRequest, match="mini_batches"):
        load_config(None, ["data.batch_size=1", "data.group_size=2", "algorithm.mini_batches=3"])


def test_every_field_is_documented() -> None:
    fields = list(describe_fields())
    assert len(fields) > 50
    undocumented = [name for name, _default, desc in fields if not desc.strip()]
    assert undocumented == []


def test_derived_paths(tmp_path: Path) -> None:
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}/run", "trainer.max_steps=7"])
    assert cfg.checkpoint_path == tmp_path / "run" / "checkpoints"
    assert cfg.tracking_uri == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    assert cfg.curriculum_total_steps == 7


# ------------------------------------------------------------------------------------------------ guards


def _guards(*overrides: str) -> Guards:
    return Guards(load_config(None, list(overrides)).guards)


def test_reward_collapse_guard() -> None:
    g = _guards("guards.reward_collapse.drop=0.3", "guards.reward_collapse.window=3", "guards.action=stop")
    assert g.update(1, reward_mean=0.5, searches_per_episode=1, kl=0.0) == []
    assert g.update(2, reward_mean=0.6, searches_per_episode=1, kl=0.0) == []
    assert g.update(3, reward_mean=0.35, searches_per_episode=1, kl=0.0) == []  # drop 0.25 < 0.3
    ev = g.update(4, reward_mean=0.2, searches_per_episode=1, kl=0.0)  # 0.6 - 0.2 = 0.4 > 0.3
    assert [(e.guard, e.step, e.action) for e in ev] == [("reward_collapse", 4, "stop")]
    assert g.tripped["reward_collapse"]
    # The window forgets the old max: 3 steps later the maximum is 0.35, so 0.2 is no longer a collapse.
    g.update(5, reward_mean=0.2, searches_per_episode=1, kl=0.0)
    ev = g.update(6, reward_mean=0.2, searches_per_episode=1, kl=0.0)
    assert ev == [] and not g.tripped["reward_collapse"]


def test_no_search_guard_and_per_guard_action() -> None:
    g = _guards("guards.no_search.steps=3", "guards.no_search.action=stop", "guards.action=warn")
    assert g.update(1, reward_mean=0, searches_per_episode=0, kl=0) == []
    assert g.update(2, reward_mean=0, searches_per_episode=0, kl=0) == []
    ev = g.update(3, reward_mean=0, searches_per_episode=0, kl=0)
    assert [(e.guard, e.action) for e in ev] == [("no_search", "stop")]
    assert g.update(4, reward_mean=0, searches_per_episode=0.5, kl=0) == []  # a search resets the streak


def test_kl_explosion_guard_and_state_round_trip() -> None:
    g = _guards("guards.kl_explosion.max_kl=0.5", "guards.no_search.enabled=false")
    assert g.update(1, reward_mean=0, searches_per_episode=0, kl=0.4) == []
    ev = g.update(2, reward_mean=0, searches_per_episode=0, kl=0.9)
    assert [(e.guard, e.action) for e in ev] == [("kl_explosion", "warn")]
    g2 = _guards("guards.kl_explosion.max_kl=0.5", "guards.no_search.enabled=false")
    g2.load_state_dict(g.state_dict())
    assert g2.state_dict() == g.state_dict()


def test_search_failure_guard_stops_by_default_and_ignores_small_samples() -> None:
    g = _guards("guards.search_failure.max_ratio=0.2", "guards.search_failure.min_searches=5")
    assert g.update(1, reward_mean=0, searches_per_episode=1, kl=0, searches=10, failed_searches=2) == []  # 20%
    assert g.update(2, reward_mean=0, searches_per_episode=1, kl=0, searches=4, failed_searches=4) == []  # < 5 seen
    ev = g.update(3, reward_mean=0, searches_per_episode=1, kl=0, searches=10, failed_searches=3)
    assert [(e.guard, e.action) for e in ev] == [("search_failure", "stop")]  # stops although guards.action=warn
    assert "3 of 10 searches failed" in ev[0].message and g.tripped["search_failure"]


def test_search_failure_window_raises_past_the_ratio() -> None:
    from searchrl.trainer.guards import SearchFailuresExceeded, SearchFailureWindow

    w = SearchFailureWindow.from_env(
        {"SEARCHRL_MAX_SEARCH_FAILURE_RATIO": "0.25", "SEARCHRL_SEARCH_FAILURE_WINDOW": "8"}
    )
    w.record([False] * 6 + [True])  # 7 searches: below the window, no verdict
    w.record([True])  # 2 of 8 = 25%: at the limit
    with pytest.raises(SearchFailuresExceeded, match="3 of the last 8 searches failed"):
        w.record([True])  # the oldest success leaves the window: 3 of 8
    assert w.searches == 9 and w.failures == 3
    with pytest.raises(InvalidRequest):
        SearchFailureWindow.from_env({"SEARCHRL_MAX_SEARCH_FAILURE_RATIO": "1.5"})


def test_disabled_guards_never_trip() -> None:
    g = _guards(
        "guards.reward_collapse.enabled=false",
        "guards.no_search.enabled=false",
        "guards.kl_explosion.enabled=false",
        "guards.search_failure.enabled=false",
    )
    for step, r in enumerate([1.0, 0.0, 0.0, 0.0, 0.0, 0.0], start=1):
        assert g.update(step, reward_mean=r, searches_per_episode=0, kl=100.0, searches=50, failed_searches=50) == []
