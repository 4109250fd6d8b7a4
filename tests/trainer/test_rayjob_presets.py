"""The RayJob presets composed exactly as the RayJob runs them, from another working directory.

The manifests in ``deploy/k8s/*/rayjob.yaml`` run ``python3 -m searchrl.trainer.rayjob_entrypoint --config-name=...
[overrides]`` in a pod whose working directory is the image's WORKDIR, and verl resolves the tool and agent-loop
config paths in every AgentLoopWorker against that worker's own working directory (``resolve_config_path``). These
tests compose each preset with the manifest's own arguments in a subprocess started in an empty temporary directory
and check what our agent loop depends on: absolute config paths that verl's resolver finds from there, a rollout
server that keeps its tokenizer (our stop strings need it), the async multi-turn mode, and the limits that apply.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("verl")

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = {
    "research": REPO / "deploy" / "k8s" / "research" / "rayjob.yaml",
    "zerosearch": REPO / "deploy" / "k8s" / "zerosearch" / "rayjob.yaml",
}

# Runs in the child: for each job, compose + check as the entrypoint does, then resolve the paths with verl's own
# resolver (from the child's working directory). A job's "env" is applied before it composes.
PROBE = r"""
import json, os, sys
from searchrl.trainer import rayjob_entrypoint as ep
from verl.utils.import_utils import resolve_config_path
results = []
for job in json.loads(sys.argv[1]):
    os.environ.pop("SEARCHRL_CONFIG_DIR", None)
    os.environ.update(job.get("env", {}))
    cfg = ep.compose(job["name"], job["overrides"])
    problems = ep.check(cfg, require_data=False)
    r = cfg.actor_rollout_ref.rollout
    paths = [r.multi_turn.tool_config_path, r.agent.agent_loop_config_path]
    resolved = []
    for p in paths:
        try:
            resolved.append(resolve_config_path(p))
        except FileNotFoundError:
            resolved.append(None)
    results.append({
        "cwd": os.getcwd(), "problems": problems,
        "name": r.name, "mode": r.mode, "skip_tokenizer_init": r.skip_tokenizer_init,
        "multi_turn": bool(r.multi_turn.enable),
        "tool_config_path": paths[0], "agent_loop_config_path": paths[1], "resolved": resolved,
        "max_tool_response_length": r.multi_turn.max_tool_response_length,
        "tool_response_truncate_side": r.multi_turn.tool_response_truncate_side,
        "prompt_length": r.prompt_length, "response_length": r.response_length,
        "default_agent_loop": r.agent.default_agent_loop,
    })
print("PROBE " + json.dumps(results))
"""


def entrypoint_args(manifest: Path) -> tuple[str, list[str]]:
    """``(config name, Hydra overrides)`` of a RayJob manifest's entrypoint (which must be our pre-flight one)."""
    doc = yaml.safe_load(manifest.read_text())
    words = shlex.split(doc["spec"]["entrypoint"])
    i = words.index("-m")
    assert words[i + 1] == "searchrl.trainer.rayjob_entrypoint", (
        f"{manifest} must run the pre-flight entrypoint, not {words[i + 1]}"
    )
    rest = words[i + 2 :]
    name = next(w.split("=", 1)[1] for w in rest if w.startswith("--config-name="))
    return name, [w for w in rest if not w.startswith("--")]


def probe(jobs: list[dict[str, Any]], cwd: Path) -> list[dict[str, Any]]:
    """Composes each job (``name``, ``overrides``, optional ``env``) in one child process started in ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k != "SEARCHRL_CONFIG_DIR"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(jobs)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE "))
    out: list[dict[str, Any]] = json.loads(line[len("PROBE ") :])
    return out


RELATIVE_TOOLS = (
    "actor_rollout_ref.rollout.multi_turn.tool_config_path=trainer/searchrl/trainer/config/tools/searchrl_search.yaml"
)
SGLANG_NO_TOKENIZER = ["actor_rollout_ref.rollout.name=sglang", "actor_rollout_ref.rollout.skip_tokenizer_init=true"]


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every manifest's composition, plus two broken variants and a SEARCHRL_CONFIG_DIR one, from an empty cwd."""
    jobs: dict[str, dict[str, Any]] = {}
    for preset, manifest in MANIFESTS.items():
        name, overrides = entrypoint_args(manifest)
        jobs[preset] = {"name": name, "overrides": overrides}
    research = jobs["research"]
    jobs["relative"] = {**research, "overrides": [*research["overrides"], RELATIVE_TOOLS, *SGLANG_NO_TOKENIZER]}
    jobs["config_dir"] = {"name": "research_grpo", "overrides": [], "env": {"SEARCHRL_CONFIG_DIR": "/opt/elsewhere"}}
    cwd = tmp_path_factory.mktemp("worker-cwd")  # like a Ray worker's working directory: nothing of ours in it
    return dict(zip(jobs, probe(list(jobs.values()), cwd), strict=True))


@pytest.fixture(params=sorted(MANIFESTS))
def composed(request: pytest.FixtureRequest, probed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return probed[request.param]


def test_config_paths_are_absolute_and_resolve_from_another_directory(composed: dict[str, Any]) -> None:
    assert composed["problems"] == []
    assert not (REPO / "trainer").is_relative_to(Path(composed["cwd"]))
    for key in ("tool_config_path", "agent_loop_config_path"):
        assert os.path.isabs(composed[key]), f"{key}={composed[key]} is relative: verl resolves it per worker cwd"
    for path in composed["resolved"]:
        assert Path(path).is_file(), path


def test_rollout_settings_the_agent_loop_needs(composed: dict[str, Any]) -> None:
    # vLLM rollouts (the trainer image's verl[vllm,fsdp]); the server keeps its tokenizer for our stop strings
    assert composed["name"] == "vllm"
    assert composed["skip_tokenizer_init"] is False
    assert composed["mode"] == "async" and composed["multi_turn"] is True
    assert composed["default_agent_loop"] == "searchrl_research"
    # the tool-response limit is one our loop applies (searchrl_research reads it), in characters
    assert composed["max_tool_response_length"] >= 2000
    assert composed["tool_response_truncate_side"] in ("left", "right", "middle")
    assert composed["prompt_length"] > 0 and composed["response_length"] > 0


def test_the_check_catches_a_relative_path_and_an_sglang_server_without_tokenizer(
    probed: dict[str, dict[str, Any]],
) -> None:
    out = probed["relative"]
    assert out["resolved"][0] is None  # verl's resolver cannot find it from a worker's cwd
    assert any("is relative" in p for p in out["problems"]), out["problems"]
    assert any("skip_tokenizer_init must be false with SGLang" in p for p in out["problems"]), out["problems"]


def test_presets_run_directly_by_verl_name_the_image_paths(
    probed: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python3 -m verl.trainer.main_ppo --config-path=/app/trainer/config`` (no entrypoint) gets absolute paths
    into the image's copy of the configs, and SEARCHRL_CONFIG_DIR moves them."""
    from omegaconf import OmegaConf

    monkeypatch.delenv("SEARCHRL_CONFIG_DIR", raising=False)
    common = OmegaConf.load(REPO / "trainer" / "searchrl" / "trainer" / "config" / "searchrl_common.yaml")
    for name in ("research_grpo", "zerosearch_grpo"):
        merged = OmegaConf.merge(
            common, OmegaConf.load(REPO / "trainer" / "searchrl" / "trainer" / "config" / f"{name}.yaml")
        )
        rollout = merged.actor_rollout_ref.rollout
        assert rollout.multi_turn.tool_config_path.startswith("/app/trainer/config/")
        assert rollout.agent.agent_loop_config_path.startswith("/app/trainer/config/")
    moved = probed["config_dir"]
    assert moved["tool_config_path"] == "/opt/elsewhere/tools/searchrl_search.yaml"
    assert any("not found" in p for p in moved["problems"])  # and the check says so before any GPU is allocated
