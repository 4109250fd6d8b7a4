"""The rollout store (:mod:`.store`: a Redis Stream of trajectories with consumer groups), its exporter
(:mod:`.export`) and the ``searchrl rollouts`` command (:mod:`.cli`)."""

from searchrl.services.rollouts.export import export, trajectory_row
from searchrl.services.rollouts.store import (
    DEFAULT_GROUP,
    DEFAULT_REDIS_URL,
    DEFAULT_STREAM,
    Entry,
    RolloutStore,
    num_searches,
)

__all__ = [
    "DEFAULT_GROUP",
    "DEFAULT_REDIS_URL",
    "DEFAULT_STREAM",
    "Entry",
    "RolloutStore",
    "export",
    "num_searches",
    "trajectory_row",
]
