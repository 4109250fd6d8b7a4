"""Settings shared by everything that samples from a policy or runs the agent loop, with one set of defaults.

* :class:`SamplingParams` - the sampling parameters of one generation call and their one validator.
* :class:`AgentSettings` - the agent loop's settings (``AgentLoopConfig`` is this model).
* :func:`episode_seed` - the seed of one episode, a pure function of a base seed and keys.

Both models raise :class:`~searchrl.errors.InvalidRequest` (``INVALID_ARGUMENT``) on bad values, with messages such as
``max_turns must be >= 1, got 0``, whether built directly or with ``parse(**kw)``.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from typing_extensions import Self

from searchrl.agent.prompts import PROTOCOLS, TEMPLATES
from searchrl.errors import InvalidRequest

Temperature = Annotated[float, Field(ge=0)]
"""Softmax temperature (>= 0; 0 is greedy decoding)."""
TopP = Annotated[float, Field(gt=0, le=1)]
"""Nucleus mass in (0, 1]."""

_OPS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}


def _message(exc: ValidationError) -> str:
    """One line per invalid field, e.g. ``max_turns must be >= 1, got 0``."""
    parts = []
    for err in exc.errors():
        name = ".".join(str(x) for x in err["loc"]) or "value"
        op = _OPS.get(err["type"])
        if op is not None:
            parts.append(f"{name} must be {op} {next(iter(err.get('ctx', {}).values()))}, got {err['input']!r}")
        else:
            parts.append(str(err.get("ctx", {}).get("error") or f"{name}: {err['msg']}, got {err['input']!r}"))
    return "; ".join(parts)


class Checked(BaseModel):
    """A pydantic model whose validation errors are :class:`InvalidRequest`."""

    model_config = ConfigDict(extra="forbid")

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidRequest(_message(exc)) from None

    @classmethod
    def parse(cls, **kw: Any) -> Self:
        """The model of ``kw``.

        Raises:
            InvalidRequest: a value out of range or an unknown field.
        """
        return cls(**kw)


class SamplingParams(Checked):
    """Sampling parameters of one generation call.

    Attributes:
        temperature: softmax temperature (>= 0; 0 is greedy decoding).
        top_p: nucleus mass in (0, 1].
        top_k: sample among the ``top_k`` most likely tokens (-1: no limit).
        max_new_tokens: tokens the call may sample (>= 1).
    """

    model_config = ConfigDict(frozen=True)

    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: int = -1
    max_new_tokens: Annotated[int, Field(ge=1)]

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError(f"top_k must be -1 (no limit) or >= 1, got {v}")
        return v


class AgentSettings(Checked):
    """Settings of the agent loop (:class:`searchrl.agent.loop.AgentLoop`).

    Attributes:
        template: ``"research_instruct"`` (chat template + system prompt), ``"research_short"`` (the same without
            the worked example) or ``"research_base"`` (plain text).
        protocol: ``"research"`` (``<result>``) or ``"search_r1"`` (``<information>``).
        max_turns: assistant turns (generation calls) per episode.
        max_response_tokens: budget of response tokens, generated plus inserted.
        max_new_tokens_per_turn: cap of one generation call.
        top_k: documents per search.
        temperature, top_p: sampling parameters of every turn (validated as in :class:`SamplingParams`).
        response_prefix: text written at the start of the response (loss mask 0), e.g. ``"<think>"``; empty: none.
            ``{question}`` in it is replaced by the question (e.g. to force a first search for it).
        answer_prefix: text written after the observation that the last turn reads (loss mask 0), an *answer
            scaffold* such as ``"\\n<answer> \\boxed{"``: the last turn then only has to write the answer and close
            the tags. Empty: none. It is part of the response text the reward sees.
        search_timeout_s: deadline of one search, in seconds; a timeout gives an error observation.
        max_query_chars: longer queries get an error observation instead of a search.
        max_doc_chars: each document's text is cut to this many characters (0: no limit).
        max_observation_chars: the whole search result (all documents) is cut to this many characters, as verl's
            ``ToolAgentLoop`` cuts tool responses (``rollout.multi_turn.max_tool_response_length``; 0: no limit).
        truncate_side: which part of a too-long search result is kept: ``"left"`` keeps the end, ``"right"`` the
            start, ``"middle"`` both ends (verl's ``tool_response_truncate_side``).
        max_prompt_tokens: prompts longer than this are rejected (0: only the model's context window applies).
    """

    template: str = "research_instruct"
    protocol: str = "research"
    max_turns: Annotated[int, Field(ge=1)] = 4
    max_response_tokens: Annotated[int, Field(ge=1)] = 1024
    max_new_tokens_per_turn: Annotated[int, Field(ge=1)] = 256
    top_k: Annotated[int, Field(ge=1)] = 3
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    response_prefix: str = "<think>"
    answer_prefix: str = ""
    search_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    max_query_chars: Annotated[int, Field(ge=1)] = 2000
    max_doc_chars: Annotated[int, Field(ge=0)] = 0
    max_observation_chars: Annotated[int, Field(ge=0)] = 0
    truncate_side: str = "right"
    max_prompt_tokens: Annotated[int, Field(ge=0)] = 0

    @field_validator("template", "protocol", "truncate_side")
    @classmethod
    def _one_of(cls, v: str, info: ValidationInfo) -> str:
        choices = {"template": TEMPLATES, "protocol": tuple(sorted(PROTOCOLS)), "truncate_side": TRUNCATE_SIDES}
        if v not in choices[str(info.field_name)]:
            raise ValueError(f"unknown {info.field_name} {v!r}; expected one of {choices[str(info.field_name)]}")
        return v


TRUNCATE_SIDES = ("left", "right", "middle")


def episode_seed(seed: int, *keys: int | str) -> int:
    """Seed of one episode, a pure function of a base seed and keys (step, question slot, sample; dataset, example id
    ...): the first word of numpy's ``SeedSequence`` of them, a string key entering as the integer of its sha256.

    It depends neither on concurrency nor on order, so resumed and re-run episodes sample alike.

    Returns:
        An integer in ``[0, 2**32)``.
    """
    entropy = [k if isinstance(k, int) else int(hashlib.sha256(k.encode()).hexdigest(), 16) for k in (seed, *keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])
