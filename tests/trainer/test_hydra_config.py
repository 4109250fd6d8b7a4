"""The verl Hydra configs of the cluster path compose against verl 0.9.1's own config directory, set only keys that
exist in verl's schema (a typo fails here, not on the cluster), pass verl's validation, and name plug-ins that load."""

from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("verl")
pytest.importorskip("hydra")

from hydra import compose, initialize_config_dir, initialize_config_module  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "trainer" / "searchrl" / "trainer" / "config"
PRIMARY = ("research_grpo", "zerosearch_grpo")
OURS = ("searchrl_common", *PRIMARY)
_MISSING = object()
# Keys verl's code reads although its YAML does not declare them (checked against verl's source below).
DECLARED_IN_CODE = {"reward.custom_reward_function.reward_kwargs"}


@functools.cache
def _composed(name: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name=name)


def _compose(name: str) -> DictConfig:
    """A private copy of the composed config (tests resolve it in place)."""
    return copy.deepcopy(_composed(name))


@pytest.fixture(autouse=True)
def _config_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    """The presets' ``${oc.env:SEARCHRL_CONFIG_DIR,/app/trainer/config}`` paths point at this checkout, as the RayJob
    entrypoint points them at the installed package (tests/trainer/test_rayjob_presets.py checks that path)."""
    monkeypatch.setenv("SEARCHRL_CONFIG_DIR", str(CONFIG_DIR))


@pytest.fixture(scope="module")
def verl_base() -> DictConfig:
    """verl's own ppo_trainer config, untouched."""
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer")


def _leaf_keys(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict) and tree:
        out: list[str] = []
        for k, v in tree.items():
            out += _leaf_keys(v, f"{prefix}{k}.")
        return out
    return [prefix[:-1]]


def _unknown_keys(raw: dict[str, Any], base: DictConfig) -> list[str]:
    """Keys of ``raw`` (our YAML, minus hydra/defaults) that verl's schema lacks."""
    body = {k: v for k, v in raw.items() if k not in ("hydra", "defaults")}
    bad: list[str] = []
    for key in _leaf_keys(body) if body else []:
        if any(key == d or key.startswith(d + ".") for d in DECLARED_IN_CODE):
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(base, parent_key, default=_MISSING) if parent_key else base
        if not isinstance(parent, DictConfig) or leaf not in parent.keys():  # keys(): '???' values count too
            bad.append(key)
    return bad


@pytest.mark.parametrize("name", OURS)
def test_every_key_exists_in_verl_schema(name: str, verl_base: DictConfig) -> None:
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    assert _unknown_keys(raw, verl_base) == []


def test_the_key_check_catches_a_typo(verl_base: DictConfig) -> None:
    raw = {
        "actor_rollout_ref": {"actor": {"kl_los_coef": 0.001, "kl_loss_coef": 0.001}},
        "algorithm": {"adv_estimatr": "grpo"},
    }
    assert _unknown_keys(raw, verl_base) == ["actor_rollout_ref.actor.kl_los_coef", "algorithm.adv_estimatr"]


def test_keys_declared_only_in_verl_code_are_read_there() -> None:
    from verl.trainer.ppo.reward import get_custom_reward_fn

    assert "reward_kwargs" in inspect.getsource(get_custom_reward_fn)


@pytest.mark.parametrize("name", PRIMARY)
def test_grpo_settings(name: str) -> None:
    cfg = _compose(name)
    arr = cfg.actor_rollout_ref
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.algorithm.norm_adv_by_std_in_grpo is True
    assert arr.rollout.n == 5
    assert arr.rollout.name == "vllm"  # the trainer image's verl[vllm,fsdp] (verl[sglang] does not resolve)
    assert arr.rollout.skip_tokenizer_init is False  # our stop strings need the server's tokenizer
    assert arr.actor.use_kl_loss is True
    assert arr.actor.kl_loss_coef == 0.001
    assert arr.actor.kl_loss_type == "low_var_kl"
    assert arr.actor.loss_agg_mode == "token-mean"
    assert arr.actor.clip_ratio == 0.2
    assert arr.rollout.multi_turn.enable is True
    assert arr.rollout.agent.default_agent_loop == "searchrl_research"
    assert "mlflow" in cfg.trainer.logger
    assert cfg.reward.custom_reward_function.name == "compute_score"


def test_zerosearch_differs_where_it_should() -> None:
    research, zero = _compose("research_grpo"), _compose("zerosearch_grpo")
    assert zero.reward.custom_reward_function.reward_kwargs.scheme == "zerosearch_f1"
    assert "reward_kwargs" not in research.reward.custom_reward_function
    assert zero.actor_rollout_ref.rollout.multi_turn.max_assistant_turns == 5
    assert (
        zero.actor_rollout_ref.rollout.multi_turn.tool_config_path
        != research.actor_rollout_ref.rollout.multi_turn.tool_config_path
    )
    tools = OmegaConf.load(REPO / zero.actor_rollout_ref.rollout.multi_turn.tool_config_path)
    assert tools.tools[0].config.backend == "simulator"
    loops = OmegaConf.load(REPO / zero.actor_rollout_ref.rollout.agent.agent_loop_config_path)
    assert [(e.name, e.protocol) for e in loops] == [("searchrl_research", "search_r1")]


@pytest.mark.parametrize("name", PRIMARY)
def test_verl_validates_the_composed_config(name: str) -> None:
    """verl's own checks: config validation and the typed dataclasses its workers build from these sections."""
    from verl.trainer.config import AlgoConfig
    from verl.utils.config import omega_conf_to_dataclass, validate_config
    from verl.workers.config import ActorConfig, RolloutConfig

    cfg = _compose(name)
    OmegaConf.resolve(cfg)
    validate_config(cfg, use_reference_policy=True, use_critic=False)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert isinstance(actor, ActorConfig) and actor.use_kl_loss and actor.rollout_n == 5
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert isinstance(rollout, RolloutConfig) and rollout.multi_turn.enable
    algo = omega_conf_to_dataclass(cfg.algorithm)
    assert isinstance(algo, AlgoConfig) and algo.adv_estimator == "grpo"


@pytest.mark.parametrize("name", PRIMARY)
def test_reward_function_loads_and_scores(name: str) -> None:
    from verl.utils.import_utils import load_extern_object

    crf = _compose(name).reward.custom_reward_function
    fn = load_extern_object(crf.path, crf.name)
    kwargs = dict(crf.get("reward_kwargs") or {})
    if kwargs.get("scheme") == "zerosearch_f1":  # Search-R1 / ZeroSearch answers: the text of the last <answer>
        good = "<think> I know it. </think>\n<answer> Paris </answer>"
    else:  # ReSearch: think tags, one answer block, the answer boxed
        good = "<think> I know it. </think>\n<answer> The answer is \\boxed{Paris} </answer>"
    out = fn(data_source="fanoutqa_sub", solution_str=good, ground_truth={"target": ["Paris"]}, extra_info={}, **kwargs)
    assert out["score"] == pytest.approx(1.0)


@pytest.mark.parametrize("name", PRIMARY)
def test_referenced_plugin_files_exist_and_load(name: str) -> None:
    """The tool config and the agent-loop config the Hydra file names are in the repo and import."""
    cfg = _compose(name)
    rollout = cfg.actor_rollout_ref.rollout
    tool_path = REPO / rollout.multi_turn.tool_config_path
    loops_path = REPO / rollout.agent.agent_loop_config_path
    assert tool_path.is_file(), f"missing tool config {tool_path}"
    assert loops_path.is_file(), f"missing agent-loop config {loops_path}"
    loops = OmegaConf.load(loops_path)
    names = {entry.name: entry._target_ for entry in loops}
    assert rollout.agent.default_agent_loop in names
    from verl.utils.import_utils import load_class_from_fqn

    load_class_from_fqn(names[rollout.agent.default_agent_loop], "agent loop")
    tools = OmegaConf.load(tool_path)
    for tool in tools.tools:
        load_class_from_fqn(tool.class_name, "tool")
