"""The agent: the search-augmented rollout loop, its tag protocols and answer parsing, and the search backends it calls."""
