"""QA examples and their loaders (bundled benchmark subsets, JSONL, parquet)."""
