"""GRPO training for search agents: the ReSearch agent loop, the local CPU trainer on verl core_algos, verl plug-ins."""
