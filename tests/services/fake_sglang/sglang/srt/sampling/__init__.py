"""Fake SGLang package (tests only)."""
