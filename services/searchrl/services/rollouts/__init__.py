"""The rollout store (:mod:`.store`: a Redis Stream of trajectories with consumer groups), its exporter
(:mod:`.export`) and the ``searchrl rollouts`` command (:mod:`.cli`)."""
