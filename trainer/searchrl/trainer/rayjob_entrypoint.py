"""Entry point of the verl RayJob: check the Hydra config, register our plug-ins, then run ``verl.trainer.main_ppo``.

    python3 -m searchrl.trainer.rayjob_entrypoint --config-name=research_grpo [hydra overrides ...]
    python3 -m searchrl.trainer.rayjob_entrypoint --config-name=zerosearch_grpo --check-only

Compared with calling ``python3 -m verl.trainer.main_ppo --config-path=/app/trainer/config ...`` directly, this:

1. points Hydra at this package's ``trainer/searchrl/trainer/config`` (no ``--config-path`` to get wrong), and sets
   ``SEARCHRL_CONFIG_DIR`` to it, so the presets' tool and agent-loop config paths are absolute paths of the
   installed package: verl resolves them in every AgentLoopWorker, whatever that worker's working directory is,
2. composes the config on the driver first and fails within seconds, before Ray starts and GPUs are allocated,
   when a key is not in verl's schema, the data files or plug-in files are missing, or verl's validation rejects it,
3. imports our verl plug-ins (agent loop, search tool) so their ``@register`` runs in the driver as well,
4. runs verl's ``run_ppo`` with verl's own TaskRunner extended by the trainer's metrics exporter (the
   ``searchrl-metrics`` actor on the Ray head serving ``searchrl_train_*`` and ``searchrl_policy_searches_total`` on
   ``SEARCHRL_METRICS_PORT``, 9095), which the chart's PodMonitor, dashboard and alerts read.

Exit status: verl's, or 2 when the check fails.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("searchrl.rayjob")

CONFIG_DIR = Path(__file__).resolve().parent / "config"
PLUGIN_MODULES = ("searchrl.trainer.verl_plugins",)


def compose(config_name: str, overrides: Sequence[str] = ()) -> Any:
    """The fully composed verl config (Hydra, with verl's config directory on the search path).

    ``SEARCHRL_CONFIG_DIR`` defaults to this package's config directory, so the presets'
    ``${oc.env:SEARCHRL_CONFIG_DIR,/app/trainer/config}/...`` paths name files that exist here.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    os.environ.setdefault("SEARCHRL_CONFIG_DIR", str(CONFIG_DIR))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def check(cfg: Any, *, require_data: bool = True) -> list[str]:
    """Problems that would only surface on the cluster; empty when the config is good.

    Checks verl's own ``validate_config``, that the typed sections (actor, rollout, algorithm) build, that the reward
    function loads, that the tool and agent-loop config files exist, and (``require_data``) that the data files exist.
    """
    from omegaconf import OmegaConf

    problems: list[str] = []
    try:
        OmegaConf.resolve(cfg)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return [f"config does not resolve: {exc}"]
    try:
        from verl.utils.config import omega_conf_to_dataclass, validate_config

        validate_config(cfg, use_reference_policy=bool(cfg.actor_rollout_ref.actor.use_kl_loss), use_critic=False)
        for section in (cfg.actor_rollout_ref.actor, cfg.actor_rollout_ref.rollout, cfg.algorithm):
            omega_conf_to_dataclass(section)
    except Exception as exc:  # noqa: BLE001
        problems.append(f"verl rejects the config: {exc}")
    crf = cfg.reward.custom_reward_function
    if crf.path:
        try:
            from verl.utils.import_utils import load_extern_object

            load_extern_object(crf.path, crf.name)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"reward function {crf.path}:{crf.name} does not load: {exc}")
    rollout = cfg.actor_rollout_ref.rollout
    for label, path in (
        ("tool config", rollout.multi_turn.tool_config_path),
        ("agent-loop config", rollout.agent.agent_loop_config_path),
    ):
        if path:
            from verl.utils.import_utils import resolve_config_path

            if not os.path.isabs(str(path)):
                # verl resolves it against each Ray worker's working directory, which is not the driver's
                problems.append(f"{label} {path} is relative: Ray workers would not find it; use an absolute path")
                continue
            try:  # verl returns absolute paths unchecked: the file must exist here (the image has the same tree)
                found = Path(resolve_config_path(path)).is_file()
            except FileNotFoundError:
                found = False
            if not found:
                problems.append(f"{label} {path} not found")
    problems += _rollout_problems(rollout)
    if require_data:
        for key in ("train_files", "val_files"):
            files = cfg.data[key]
            for f in [files] if isinstance(files, str) else list(files):
                if "://" not in str(f) and not Path(str(f)).expanduser().exists():
                    problems.append(f"data.{key}: {f} does not exist (run `searchrl data prepare`)")
    return problems


def _rollout_problems(rollout: Any) -> list[str]:
    """Rollout settings our ``searchrl_research`` agent loop depends on (it stops each turn on stop strings)."""
    problems = []
    if rollout.name not in ("vllm", "sglang"):
        problems.append(f"rollout.name={rollout.name}: the searchrl agent loop supports vllm and sglang")
    if rollout.name == "sglang" and rollout.skip_tokenizer_init:
        # SGLang's scheduler then has no tokenizer and crashes on the first stop string (Req.tail_str)
        problems.append("rollout.skip_tokenizer_init must be false with SGLang: our stop strings need its tokenizer")
    if rollout.mode != "async":
        problems.append(f"rollout.mode={rollout.mode}: agent loops need verl's async rollout server")
    if not rollout.multi_turn.enable:
        problems.append("rollout.multi_turn.enable must be true for search rollouts")
    return problems


def task_runner_class(use_v1: bool = True) -> Any:
    """verl's TaskRunner (V1 or legacy) as a Ray actor class that also starts the trainer's metrics exporter."""
    import ray

    if use_v1:
        from verl.trainer.main_ppo import TaskRunnerV1 as base
    else:
        from verl.trainer.main_ppo_v0 import TaskRunner as base

    class SearchRLTaskRunner(base.__ray_actor_class__):  # type: ignore[name-defined,misc]
        """verl's TaskRunner plus ``searchrl-metrics`` (Prometheus on the head) fed by verl's step metrics."""

        def run(self, config: Any) -> Any:
            from searchrl.trainer.verl_plugins.metrics import install_tracking_hook, start_hub

            importlib.import_module("searchrl.trainer.verl_plugins")
            try:
                install_tracking_hook(start_hub())
            except Exception as exc:  # noqa: BLE001 - a missing exporter must not stop training
                log.warning("trainer metrics exporter not started: %s", exc)
            return super().run(config)

    return ray.remote(SearchRLTaskRunner)


def run(cfg: Any) -> None:
    """What ``verl.trainer.main_ppo.main`` does with a composed config, with our TaskRunner."""
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    run_ppo(cfg, task_runner_class=task_runner_class(bool(cfg.trainer.get("use_v1", True))))


def main(argv: Sequence[str] | None = None) -> int:
    """Checks the config, then hands over to ``verl.trainer.main_ppo.main`` with the same Hydra arguments."""
    parser = argparse.ArgumentParser(
        prog="python3 -m searchrl.trainer.rayjob_entrypoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config-name",
        default="research_grpo",
        help="research_grpo | zerosearch_grpo | your own in trainer/searchrl/trainer/config",
    )
    parser.add_argument("--check-only", action="store_true", help="check the config and exit")
    parser.add_argument("--skip-data-check", action="store_true", help="do not require the data files on the driver")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = compose(args.config_name, overrides)
    problems = check(cfg, require_data=not args.skip_data_check)
    if problems:
        for p in problems:
            log.error("%s", p)
        return 2
    log.info(
        "config %s checked: %d GPUs x %d nodes, rollout n=%d",
        args.config_name,
        cfg.trainer.n_gpus_per_node,
        cfg.trainer.nnodes,
        cfg.actor_rollout_ref.rollout.n,
    )
    if args.check_only:
        return 0
    for name in PLUGIN_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.warning("plug-in module %s not imported: %s", name, exc)
    run(cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
