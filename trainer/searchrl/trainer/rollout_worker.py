"""``searchrl rollout-worker``: samples GRPO groups for an asynchronous trainer (``rollout.mode=async``).

A worker takes :class:`~searchrl.rollout.v1.rollout_pb2.RolloutTask` s from the Redis task stream
(:class:`~searchrl.services.rollouts.queue.RolloutQueue`), runs ``group_size`` episodes of each through the
PolicyService (``rollout.policy_target``) and the configured search backend, scores them with the training reward
(:func:`searchrl.agent.rewards.score_episodes`) and publishes the group, acknowledging its task in the same Redis
transaction. It reads the same configuration file as the trainer (``rollout``, ``reward``, ``seed``), so both sides
sample and score alike.

One policy version per group: every trajectory records the version of the weights that sampled each turn; when the
trainer swapped weights in the middle of a group (some turn or some episode by another version), the worker samples
the whole group again (``searchrl_worker_regenerated_groups_total``) — a group never mixes two versions. The weights
themselves reach the PolicyService through ``LoadWeights`` from the trainer, while workers keep generating.

A worker killed at any instant loses nothing: an unfinished task stays pending in the ``workers`` consumer group and
another worker takes it over after ``rollout.queue.reclaim_idle_s``; a finished one is already in the group stream.

Prometheus (``--metrics-port``): ``searchrl_worker_groups_total``, ``searchrl_worker_episodes_total``,
``searchrl_worker_regenerated_groups_total``, ``searchrl_worker_idle_share`` (share of wall time with no task in
hand since start), ``searchrl_worker_tasks_in_flight``.

    searchrl rollout-worker --config run.yaml [--name w1] [--metrics-port 9410] [key.sub=value ...]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from searchrl.agent.loop import AgentLoop, Episode, EpisodeRequest, run_episodes
from searchrl.agent.rewards import score_episodes
from searchrl.agent.settings import episode_seed
from searchrl.errors import InvalidRequest, SearchRLError
from searchrl.reward.shaping import load_reward_function
from searchrl.rollout.v1 import rollout_pb2
from searchrl.services.rollouts.queue import RolloutQueue
from searchrl.trainer.config import TrainConfig

log = logging.getLogger("searchrl.rollout_worker")


class WorkerMetrics:
    """The worker's Prometheus metrics in their own registry (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.groups = Counter("searchrl_worker_groups", "Groups published.", registry=r)
        self.episodes = Counter("searchrl_worker_episodes", "Episodes sampled (regenerated ones included).", registry=r)
        self.regenerated = Counter(
            "searchrl_worker_regenerated_groups",
            "Groups sampled again: the policy version changed while they ran.",
            registry=r,
        )
        self.duplicates = Counter(
            "searchrl_worker_dropped_groups",
            "Groups dropped because another worker finished the same task first.",
            registry=r,
        )
        self.idle_share = Gauge("searchrl_worker_idle_share", "Share of wall time with no task in hand.", registry=r)
        self.in_flight = Gauge("searchrl_worker_tasks_in_flight", "Tasks being sampled now.", registry=r)


class RolloutWorker:
    """Samples, scores and publishes GRPO groups (see the module docstring).

    Args:
        queue: the task and group streams.
        generator: a :class:`~searchrl.agent.loop.GenerationBackend` that reports ``policy_version`` (the
            PolicyService through :class:`~searchrl.services.policy.engines.remote.RemotePolicyBackend`).
        search: the search backend.
        config: the training configuration (``rollout.agent``, ``rollout.concurrency``, ``rollout.queue``,
            ``reward``).
        name: this worker's consumer name (unique among live workers).
        reward_fn: a custom reward function (verl ``compute_score`` contract) instead of ``config.reward.function``.
        max_regenerations: tries per task before it is left to another worker (the version kept changing).
    """

    def __init__(
        self,
        queue: RolloutQueue,
        generator: Any,
        search: Any,
        config: TrainConfig,
        *,
        name: str,
        reward_fn: Callable[..., Any] | None = None,
        max_regenerations: int = 5,
    ) -> None:
        self.queue, self.config, self.name = queue, config, name
        settings = config.rollout.agent.model_copy(update={"search_timeout_s": config.rollout.search.timeout_s})
        self.agent = AgentLoop(generator, search, settings)
        self.reward_fn = reward_fn or (load_reward_function(config.reward.function) if config.reward.function else None)
        self.max_regenerations = max_regenerations
        self.metrics = WorkerMetrics()
        self._busy = 0
        self._busy_since = 0.0
        self._busy_s = 0.0
        self._started = time.monotonic()

    def _mark(self, delta: int) -> None:
        now = time.monotonic()
        if self._busy:
            self._busy_s += now - self._busy_since
        self._busy += delta
        self._busy_since = now
        self.metrics.in_flight.set(self._busy)
        wall = max(now - self._started, 1e-9)
        self.metrics.idle_share.set(max(0.0, 1.0 - self._busy_s / wall))

    @property
    def idle_share(self) -> float:
        """Share of wall time since start with no task in hand."""
        self._mark(0)
        return float(self.metrics.idle_share._value.get())

    async def sample_group(self, task: rollout_pb2.RolloutTask) -> rollout_pb2.RolloutGroup | None:
        """Samples and scores one group with a single policy version.

        Returns:
            The group, or ``None`` when every one of ``max_regenerations`` tries straddled a weight swap.
        """
        cfg = self.config
        started = time.time()
        for attempt in range(self.max_regenerations):
            requests = [
                EpisodeRequest(
                    task.question,
                    list(task.golden_answers),
                    question_id=task.question_id,
                    seed=episode_seed(task.seed, j, attempt),
                )
                for j in range(task.group_size)
            ]
            episodes = await run_episodes(
                self.agent,
                requests,
                max_concurrency=cfg.rollout.concurrency,
                step=task.curriculum_step,
                total_steps=task.curriculum_total_steps or None,
            )
            self.metrics.episodes.inc(len(episodes))
            # An episode that sampled nothing (the token budget ran out before its first generation) has no version
            # and no loss token: it cannot mix versions.
            versions = {ep.policy_version for ep in episodes if ep.policy_version}
            if len(versions) <= 1 and not any(ep.mixed_policy_versions for ep in episodes):
                version = versions.pop() if versions else await self.queue.policy_version()
                return self._group(task, episodes, attempt, started, version)
            self.metrics.regenerated.inc()
            log.info("task %s straddled a weight swap (%s); sampling it again", task.task_id, sorted(versions))
        log.warning("task %s: the policy version changed during each of %d tries", task.task_id, self.max_regenerations)
        return None

    def _group(
        self,
        task: rollout_pb2.RolloutTask,
        episodes: Sequence[Episode],
        regenerations: int,
        started: float,
        version: str,
    ) -> rollout_pb2.RolloutGroup:
        cfg = self.config
        scores = score_episodes(
            episodes,
            scheme=cfg.reward.scheme,
            protocol=cfg.rollout.agent.protocol,
            format_bonus=cfg.reward.format_bonus,
            reward_fn=self.reward_fn,
            data_sources=[task.data_source] * len(episodes),
            ids=[task.question_id] * len(episodes),
        )
        trajectories = []
        for ep, s in zip(episodes, scores, strict=True):
            t = ep.to_proto(reward=s.reward)
            t.f1, t.em, t.format_ok, t.format_error = s.f1, s.em, s.format_ok, s.format_error
            trajectories.append(t)
        return rollout_pb2.RolloutGroup(
            task=task,
            policy_version=version,
            trajectories=trajectories,
            worker=self.name,
            regenerations=regenerations,
            started_unix=started,
            finished_unix=time.time(),
        )

    async def _one(self, entry_id: str, task: rollout_pb2.RolloutTask) -> None:
        try:
            group = await self.sample_group(task)
            if group is None:
                return  # left pending: another worker (or this one) takes it over after reclaim_idle_s
            if await self.queue.publish_group(entry_id, group) is None:
                self.metrics.duplicates.inc()
            else:
                self.metrics.groups.inc()
        finally:
            self._mark(-1)

    async def run(self, stop: asyncio.Event | None = None, max_groups: int | None = None) -> int:
        """Takes and runs tasks (``rollout.queue.groups_in_flight`` at once) until ``stop`` is set or
        ``max_groups`` tasks were taken; finishes the tasks in hand before returning.

        Returns:
            Tasks taken.

        Raises:
            Unavailable: Redis or the PolicyService stayed unreachable (after the clients' own retries); the failed
                task stays pending, for another worker after ``rollout.queue.reclaim_idle_s``.
        """
        stop = stop or asyncio.Event()
        q = self.config.rollout.queue
        gate = asyncio.Semaphore(q.groups_in_flight)
        running: set[asyncio.Task[None]] = set()
        failed: list[BaseException] = []

        def finished(t: asyncio.Task[None]) -> None:
            running.discard(t)
            gate.release()
            if not t.cancelled() and t.exception() is not None:
                failed.append(t.exception())  # type: ignore[arg-type]

        taken = 0
        await self.queue.ensure()
        try:
            while not stop.is_set() and (max_groups is None or taken < max_groups):
                await gate.acquire()
                if failed:  # a task failed past its clients' retries (e.g. the PolicyService stayed down)
                    gate.release()
                    raise failed[0]
                got = None
                try:
                    got = await self.queue.take_task(
                        self.name, block_ms=500, reclaim_idle_ms=int(q.reclaim_idle_s * 1000)
                    )
                finally:
                    if got is None:
                        gate.release()
                if got is None:
                    continue
                taken += 1
                self._mark(+1)
                t = asyncio.create_task(self._one(*got))
                running.add(t)
                t.add_done_callback(finished)
            if running:
                await asyncio.gather(*running)
            if failed:
                raise failed[0]
        finally:
            for t in running:
                t.cancel()
        return taken


async def _amain(config: TrainConfig, name: str, metrics_port: int, metrics_host: str) -> int:
    from transformers import AutoTokenizer

    from searchrl.assets import policy_model_path
    from searchrl.client.policy import PolicyClient
    from searchrl.services.policy.engines.remote import RemotePolicyBackend
    from searchrl.trainer.local.trainer import open_search_backend, policy_channel_options

    cfg = config
    tokenizer = AutoTokenizer.from_pretrained(policy_model_path(cfg.model.path))
    client = PolicyClient(cfg.rollout.policy_target, policy_channel_options())
    search = await open_search_backend(cfg.rollout.search, cfg.seed)
    queue = RolloutQueue(cfg.rollout.queue.redis_url, cfg.rollout.queue.prefix)
    worker = RolloutWorker(queue, RemotePolicyBackend(client, tokenizer), search, cfg, name=name)
    server = None
    if metrics_port:
        server, _thread = start_http_server(metrics_port, addr=metrics_host, registry=worker.metrics.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("rollout worker %s: tasks from %s, policy %s", name, queue.task_stream, cfg.rollout.policy_target)
    try:
        taken = await worker.run(stop)
    finally:
        await queue.close()
        await client.close()
        closer = getattr(search, "close", None)
        if closer is not None:
            res = closer()
            if asyncio.iscoroutine(res):
                await res
        if server is not None:
            server.shutdown()
    log.info("rollout worker %s stopped after %d tasks (idle share %.2f)", name, taken, worker.idle_share)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``searchrl rollout-worker`` (the chart's Deployment passes these flags)."""
    parser = argparse.ArgumentParser(
        prog="searchrl rollout-worker", description="Sample GRPO groups for an asynchronous trainer."
    )
    parser.add_argument("--config", help="the trainer's YAML config (rollout, reward, seed are used)")
    parser.add_argument("--name", default="", help="consumer name (default: worker-<hostname>-<pid>)")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus metrics here (0: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="bind address of the metrics endpoint")
    parser.add_argument("overrides", nargs="*", help="config overrides as key.sub=value")
    return parser


def load_worker_config(args: argparse.Namespace) -> TrainConfig:
    """The worker's configuration from parsed :func:`build_parser` arguments: the YAML file, then the overrides.

    Raises:
        InvalidRequest: unreadable file, unknown key or invalid value.
    """
    from searchrl.trainer.config import load_config

    return load_config(args.config, args.overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``searchrl rollout-worker``; returns the exit code (2: bad configuration)."""
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_worker_config(args)
    except InvalidRequest as exc:
        print(f"searchrl rollout-worker: {exc}", file=sys.stderr)
        return 2
    name = args.name or f"worker-{socket.gethostname()}-{os.getpid()}"
    try:
        return asyncio.run(_amain(config, name, args.metrics_port, args.metrics_host))
    except SearchRLError as exc:
        print(f"searchrl rollout-worker: {exc}", file=sys.stderr)
        return 1
