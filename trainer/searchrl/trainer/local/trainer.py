"""The local trainer's driver: :class:`LocalTrainer` (set-up and resume, rollout, reward, update, report,
checkpoints) and :func:`train`, the Python API behind ``searchrl train``. See :mod:`searchrl.trainer.local` for the
step.

SIGINT / SIGTERM: the first signal lets the running step finish, writes a checkpoint and returns; a second one during
the rollout or reward phase abandons the step (nothing of it is kept; the previous step's state is checkpointed) and
returns at once. An update that has started always finishes, so a checkpoint never holds half an update.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from searchrl.agent.search import SearchSpec, build_search_backend
from searchrl.agent.settings import episode_seed
from searchrl.client.base import ChannelOptions
from searchrl.data.datasets import Example
from searchrl.errors import InvalidRequest
from searchrl.reward.shaping import load_reward_function
from searchrl.tracking import MlflowRun
from searchrl.trainer import checkpoint as ckpt
from searchrl.trainer.config import SearchConfig, TrainConfig
from searchrl.trainer.data import load_examples
from searchrl.trainer.guards import GUARDS, GuardEvent, Guards
from searchrl.trainer.local.cursor import DataCursor
from searchrl.trainer.local.lora import MergedPolicy, add_adapters, load_adapters
from searchrl.trainer.local.update import EpisodeData, GRPOUpdater
from searchrl.trainer.telemetry import TrainerGauges, rollout_metrics

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, dict[str, float]], None]


class StepAbandoned(Exception):
    """A second stop signal arrived while a step was running; the step's work is discarded."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_id: the MLflow run id.
        tracking_uri: where that run lives.
        step: last finished step.
        metrics: that step's metrics (empty when no step ran).
        history: metrics of every step this call ran, in order.
        checkpoint: the newest checkpoint folder (``None`` when none was written).
        stopped_by: ``None`` (reached ``max_steps``), ``"signal"`` or the guard that stopped the run.
        guard_events: every guard trip of this call.
        output_dir: the run folder.
    """

    run_id: str
    tracking_uri: str
    step: int
    metrics: dict[str, float]
    history: list[dict[str, float]]
    checkpoint: Path | None
    stopped_by: str | None
    guard_events: list[GuardEvent]
    output_dir: Path


async def open_search_backend(search: SearchConfig, seed: int) -> Any:
    """The training search backend ``search`` names (an in-process index is loaded here), with its added latency;
    call it on the event loop that will use it. Client TLS and the bearer token come from the environment
    (:meth:`~searchrl.client.base.ChannelOptions.from_env`, as the chart sets them).

    Raises:
        InvalidRequest: a TLS or token file named in the environment cannot be read.
    """
    inprocess = None
    if search.backend == "inprocess":
        from searchrl.retriever.inprocess import open_inprocess_retriever

        inprocess = await open_inprocess_retriever(search.index_dir)
    spec = SearchSpec(
        kind=search.backend,
        retriever_target=search.retriever_target,
        simulator_target=search.simulator_target,
        mix_ratio=search.mix_ratio,
        training=True,
        seed=seed,
        timeout_s=search.timeout_s,
        options=ChannelOptions.from_env(wait_for_ready=True),  # a restarting search service delays, not fails, searches
        inprocess=inprocess,
        added_latency_s=search.added_latency_s,
    )
    return build_search_backend(spec)


def policy_channel_options() -> ChannelOptions:
    """Options of the trainer's and the rollout workers' PolicyService client: TLS and token from the environment
    (:meth:`~searchrl.client.base.ChannelOptions.from_env`; the admin token when one is set, since the trainer
    loads its checkpoints into the policy), a 600 s deadline (episodes are long on CPU) within which a call waits for a
    restarting PolicyService (wait-for-ready) rather than failing."""
    return ChannelOptions.from_env(admin=True, timeout_s=600.0, wait_for_ready=True)


class LocalTrainer:
    """GRPO on one machine. Use :func:`train` unless you need the pieces.

    Args:
        config: the run's configuration.
        search_backend: a ready :class:`~searchrl.agent.loop.SearchBackend` to use instead of building one
            from ``config.rollout.search`` (e.g. an in-process retriever); ``None``: build from the config.
        examples: training questions to use instead of loading ``config.data.train``.
        reward_fn: a reward function with verl's ``compute_score`` contract instead of ``config.reward.function``.

    Raises:
        InvalidRequest: unusable config or data, or a reward function that cannot be loaded.
    """

    def __init__(
        self,
        config: TrainConfig,
        *,
        search_backend: Any = None,
        examples: Sequence[Example] | None = None,
        reward_fn: Callable[..., Any] | None = None,
    ) -> None:
        self.config = config
        self._search_override = search_backend
        self.examples = (
            list(examples) if examples is not None else load_examples(config.data.train, limit=config.data.limit)
        )
        if config.data.limit:
            self.examples = self.examples[: config.data.limit]
        self.cursor = DataCursor(len(self.examples), config.data.batch_size, config.seed, config.data.shuffle)
        self.guards = Guards(config.guards)
        self.step = 0
        self.run: MlflowRun | None = None
        self.gauges: TrainerGauges | None = None
        self._stop_requested = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: Any = None
        self._policy_client: Any = None
        self._search: Any = None
        self._rollout_store: Any = None
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: ckpt.CheckpointInfo | None = None
        self._rollout_task: asyncio.Task[Any] | None = None
        self._setup_done = False
        self.merged: MergedPolicy | None = None
        self.feed: Any = None  # rollout.mode=async: the GroupFeed
        self._feed_state: dict[str, Any] | None = None
        self._reward_fn: Callable[..., Any] | None = reward_fn or (
            load_reward_function(config.reward.function) if config.reward.function else None
        )

    @property
    def model(self) -> Any:
        """The policy being trained (set by :meth:`setup`): a transformers model, or a :class:`peft.PeftModel` with
        ``model.lora_rank > 0``."""
        return self.updater.model

    @property
    def export_model(self) -> Any:
        """The current policy as a plain transformers model: what the in-process engine samples from, checkpoints
        hold and a remote PolicyService loads. With LoRA the merged copy (:class:`~.lora.MergedPolicy`), refreshed
        after every update; otherwise the trained model itself."""
        return self.merged.model if self.merged is not None else self.model

    # -------------------------------------------------------------------------------------------- set-up
    def setup(self, *, resume: bool = True) -> None:
        """Loads the models, the optimizer, the search backend and MLflow; restores the newest checkpoint when
        ``resume`` and one exists.

        Raises:
            InvalidRequest: the model cannot be loaded.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

        from searchrl.assets import policy_model_path

        cfg = self.config
        if cfg.model.torch_threads:
            torch.set_num_threads(cfg.model.torch_threads)
        set_seed(cfg.seed)  # python, numpy and torch
        cfg.output_path.mkdir(parents=True, exist_ok=True)
        found = ckpt.latest_checkpoint(cfg.checkpoint_path) if resume else None
        base_path = policy_model_path(cfg.model.path)
        ref_path = policy_model_path(cfg.model.reference_path) if cfg.model.reference_path else base_path
        lora = cfg.model.lora_rank > 0
        if found is not None and found.adapter_path.is_dir() != lora:
            kind = "a LoRA" if found.adapter_path.is_dir() else "a full fine-tuning"
            raise InvalidRequest(
                f"checkpoint {found.path} was written by {kind} run; model.lora_rank={cfg.model.lora_rank} cannot "
                "resume it (start a new output_dir or use the matching setting)"
            )
        # A separate frozen reference only for full fine-tuning with a KL term; LoRA's reference is the base model
        # under the adapters, and kl_coef 0 needs none.
        separate_ref = cfg.algorithm.kl_coef != 0 and not lora
        ref_model = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(base_path)
            # Master weights stay float32; bfloat16 is used through autocast (verl's FSDP mixed precision does the same).
            if separate_ref:
                ref_model = AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32)
            if found is not None and not lora:
                model = AutoModelForCausalLM.from_pretrained(found.model_path, dtype=torch.float32)
            elif ref_model is not None and ref_path == base_path:
                model = copy.deepcopy(ref_model)
            else:
                model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        except OSError as exc:
            raise InvalidRequest(f"cannot load the policy {cfg.model.path!r}: {exc}") from exc
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if lora:
            model = load_adapters(model, found.adapter_path) if found is not None else add_adapters(model, cfg.model)
            if cfg.model.gradient_checkpointing:
                model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need input grads
        self.merged = MergedPolicy(model) if lora else None
        tok = self.tokenizer
        pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        if ref_model is not None:
            ref_model = ref_model.eval().requires_grad_(False)
        self.updater = GRPOUpdater(model.eval(), ref_model, cfg, pad_id)
        run_id = None
        if found is not None:
            state = ckpt.load_state(found)
            self.updater.load_state_dict(state)
            self.cursor.load_state_dict(state["cursor"])
            self.guards.load_state_dict(state.get("guards", {}))
            self._feed_state = state.get("stream")
            self.step = int(state["step"])
            run_id = state.get("mlflow_run_id")
            ckpt.set_rng_state(state["rng"])
            self.last_checkpoint = found
            log.info("resumed from %s (step %d)", found.path, self.step)
        self.run = MlflowRun(
            cfg.tracking_uri,
            cfg.logging.experiment,
            run_name=cfg.logging.run_name or cfg.output_path.name,
            run_id=run_id,
            tags={"searchrl.component": "local-trainer", "searchrl.model": cfg.model.path},
        )
        if run_id is None:
            self.run.log_params(cfg.model_dump(mode="json"))
        (cfg.output_path / "config.yaml").write_text(cfg.to_yaml())
        self.gauges = TrainerGauges(cfg.logging.metrics_port, cfg.logging.metrics_host)
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._setup_async())
        self._setup_done = True

    async def _setup_async(self) -> None:
        cfg = self.config
        self._search = self._search_override
        if self._search is None:
            self._search = await open_search_backend(cfg.rollout.search, cfg.seed)
        if cfg.rollout.engine == "inprocess":
            from searchrl.services.policy.engines.transformers import TransformersEngine

            self._engine = TransformersEngine(
                self.export_model,
                tokenizer=self.tokenizer,
                max_batch_size=cfg.rollout.max_batch_size,
                version=f"step-{self.step}",
                torch_threads=cfg.rollout.torch_threads,
            )
            self._generator = self._engine
        else:
            from searchrl.client.policy import PolicyClient
            from searchrl.services.policy.engines.remote import RemotePolicyBackend

            self._policy_client = PolicyClient(cfg.rollout.policy_target, policy_channel_options())
            self._generator = RemotePolicyBackend(self._policy_client, self.tokenizer)
            if cfg.rollout.mode == "sync":
                # The service serves exactly this run's weights from the first episode on (it may hold another
                # run's, or restart later with its start-up model: the backend then loads these again).
                if self.step > 0 and self.last_checkpoint is not None:
                    pinned = (f"step-{self.step}", str(self.last_checkpoint.model_path))
                else:
                    pinned = (f"step-{self.step}", str(self._save_live_weights()))
                await self._policy_client.load_weights(pinned[1], policy_version=pinned[0], timeout_s=600)
                self._generator.pinned = pinned
        if cfg.rollout.mode == "async":
            from searchrl.services.rollouts.queue import RolloutQueue
            from searchrl.trainer.local.stream import GroupFeed

            q = cfg.rollout.queue
            self.feed = GroupFeed(
                RolloutQueue(q.redis_url, q.prefix),
                cfg,
                self.examples,
                self.cursor,
                consumer=f"trainer-{cfg.output_path.name}",
                run_id=cfg.output_path.name,
                curriculum_total_steps=self.config.curriculum_total_steps,
                # a PolicyService that restarted serves its start-up weights: load this run's newest into it again
                on_foreign_version=self._generator.restore_pinned,
            )
            if self._feed_state is not None:
                self.feed.load_state_dict(self._feed_state)
            await self.feed.start()
            # The PolicyService serves this run's weights under a name of its lineage before any group is taken.
            if self.feed.lineage and self.last_checkpoint is not None:
                version, weights = self.feed.lineage[-1], self.last_checkpoint.model_path
            else:
                version, weights = self._version_name(self.step), self._save_live_weights()
                self.feed.advance(version)
            await self._policy_client.load_weights(str(weights), policy_version=version, timeout_s=600)
            self._generator.pinned = (version, str(weights))
            await self.feed.queue.set_policy_version(version)
        if cfg.logging.rollout_redis_url:
            from searchrl.services.rollouts.store import RolloutStore

            self._rollout_store = RolloutStore(cfg.logging.rollout_redis_url, stream=cfg.logging.rollout_stream)

    # -------------------------------------------------------------------------------------------- one step
    async def _rollout(self, step: int, batch: list[Example]) -> list[Any]:
        from searchrl.agent.loop import AgentLoop, EpisodeRequest, run_episodes

        cfg = self.config
        settings = cfg.rollout.agent.model_copy(update={"search_timeout_s": cfg.rollout.search.timeout_s})
        agent = AgentLoop(self._generator, self._search, settings)
        n = cfg.data.group_size
        requests = [
            EpisodeRequest(
                ex.question, list(ex.golden_answers), question_id=ex.id, seed=episode_seed(cfg.seed, step, slot, j)
            )
            for slot, ex in enumerate(batch)
            for j in range(n)
        ]
        # The curriculum position is the number of finished steps: the first step samples at p_start (ZeroSearch).
        return await run_episodes(
            agent,
            requests,
            max_concurrency=cfg.rollout.concurrency,
            step=step - 1,
            total_steps=self.config.curriculum_total_steps,
        )

    def _score(self, episodes: Sequence[Any], examples: Sequence[Example]) -> list[Any]:
        """Scores episodes (``examples[i // group_size]`` is episode ``i``'s question): see
        :func:`searchrl.agent.rewards.score_episodes`."""
        from searchrl.agent.rewards import score_episodes

        cfg = self.config
        n = cfg.data.group_size
        return score_episodes(
            episodes,
            scheme=cfg.reward.scheme,
            protocol=cfg.rollout.agent.protocol,
            format_bonus=cfg.reward.format_bonus,
            reward_fn=self._reward_fn,
            data_sources=[examples[i // n].source for i in range(len(episodes))],
            ids=[examples[i // n].id for i in range(len(episodes))],
        )

    async def _publish(self, step: int, episodes: Sequence[Any], scores: Sequence[Any]) -> None:
        """Appends the step's trajectories to the rollout log (``logging.rollout_redis_url``), once: in sync mode the
        ids are ``<MLflow run id>-<step>-<index>``, the same when a resumed run samples the step again, and the store
        skips a batch already in the stream."""
        if self.feed is None and self.run is not None:
            for i, ep in enumerate(episodes):
                ep.id = f"{self.run.run_id}-{step:06d}-{i:04d}"
        if self._rollout_store is None:
            return
        msgs = []
        for i, (ep, s) in enumerate(zip(episodes, scores, strict=True)):
            ep.policy_version = ep.policy_version or f"step-{step - 1}"
            msgs.append(ep.to_proto(reward=s.reward, group_index=i // self.config.data.group_size))
        try:
            await self._rollout_store.add_many(msgs, retry_s=self.config.logging.rollout_publish_retry_s, dedupe=True)
        except Exception as exc:  # noqa: BLE001 - a down Redis must not stop training
            log.warning("could not push %d trajectories to the rollout store: %s", len(msgs), exc)

    def _sample_step(self, step: int) -> tuple[list[Any], list[Any], float, float]:
        """rollout.mode=sync: samples and scores this step's episodes with the current weights; returns them with the
        end times of the rollout and reward phases."""
        assert self._loop is not None
        cfg = self.config
        cursor_before = self.cursor.state_dict()
        batch = [self.examples[i] for i in self.cursor.next_batch()]
        log.info("step %d started: %d questions x %d samples", step, len(batch), cfg.data.group_size)
        try:
            self._rollout_task = self._loop.create_task(self._rollout(step, batch))
            try:
                episodes = self._loop.run_until_complete(self._rollout_task)
            except asyncio.CancelledError:
                raise StepAbandoned() from None
            finally:
                self._rollout_task = None
            self._check_abandon()
            t1 = time.perf_counter()
            scores = self._score(episodes, batch)
            t2 = time.perf_counter()
            self._check_abandon()
        except StepAbandoned:
            self.cursor.load_state_dict(cursor_before)
            raise
        return episodes, scores, t1, t2

    def _version_name(self, step: int) -> str:
        """Name of the weights after ``step`` updates: ``step-<k>``; in async mode with a unique suffix
        (``step-<k>.<token>``) so that a resumed run's weights never share a name with a dead run's (see
        :mod:`searchrl.trainer.local.stream`)."""
        if self.config.rollout.mode == "async":
            return f"step-{step}.{secrets.token_hex(4)}"
        return f"step-{step}"

    def _save_live_weights(self) -> Path:
        """Writes the current policy (plain transformers folder) where the PolicyService loads it from."""
        weights = self.config.output_path / "live_weights"
        self.export_model.save_pretrained(weights)
        self.tokenizer.save_pretrained(weights)
        return weights

    async def _take_groups(self, step: int) -> tuple[list[Any], list[Any], dict[str, float]]:
        """rollout.mode=async: this step's groups from the rollout workers, as episodes and scores, with the
        ``stream/*`` metrics."""
        from searchrl.agent.loop import Episode
        from searchrl.reward.scoring import ScoreResult

        got = await self.feed.next_step(step - 1)  # the update starts from the weights of step - 1
        episodes, scores = [], []
        for _entry, g in got.groups:
            for t in g.trajectories:
                episodes.append(Episode.from_proto(t))
                scores.append(ScoreResult(t.reward, t.f1, t.em, t.format_ok, t.format_error, t.answer))
        stats = await self.feed.queue.stats()
        now = time.time()
        # which groups this step trained: the audit trail of exactly-once delivery (groups.jsonl)
        self._write_jsonl(
            "groups.jsonl",
            [{"step": step, "entry_id": e, "task_id": g.task.task_id, "policy_version": g.policy_version,
              "worker": g.worker} for e, g in got.groups],
        )  # fmt: skip
        return (
            episodes,
            scores,
            {
                "time/wait_s": got.wait_s,
                "stream/stale_groups": float(got.stale),
                "stream/stale_groups_total": float(self.feed.stale_total),
                "stream/group_age_versions": float(np.mean(got.ages)) if got.ages else 0.0,
                "stream/group_age_s": float(np.mean([now - g.task.created_unix for _e, g in got.groups])),
                "stream/regenerated_groups": float(sum(g.regenerations for _e, g in got.groups)),
                "stream/tasks_waiting": float(stats.tasks_waiting),
                "stream/tasks_running": float(stats.tasks_running),
                "stream/groups_waiting": float(stats.groups_waiting),
                "stream/lag": float(stats.tasks_waiting + stats.tasks_running + stats.groups_waiting),
            },
        )

    def train_step(self) -> tuple[dict[str, float], list[GuardEvent]]:
        """Runs one full GRPO step (rollout, reward, update, report); returns its metrics and guard trips."""
        assert self._loop is not None and self.run is not None and self.gauges is not None
        cfg = self.config
        step = self.step + 1
        t0 = time.perf_counter()
        stream: dict[str, float] = {}
        if self.feed is not None:
            episodes, scores, stream = self._loop.run_until_complete(self._take_groups(step))
            t1 = t2 = time.perf_counter()
        else:
            episodes, scores, t1, t2 = self._sample_step(step)
        data = [
            EpisodeData(
                ep.prompt_ids,
                ep.response_ids,
                ep.loss_mask,
                ep.response_logprobs,
                s.reward,
                f"{step}:{i // cfg.data.group_size}",
            )
            for i, (ep, s) in enumerate(zip(episodes, scores, strict=True))
        ]
        actor = self.updater.update(data, behaviour_logprobs=self.feed is not None)
        if self.merged is not None:
            self.merged.refresh()  # the adapters changed: the merged copy the engine and exports use follows
        t3 = time.perf_counter()
        self.step = step
        version = self._version_name(step)
        if self._engine is not None:
            self._engine.set_model(self.export_model, version)
        metrics = {**rollout_metrics(episodes, scores), **actor}
        metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2})
        if self._policy_client is not None:
            t4 = time.perf_counter()
            weights = self._save_live_weights()
            self._loop.run_until_complete(
                self._policy_client.load_weights(str(weights), policy_version=version, timeout_s=600)
            )
            # sync: every episode of the next step must come from these weights, even after a policy restart;
            # async: groups from other weights are skipped, and the feed restores these if the service restarted
            self._generator.pinned = (version, str(weights))
            if self.feed is not None:
                self.feed.advance(version)
                self._loop.run_until_complete(self.feed.queue.set_policy_version(version))
            metrics["time/weight_sync_s"] = time.perf_counter() - t4
        self._loop.run_until_complete(self._publish(step, episodes, scores))
        metrics.update(stream)
        total = metrics["time/total_s"] = time.perf_counter() - t0
        # The same in both modes: the share of the step the trainer did not spend updating, and the episode rate.
        metrics["time/trainer_idle_share"] = 1.0 - (t3 - t2) / total
        metrics["time/episodes_per_s"] = len(episodes) / total
        metrics["train/epoch"] = float(self.cursor.epoch)
        events = self.guards.update(
            step,
            reward_mean=metrics["reward/mean"],
            searches_per_episode=metrics["rollout/searches_per_episode"],
            kl=metrics["actor/kl"],
            searches=int(metrics["rollout/searches"]),
            failed_searches=int(metrics["rollout/search_failures"]),
        )
        for g in GUARDS:
            metrics[f"guard/{g}"] = 1.0 if self.guards.tripped.get(g) else 0.0
        self.run.log_metrics(metrics, step=step)
        self.gauges.update(step, metrics, self.guards.tripped)
        self._write_jsonl("metrics.jsonl", [{"step": step, **metrics}])
        if cfg.trainer.log_trajectories:
            rows = [
                {"step": step, **ep.to_record(), "reward": s.reward, "f1": s.f1, "format_ok": s.format_ok,
                 "format_error": s.format_error}
                for ep, s in list(zip(episodes, scores, strict=True))[: cfg.trainer.log_trajectories]
            ]  # fmt: skip
            self._write_jsonl("trajectories.jsonl", rows)
        self.history.append(metrics)
        return metrics, events

    def _write_jsonl(self, name: str, rows: Sequence[dict[str, Any]]) -> None:
        with open(self.config.output_path / name, "a", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    # -------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> ckpt.CheckpointInfo:
        """Writes a checkpoint of the current step (see :mod:`searchrl.trainer.checkpoint`)."""
        assert self.run is not None
        cfg = self.config
        state = {
            **self.updater.state_dict(),
            "cursor": self.cursor.state_dict(),
            "guards": self.guards.state_dict(),
            "mlflow_run_id": self.run.run_id,
        }
        used: list[str] = []
        if self.feed is not None:
            state["stream"] = self.feed.state_dict()
            used = state["stream"]["used"]
        info = ckpt.save_checkpoint(
            cfg.checkpoint_path,
            self.step,
            model=self.export_model,
            tokenizer=self.tokenizer,
            state=state,
            config_yaml=cfg.to_yaml(),
            keep_last=cfg.checkpoint.keep_last,
            adapter=self.model if self.merged is not None else None,
        )
        self.last_checkpoint = info
        if self.feed is not None and self._loop is not None:
            # the groups this checkpoint used are acknowledged only now (see searchrl.trainer.local.stream)
            self._loop.run_until_complete(self.feed.after_checkpoint(used))
        self.run.set_tag("searchrl.last_checkpoint", str(info.path))
        if cfg.logging.log_checkpoints_to_mlflow:
            self.run.log_artifact(info.model_path, f"checkpoints/{info.path.name}")
        return info

    # -------------------------------------------------------------------------------------------- signals
    def request_stop(self) -> None:
        """Asks the run to stop: the first call finishes the running step and checkpoints; the second abandons it."""
        self._stop_requested += 1
        if self._stop_requested == 1:
            log.warning("stop requested: finishing the current step, then writing a checkpoint")
        else:
            log.warning("second stop request: abandoning the current step")
            task, loop = self._rollout_task, self._loop
            if task is not None and loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(task.cancel)

    def _check_abandon(self) -> None:
        if self._stop_requested >= 2:
            raise StepAbandoned()

    # -------------------------------------------------------------------------------------------- the run
    def fit(self, progress: ProgressFn | None = None) -> TrainResult:
        """Runs steps until ``trainer.max_steps``, a stop request or a stopping guard; always checkpoints on the way
        out when a step finished since the last checkpoint."""
        if not self._setup_done:
            self.setup()
        assert self.run is not None
        cfg = self.config
        events: list[GuardEvent] = []
        stopped_by: str | None = None
        status = "FINISHED"
        metrics: dict[str, float] = {}
        try:
            while self.step < cfg.trainer.max_steps:
                if self._stop_requested:
                    stopped_by = "signal"
                    break
                try:
                    metrics, step_events = self.train_step()
                except StepAbandoned:
                    stopped_by = "signal"
                    break
                events += step_events
                if progress is not None:
                    progress(self.step, metrics)
                every = cfg.checkpoint.every_steps
                if every and self.step % every == 0:
                    self.save_checkpoint()
                stop_events = [e for e in step_events if e.action == "stop"]
                if stop_events:
                    stopped_by = stop_events[0].guard
                    self.run.set_tag("searchrl.stopped_by", stopped_by)
                    break
            done_step = self.last_checkpoint.step if self.last_checkpoint else 0
            if self.step > done_step and (cfg.checkpoint.save_final or stopped_by is not None):
                self.save_checkpoint()
            if stopped_by == "signal":
                status = "KILLED"
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self.run.finish(status)
        return TrainResult(
            run_id=self.run.run_id,
            tracking_uri=cfg.tracking_uri,
            step=self.step,
            metrics=metrics or (self.history[-1] if self.history else {}),
            history=list(self.history),
            checkpoint=self.last_checkpoint.path if self.last_checkpoint else None,
            stopped_by=stopped_by,
            guard_events=events,
            output_dir=cfg.output_path,
        )

    def close(self) -> None:
        """Releases the engine, clients, the metrics server and the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():

            async def _close() -> None:
                if self._engine is not None:
                    await self._engine.close()
                queue = self.feed.queue if self.feed is not None else None
                for obj in (self._search, self._policy_client, self._rollout_store, queue):
                    closer = getattr(obj, "close", None)
                    if closer is not None:
                        try:
                            res = closer()
                            if asyncio.iscoroutine(res):
                                await res
                        except Exception as exc:  # noqa: BLE001 - best effort at shutdown
                            log.debug("close failed: %s", exc)

            loop.run_until_complete(_close())
            loop.close()
        if self.gauges is not None:
            self.gauges.close()


def train(
    config: TrainConfig,
    resume: bool = True,
    progress: ProgressFn | None = None,
    *,
    search_backend: Any = None,
    examples: Sequence[Example] | None = None,
    reward_fn: Callable[..., Any] | None = None,
    handle_signals: bool = True,
) -> TrainResult:
    """Runs (or continues) a local GRPO training run. The Python API behind ``searchrl train`` and the demo.

    Args:
        config: the run's configuration.
        resume: continue from the newest checkpoint in ``config.checkpoint_path`` when there is one.
        progress: called as ``progress(step, metrics)`` after every step.
        search_backend: a ready search backend instead of the one ``config.rollout.search`` names.
        examples: training questions instead of ``config.data.train``.
        reward_fn: a reward function (verl ``compute_score`` contract) instead of ``config.reward.function``.
        handle_signals: install SIGINT/SIGTERM handlers for a graceful stop (main thread only).

    Returns:
        :class:`TrainResult` with the MLflow run id, the last step's metrics and the newest checkpoint.

    Raises:
        InvalidRequest: bad config, data or model.
    """
    trainer = LocalTrainer(config, search_backend=search_backend, examples=examples, reward_fn=reward_fn)
    previous: dict[int, Any] = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda _s, _f: trainer.request_stop())
    try:
        trainer.setup(resume=resume)
        return trainer.fit(progress)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        trainer.close()
