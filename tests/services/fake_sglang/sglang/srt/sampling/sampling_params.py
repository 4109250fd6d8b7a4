"""``SamplingParams`` of sglang 0.5.23 (``srt/sampling/sampling_params.py``): the API fields, defaults, the
``__post_init__`` special cases, ``normalize`` (stop strings need a tokenizer) and ``verify`` (ranges), with the real
error messages. The real class is a ``msgspec.Struct(kw_only=True)``: an unknown keyword raises ``TypeError``; this
keyword-only dataclass does the same. Grammar, regex-stop and watermark features are left out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

_SAMPLING_EPS = 1e-6
TOP_K_ALL = 1 << 30
MAX_STOP_COUNT = 32


@dataclass(kw_only=True)
class SamplingParams:
    max_new_tokens: int | None = 128
    stop: str | list[str] | None = None
    stop_token_ids: set[int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = TOP_K_ALL
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    n: int = 1
    beam_width: int | None = None
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    structural_tag: str | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stream_interval: int | None = None
    logit_bias: dict[str, float] | None = None
    sampling_seed: int | None = None
    custom_params: dict[str, Any] | None = None
    watermark: Any = None
    # internal
    stop_strs: list[str] | None = None
    stop_regex_strs: list[str] | None = None
    stop_str_max_len: int = 0
    is_normalized: bool = False

    def __post_init__(self) -> None:
        self.stop_strs = self.stop  # type: ignore[assignment]
        self.stop_regex_strs = self.stop_regex  # type: ignore[assignment]
        self.temperature = self.temperature if self.temperature is not None else 1.0
        self.top_p = self.top_p if self.top_p is not None else 1.0
        self.top_k = self.top_k if self.top_k is not None else -1
        if 0 <= self.temperature < _SAMPLING_EPS:  # top_k = 1 means greedy sampling
            self.temperature = 1.0
            self.top_k = 1
        if self.top_k == -1:
            self.top_k = TOP_K_ALL  # whole vocabulary

    def verify(self, vocab_size: int) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0.0:
            raise ValueError(f"temperature must be a non-negative finite number, got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if self.top_k < 1 or self.top_k == -1:
            raise ValueError(f"top_k must be -1 (disable) or at least 1, got {self.top_k}.")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if self.sampling_seed is not None:
            if not isinstance(self.sampling_seed, int):
                raise ValueError(f"sampling_seed must be an integer, got {type(self.sampling_seed).__name__}.")
            if not -(2**63) <= self.sampling_seed <= 2**63 - 1:
                raise ValueError(f"sampling_seed must be in [-2**63, 2**63 - 1], got {self.sampling_seed}.")

    def normalize(self, tokenizer: Any) -> None:
        if self.stop_strs is None:
            self.stop_strs = []
        else:
            if isinstance(self.stop_strs, str):
                self.stop_strs = [self.stop_strs]
            if len(self.stop_strs) > MAX_STOP_COUNT:
                raise ValueError(f"at most {MAX_STOP_COUNT} stop strings are allowed, got {len(self.stop_strs)}")
            lens = [len(tokenizer.encode(s, add_special_tokens=False)) if tokenizer else len(s) for s in self.stop_strs]
            self.stop_str_max_len = max(lens, default=0)
        self.stop_regex_strs = [] if self.stop_regex_strs is None else self.stop_regex_strs
        if tokenizer is None:  # raise_if_tokenizer_required
            if self.stop_strs:
                raise ValueError(
                    f"stop={self.stop_strs!r} is unavailable when skip_tokenizer_init=True "
                    "(requires tokenizer to decode tokens to text for matching)."
                )
            if self.min_new_tokens > 0:
                raise ValueError(
                    f"min_new_tokens={self.min_new_tokens} is unavailable when skip_tokenizer_init=True "
                    "(requires tokenizer for eos_token_id)."
                )
        self.stop = None
        self.stop_regex = None
        self.is_normalized = True
