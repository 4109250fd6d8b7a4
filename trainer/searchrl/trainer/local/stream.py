"""The trainer's side of ``rollout.mode=async``: feeding tasks to the rollout workers and taking their groups.

:class:`GroupFeed` keeps ``batch_size x (max_staleness + 1)`` tasks ahead of the trainer in the Redis task stream
(whole batches of the :class:`~.cursor.DataCursor`, so the questions come in the same order as in ``sync`` mode),
reads finished groups from the group stream, and hands each step ``batch_size`` groups whose policy version lags the
current weights by at most ``max_staleness`` (older ones are skipped and counted).

Exactly-once training. A group is acknowledged only after a checkpoint holds the update that used it:

* the ids of the groups used (or skipped) since the last checkpoint go into the next checkpoint's state, and are
  acknowledged right after it is written;
* a restarted trainer first takes over every group still pending in the ``trainer`` consumer group (the previous
  process's, whatever its consumer name); those the restored checkpoint lists were already used and are only
  acknowledged now, the others are delivered again, in their original order. So a group trained after the last
  checkpoint is trained again from that checkpoint's weights, and a group in a checkpoint never twice.

Policy versions. In async mode each weight push gets a unique name, ``step-<k>.<token>``, and the feed keeps the
last ``max_staleness + 1`` names of its own lineage (checkpointed). A group is trained only when the version that
sampled it is one of them: after a crash, groups sampled by weights of the dead process's later steps (which the
resumed run never had) are skipped like stale ones, even once the resumed run reaches the same step numbers.

Tasks submitted after the restored checkpoint are still in Redis: the number of batches fed is kept in Redis
(``<prefix>-fed-batches``, set in the same transaction as the tasks), and the restarted feed skips the cursor past them
instead of submitting the same questions again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from searchrl.agent.settings import episode_seed
from searchrl.data.datasets import Example
from searchrl.errors import DeadlineExceeded, FailedPrecondition
from searchrl.rollout.v1 import rollout_pb2
from searchrl.services.rollouts.queue import RolloutQueue, version_step
from searchrl.trainer.config import TrainConfig
from searchrl.trainer.local.cursor import DataCursor

log = logging.getLogger(__name__)


@dataclass
class StepGroups:
    """What one step trains on.

    Attributes:
        groups: ``batch_size`` ``(entry_id, group)`` pairs, in stream order.
        wait_s: seconds the trainer waited for them (its idle time this step).
        stale: groups skipped this step for lagging more than ``max_staleness`` versions.
        ages: each trained group's age in policy versions (current step minus its sampling version).
    """

    groups: list[tuple[str, rollout_pb2.RolloutGroup]]
    wait_s: float
    stale: int
    ages: list[int] = field(default_factory=list)


class GroupFeed:
    """Feeds tasks and collects groups for the asynchronous trainer (see the module docstring).

    Args:
        queue: the task and group streams.
        config: ``data.batch_size``, ``data.group_size``, ``rollout.max_staleness``, ``rollout.queue``, ``seed``.
        examples: the training questions.
        cursor: the trainer's data cursor (advanced as batches are fed).
        consumer: this trainer's consumer name.
        run_id: names the tasks (``<run_id>:<batch>:<slot>``).
        curriculum_total_steps: the simulator curriculum's length, copied into each task.
        on_foreign_version: awaited with the version of each group skipped for coming from weights outside the
            lineage; the trainer passes :meth:`RemotePolicyBackend.restore_pinned`, which loads its newest weights
            into the PolicyService again when the service no longer serves them (it restarted with its start-up
            model), so that the workers' next groups can be trained.
    """

    def __init__(
        self,
        queue: RolloutQueue,
        config: TrainConfig,
        examples: list[Example],
        cursor: DataCursor,
        *,
        consumer: str,
        run_id: str,
        curriculum_total_steps: int,
        on_foreign_version: Callable[[str], Awaitable[Any]] | None = None,
    ) -> None:
        self.queue, self.config, self.examples, self.cursor = queue, config, examples, cursor
        self.on_foreign_version = on_foreign_version
        self.consumer, self.run_id, self.total_steps = consumer, run_id, curriculum_total_steps
        self.fed_key = f"{queue.prefix}-fed-batches"
        self.fed = 0  # batches submitted
        self.consumed = 0  # groups trained or skipped
        self.pending_ack: list[str] = []  # groups used or skipped since the last checkpoint
        self._redelivered: list[tuple[str, rollout_pb2.RolloutGroup]] = []
        self.stale_total = 0
        self.lineage: list[str] = []  # names of the newest max_staleness + 1 weight versions, oldest first
        self._in_checkpoint: set[str] = set()  # groups the restored checkpoint trained (load_state_dict)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps: batches fed, groups consumed, and the groups to acknowledge once it is written."""
        return {
            "fed": self.fed,
            "consumed": self.consumed,
            "used": list(self.pending_ack),
            "stale": self.stale_total,
            "lineage": list(self.lineage),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (call :meth:`start` next)."""
        self.fed, self.consumed = int(state["fed"]), int(state["consumed"])
        self.stale_total = int(state.get("stale", 0))
        self.lineage = list(state.get("lineage", []))
        self._in_checkpoint = set(state.get("used", []))

    async def start(self) -> None:
        """Takes over the groups a previous trainer left pending (see the module docstring) and catches the cursor up
        with the batches already fed."""
        await self.queue.ensure()
        in_checkpoint = self._in_checkpoint
        claimed = await self.queue.claim_groups(self.consumer, min_idle_ms=0)
        done = [i for i, _g in claimed if i in in_checkpoint]
        self._redelivered = [(i, g) for i, g in claimed if i not in in_checkpoint]
        if done:
            await self.queue.ack_groups(done)
        fed_in_redis = await self.queue.counter(self.fed_key)
        while self.fed < fed_in_redis:  # batches submitted after the restored checkpoint are still in Redis
            self.cursor.next_batch()
            self.fed += 1
        if claimed:
            log.info(
                "took over %d pending groups: %d already in the checkpoint (acknowledged), %d to train again",
                len(claimed),
                len(done),
                len(self._redelivered),
            )

    async def after_checkpoint(self, used: list[str]) -> None:
        """Acknowledges the groups that the checkpoint just written lists (``state_dict()["used"]`` at save time)."""
        await self.queue.ack_groups(used)
        self.pending_ack = [i for i in self.pending_ack if i not in set(used)]

    def advance(self, version: str) -> None:
        """Records the name of the weights just pushed to the PolicyService (the newest of the lineage)."""
        self.lineage = [*self.lineage, version][-(self.config.rollout.max_staleness + 1) :]

    # ------------------------------------------------------------------------------------------ feeding
    async def feed(self, step: int, target: int | None = None) -> None:
        """Submits whole batches until ``target`` groups (default ``batch_size x (max_staleness + 1)``: this step's
        and the next ``max_staleness`` steps') are outstanding, i.e. submitted and not yet consumed."""
        cfg = self.config
        b = cfg.data.batch_size
        if target is None:
            target = b * (cfg.rollout.max_staleness + 1)
        while self.fed * b - self.consumed < target:
            idx = self.cursor.next_batch()
            now = time.time()
            tasks = [
                rollout_pb2.RolloutTask(
                    task_id=f"{self.run_id}:{self.fed}:{slot}",
                    question_id=self.examples[i].id,
                    question=self.examples[i].question,
                    golden_answers=list(self.examples[i].golden_answers),
                    data_source=self.examples[i].source,
                    group_size=cfg.data.group_size,
                    seed=episode_seed(cfg.seed, self.fed, slot),
                    curriculum_step=step,
                    curriculum_total_steps=self.total_steps,
                    created_unix=now,
                )
                for slot, i in enumerate(idx)
            ]
            self.fed += 1
            await self.queue.submit(tasks, counter=(self.fed_key, self.fed))

    async def next_step(self, step: int) -> StepGroups:
        """``batch_size`` fresh groups for the update from weights ``step-<step>``; waits for the workers.

        Raises:
            DeadlineExceeded: no group arrived for ``rollout.queue.wait_timeout_s``.
            FailedPrecondition: many groups in a row came from weights this trainer never pushed (workers on
                another PolicyService).
        """
        cfg = self.config
        need, bound = cfg.data.batch_size, cfg.rollout.max_staleness
        if not self.lineage:
            raise RuntimeError("no weights pushed yet: call advance() with the served version first")
        await self.feed(step)
        got: list[tuple[str, rollout_pb2.RolloutGroup]] = []
        ages: list[int] = []
        stale = 0
        t0 = time.perf_counter()
        last_arrival = time.monotonic()
        while len(got) < need:
            if self._redelivered:
                batch, self._redelivered = self._redelivered[: need - len(got)], self._redelivered[need - len(got) :]
            else:
                batch = await self.queue.read_groups(self.consumer, count=need - len(got), block_ms=1000)
            if not batch:
                if time.monotonic() - last_arrival > cfg.rollout.queue.wait_timeout_s:
                    raise DeadlineExceeded(
                        f"no rollout group arrived for {cfg.rollout.queue.wait_timeout_s:g} s: is a rollout worker "
                        f"running ('searchrl rollout-worker', queue prefix {self.queue.prefix!r})?"
                    )
                continue
            last_arrival = time.monotonic()
            for entry_id, g in batch:
                self.pending_ack.append(entry_id)
                self.consumed += 1
                if g.policy_version not in self.lineage:
                    stale += 1
                    if stale > max(4 * need, 16) and not got:
                        raise FailedPrecondition(
                            f"{stale} groups in a row were sampled by weights this trainer never pushed (last: "
                            f"{g.policy_version!r}, expected one of {self.lineage}): do the rollout workers use the "
                            "PolicyService the trainer pushes to (rollout.policy_target)?"
                        )
                    log.info(
                        "group %s sampled by %s, not one of the last %d versions %s: skipped",
                        g.task.task_id,
                        g.policy_version,
                        bound + 1,
                        self.lineage,
                    )
                    if self.on_foreign_version is not None:
                        await self.on_foreign_version(g.policy_version)
                else:
                    got.append((entry_id, g))
                    ages.append(step - (version_step(g.policy_version) or 0))
            if len(got) < need:
                # Only when skipped groups left too few outstanding for this step: topping up to the full target
                # here, as groups arrive one by one, would run the workers ahead by more than max_staleness steps.
                await self.feed(step, target=need - len(got))
        self.stale_total += stale
        return StepGroups(got, time.perf_counter() - t0, stale, ages)
