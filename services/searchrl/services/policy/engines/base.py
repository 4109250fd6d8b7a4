"""The engine contract of the PolicyService (:class:`PolicyEngine`) and what its engines share (:class:`EngineBase`).

Log-probs are natural-log probabilities of each sampled token under the model's raw next-token distribution
(``log_softmax`` of the logits, before temperature / top-p / top-k): what the trainer's forward pass computes
(``GRPOUpdater.forward_logprobs`` in :mod:`searchrl.trainer.local.update`, verl's ``logprobs_from_logits``), so the
two agree at any sampling temperature (:class:`~searchrl.services.policy.engines.sglang.SGLangEngine` sets
``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` for this; seeds: see each engine).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol

from searchrl.agent.loop import GenerationBackend
from searchrl.agent.settings import SamplingParams
from searchrl.errors import InvalidRequest


class PolicyEngine(GenerationBackend, Protocol):
    """What the PolicyService, the evaluator and the trainer use of an engine (both engines of this package):
    :meth:`~searchrl.agent.loop.GenerationBackend.generate` and the following.

    Attributes:
        engine_name: ``"transformers"`` or ``"sglang"``.
        model_name: model name or checkpoint directory it was built from.
        max_context_tokens: the model's context window, in tokens (prompt + completion).
        vocab_size: size of the vocabulary; token ids are in ``[0, vocab_size)``.
    """

    engine_name: str
    model_name: str
    max_context_tokens: int
    vocab_size: int

    @property
    def version(self) -> str:
        """Version label of the weights new requests are served with."""
        ...

    @property
    def eos_token_id(self) -> int:
        """The primary EOS token id."""
        ...

    async def load_weights(self, path: str, version: str = "") -> str:
        """Hot-swaps the weights from a checkpoint directory; returns the version now serving."""
        ...

    async def close(self) -> None:
        """Releases the engine (worker thread, in-process server, HTTP client)."""
        ...


class EngineBase:
    """Shared by the engines: the version label, request checks and :meth:`generate_text`."""

    tokenizer: Any
    max_context_tokens: int
    _version = "0"
    generated_tokens = 0  # tokens sampled so far

    @property
    def version(self) -> str:
        """Version label of the weights new requests are served with."""
        return self._version

    def check_request(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> SamplingParams:
        """Checks the prompt of one request; returns ``sampling`` with ``max_new_tokens`` clamped to the context left
        after the prompt (the sampling values were validated when ``sampling`` was built).

        Raises:
            InvalidRequest: an empty prompt, or a prompt that fills the context window.
        """
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        if len(prompt_ids) >= self.max_context_tokens:
            raise InvalidRequest(
                f"prompt has {len(prompt_ids)} tokens; the model's context window is {self.max_context_tokens} tokens"
            )
        left = self.max_context_tokens - len(prompt_ids)
        return sampling.model_copy(update={"max_new_tokens": min(sampling.max_new_tokens, left)})

    async def generate_text(
        self: PolicyEngine,
        prompts: Sequence[str],
        sampling: SamplingParams,
        *,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[str]:
        """Text in, text out: completes each prompt (tokenised without special tokens) concurrently.

        Args:
            prompts: prompt strings (apply a chat template first if the model needs one).
            sampling, stop: as in :meth:`PolicyEngine.generate`.
            seed: prompt ``i`` is sampled with ``seed + i`` (``None``: unseeded).

        Returns:
            One completion text per prompt, in order.

        Raises:
            InvalidRequest: an empty prompt.
        """
        outs = await asyncio.gather(
            *(
                self.generate(
                    self.tokenizer.encode(p, add_special_tokens=False),
                    sampling,
                    stop=stop,
                    seed=None if seed is None else seed + i,
                )
                for i, p in enumerate(prompts)
            )
        )
        return [o.text for o in outs]
