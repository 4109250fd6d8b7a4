"""Reward scoring: the pure-Python library (:mod:`.scoring`), verl's reward hook (:mod:`.verl_reward`) and the
RewardService (:mod:`.server`)."""
