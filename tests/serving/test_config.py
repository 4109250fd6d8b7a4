"""Service configuration: flag > env > default precedence, per-service env names, typed parsing, bool forms, secrets
kept out of logs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import yaml

from searchrl import stack
from searchrl.retriever.server import RetrieverConfig
from searchrl.services.policy.server import PolicyConfig
from searchrl.services.reward.server import RewardConfig
from searchrl.serving import config as cfgmod
from searchrl.serving.runtime import ServerConfig, run_service
from searchrl.simulator.server import SimulatorConfig
from searchrl.trainer.config import RolloutConfig, SearchConfig


def parse(argv: list[str], environ: dict[str, str]) -> RewardConfig:
    return cfgmod.from_sources(RewardConfig, argv, environ)


def test_names() -> None:
    assert cfgmod.flag_name("max_batch_size") == "--max-batch-size"
    assert cfgmod.env_name(RewardConfig, "max_batch_size") == "SEARCHRL_REWARD_MAX_BATCH_SIZE"
    assert cfgmod.env_name(RewardConfig, "grpc_port") == "SEARCHRL_GRPC_PORT"  # shared by every server


def test_defaults_of_the_reward_service() -> None:
    cfg = parse([], {})
    assert (cfg.grpc_port, cfg.metrics_port, cfg.max_batch_size, cfg.max_response_chars) == (50051, 9091, 8192, 65536)
    assert cfg.host == "127.0.0.1"  # loopback unless told otherwise


def test_one_table_of_default_ports() -> None:
    """The servers' configs, ``searchrl up --fixed-ports``, the trainer's targets, the Dockerfiles and the chart all
    use :data:`~searchrl.serving.config.DEFAULT_PORTS`."""
    root = Path(__file__).resolve().parents[2]
    values = yaml.safe_load((root / "deploy/helm/searchrl/values.yaml").read_text())
    configs = {
        "reward": RewardConfig,
        "retriever": RetrieverConfig,
        "simulator": SimulatorConfig,
        "policy": PolicyConfig,
    }
    targets = {
        "retriever": SearchConfig.model_fields["retriever_target"].default,
        "simulator": SearchConfig.model_fields["simulator_target"].default,
        "policy": RolloutConfig.model_fields["policy_target"].default,
    }
    assert set(cfgmod.DEFAULT_PORTS) == set(configs) == set(stack.SERVICE_ORDER)
    assert stack.DEFAULT_PORTS is cfgmod.DEFAULT_PORTS
    for name, (grpc_port, metrics_port) in cfgmod.DEFAULT_PORTS.items():
        cfg = configs[name]()
        assert (cfg.grpc_port, cfg.metrics_port) == (grpc_port, metrics_port), name
        assert (values[name]["service"]["grpcPort"], values[name]["service"]["metricsPort"]) == (
            grpc_port,
            metrics_port,
        )
        assert targets.get(name, f"127.0.0.1:{grpc_port}") == f"127.0.0.1:{grpc_port}", name
        dockerfiles = sorted((root / "deploy/docker").glob(f"{name}*Dockerfile"))
        assert dockerfiles, name
        for path in dockerfiles:
            text = path.read_text()
            assert re.findall(r"SEARCHRL_GRPC_PORT=(\d+)", text) == [str(grpc_port)], path.name
            assert re.findall(r"SEARCHRL_METRICS_PORT=(\d+)", text) == [str(metrics_port)], path.name
            assert re.search(rf"^EXPOSE {grpc_port} {metrics_port}\b", text, re.M), path.name


def test_flag_beats_env_beats_default() -> None:
    env = {"SEARCHRL_REWARD_MAX_BATCH_SIZE": "100", "SEARCHRL_GRPC_PORT": "6000", "SEARCHRL_GRACE_S": "2.5"}
    cfg = parse(["--max-batch-size", "7"], env)
    assert cfg.max_batch_size == 7  # flag
    assert cfg.grpc_port == 6000  # env
    assert cfg.grace_s == 2.5 and isinstance(cfg.grace_s, float)
    assert cfg.max_response_chars == 65536  # default
    # only SEARCHRL_-prefixed variables count (Kubernetes injects REWARD_PORT-style service links)
    assert parse([], {"GRPC_PORT": "1", "REWARD_PORT": "tcp://10.0.0.1:50051"}).grpc_port == 50051
    # a sibling's variable (the policy's rows-per-decode) does not reach the reward server
    assert parse([], {"SEARCHRL_POLICY_MAX_BATCH_SIZE": "16"}).max_batch_size == 8192


@pytest.mark.parametrize(
    ("raw", "value"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), ("on", True), (" On ", True)]
    + [("0", False), ("false", False), ("No", False), ("off", False)],
)
def test_bool_forms(raw: str, value: bool) -> None:
    assert cfgmod.from_sources(RetrieverConfig, [], {"SEARCHRL_RETRIEVER_USE_GPU": raw}).use_gpu is value
    assert cfgmod.from_sources(RetrieverConfig, ["--use-gpu", raw], {}).use_gpu is value


def test_bool_field_from_env_and_bad_values_name_their_source() -> None:
    class Cfg(ServerConfig):
        verbose: bool = cfgmod.field(False, help="chatty")
        tags: list[str] = cfgmod.field(default_factory=list, help="tags")

    assert cfgmod.from_sources(Cfg, [], {"SEARCHRL_CFG_VERBOSE": "yes"}).verbose is True
    assert cfgmod.from_sources(Cfg, ["--verbose", "off"], {"SEARCHRL_CFG_VERBOSE": "yes"}).verbose is False
    assert cfgmod.from_sources(Cfg, [], {"SEARCHRL_CFG_TAGS": "a, b,,c"}).tags == ["a", " b", "c"]
    assert cfgmod.from_sources(Cfg, ["--tags", "a,b"], {}).tags == ["a", "b"]
    with pytest.raises(ValueError, match="SEARCHRL_CFG_VERBOSE: Input should be a valid boolean"):
        cfgmod.from_sources(Cfg, [], {"SEARCHRL_CFG_VERBOSE": "maybe"})
    with pytest.raises(ValueError, match="--grpc-port"):
        cfgmod.from_sources(Cfg, ["--grpc-port", "eighty"], {})


def test_secrets_are_redacted_and_not_shown_as_flag_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse(["--auth-token", "hunter2"], {"SEARCHRL_REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert cfg.auth_token == "hunter2"
    shown = cfgmod.redacted(cfg)
    assert shown["auth_token"] == "***" and "hunter2" not in repr(shown)
    assert shown["redis_url"] == "redis://127.0.0.1:6379/0"
    assert cfgmod.redacted(parse([], {}))["auth_token"] == ""  # unset stays visibly unset
    parser = cfgmod.parser_for(RewardConfig)
    cfgmod.from_sources(RewardConfig, [], {}, parser=parser)
    help_text = parser.format_help()
    assert "SEARCHRL_AUTH_TOKEN" in help_text and "--max-response-chars" in help_text
    assert "SEARCHRL_REWARD_MAX_RESPONSE_CHARS" in help_text


def test_run_service_never_logs_the_token(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    async def failing_build(config: RewardConfig) -> tuple[list[object], None]:
        raise ValueError("stop here")

    monkeypatch.setenv("SEARCHRL_AUTH_TOKEN", "hunter2")
    with caplog.at_level(logging.INFO, logger="searchrl.runtime"):
        code = run_service(RewardConfig, "reward", failing_build, ["--grpc-port", "0", "--metrics-port", "-1"])  # type: ignore[arg-type]
    assert code == 2
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "starting reward" in text and "'auth_token': '***'" in text and "hunter2" not in text
    with pytest.raises(SystemExit):
        run_service(RewardConfig, "reward", failing_build, ["--max-batch-size", "lots"])  # type: ignore[arg-type]
