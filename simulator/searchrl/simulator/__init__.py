"""ZeroSearch simulated search: prompts, curriculum, engines, SimulatedSearchService, simulator SFT."""
