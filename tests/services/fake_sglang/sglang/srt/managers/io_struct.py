"""Request/response structs of sglang 0.5.23 ``srt/managers/io_struct.py`` that searchrl uses (field names, defaults
and keyword-only construction as in the real ``msgspec`` structs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True)
class UpdateWeightFromDiskReqInput:
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    flush_cache: bool = True
    manifest: dict[str, Any] | None = None


@dataclass(kw_only=True)
class UpdateWeightFromDiskReqOutput:
    success: bool
    message: str
    num_paused_requests: int = 0


@dataclass(kw_only=True)
class GenerateReqInput:
    text: Any = None
    input_ids: list[int] | None = None
    sampling_params: dict[str, Any] | None = None
    return_logprob: bool = False
    stream: bool = False
    rid: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
