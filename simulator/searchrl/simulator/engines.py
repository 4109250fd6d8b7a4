"""Simulation engines: one async interface over transformers (CPU), vLLM (GPU, in-process) and OpenAI-compatible servers.

Every engine implements :class:`SimulationEngine`::

    await engine.generate(prompts, SamplingParams(max_new_tokens=..., ...), stop=[...], seed=...) -> [Completion]

A prompt is either plain text (sent as is) or chat messages. When the last message is an assistant message, the
engine *continues* it (the chat template is rendered up to and including that message's text, with no end-of-turn
marker): the simulator uses this to prefill ``"Doc 1:"``. Completions exclude the prompt, the prefill and the stop
string (OpenAI semantics), and report how many tokens were generated (the cost counted in
``searchrl_simulator_engine_tokens_total``).

* :class:`TransformersSimulationEngine` - the embedded CPU default, on the shared continuous-batching
  :class:`searchrl.services.policy.engines.transformers.TransformersEngine`: concurrent ``generate`` calls (from concurrent gRPC
  requests) are decoded together in one running batch, each row with its own seeded sampler.
* :class:`VLLMSimulationEngine` - an in-process ``vllm.v1.engine.async_llm.AsyncLLM`` on a GPU; vLLM batches
  concurrent requests itself. Imported lazily.
* :class:`OpenAISimulationEngine` - one or more vLLM/SGLang servers speaking the OpenAI API (``/v1/chat/completions``
  or ``/v1/completions``) through the ``openai`` SDK, as ZeroSearch deploys its simulator: round-robin over base URLs,
  the SDK's retries with exponential backoff on connection errors, timeouts, 429 and 5xx, and per-request timeouts. A
  dead server becomes :class:`~searchrl.errors.Unavailable`, a slow one :class:`~searchrl.errors.DeadlineExceeded`.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from searchrl.agent.settings import SamplingParams
from searchrl.errors import DeadlineExceeded, FailedPrecondition, InvalidRequest, Unavailable

Message = Mapping[str, str]
Prompt = str | Sequence[Message]

ENGINES = ("transformers", "vllm", "openai")


@dataclass(frozen=True)
class Completion:
    """One generated completion.

    Attributes:
        text: the generated text, without the prompt, the prefill or the stop string.
        tokens: number of tokens generated (the engine cost of this completion).
        finish_reason: ``"stop"`` (a stop string or EOS), ``"length"`` (``max_new_tokens`` reached) or ``""``
            (unknown).
    """

    text: str
    tokens: int
    finish_reason: str = ""


class SimulationEngine(abc.ABC):
    """What the simulator needs from an LLM engine: :meth:`generate` over the engine's own :meth:`complete`."""

    #: ``"transformers"``, ``"vllm"`` or ``"openai"``.
    name: str
    #: model name or path (reported by ``GetSimulatorInfo`` and part of the cache key).
    model: str

    async def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams,
        *,
        stop: Sequence[str] = (),
        seed: int | Sequence[int] | None = None,
    ) -> list[Completion]:
        """Completes every prompt concurrently; see the module docstring for prompt and completion semantics.

        Args:
            prompts: N prompts (text or chat messages).
            sampling: sampling parameters of every prompt (``max_new_tokens`` per prompt).
            stop: generation of a prompt ends at the first of these strings (excluded from the text).
            seed: one seed per prompt, or one base seed (prompt ``i`` gets ``seed + i``), or ``None`` (unseeded).

        Returns:
            N completions, in order.

        Raises:
            InvalidRequest: a prompt the engine cannot take (too long ...) or a seed list of the wrong length.
            Unavailable: the engine is down.
            DeadlineExceeded: the engine did not answer in time.
        """
        seeds = seeds_for(len(prompts), seed)
        stops = tuple(s for s in stop if s)
        return list(
            await asyncio.gather(*(self.complete(p, sampling, stops, s) for p, s in zip(prompts, seeds, strict=True)))
        )

    @abc.abstractmethod
    async def complete(
        self, prompt: Prompt, sampling: SamplingParams, stop: tuple[str, ...], seed: int | None
    ) -> Completion:
        """One completion of one prompt, with non-empty stop strings."""

    async def close(self) -> None:  # noqa: B027 - engines without resources keep this no-op
        """Releases the engine's resources."""


def seeds_for(n: int, seed: int | Sequence[int] | None) -> list[int | None]:
    """One seed per prompt from a per-prompt list, a base seed (``seed + i``) or ``None``.

    Raises:
        InvalidRequest: a seed list whose length is not ``n``.
    """
    if seed is None:
        return [None] * n
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise InvalidRequest(f"got {n} prompts but {len(seeds)} seeds")
    return list(seeds)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cut = len(text)
    for s in stop:
        if s:
            pos = text.find(s)
            if 0 <= pos < cut:
                cut = pos
    return text[:cut], cut < len(text)


def continues_assistant(messages: Sequence[Message]) -> bool:
    """True when the last message is an assistant prefill to continue."""
    return bool(messages) and messages[-1].get("role") == "assistant"


def render_chat(tokenizer: Any, messages: Sequence[Message]) -> str:
    """Renders chat messages to prompt text with the tokenizer's chat template.

    A final assistant message is continued (``continue_final_message=True``); otherwise a generation prompt is added.

    Raises:
        InvalidRequest: no messages, or a message without ``role``/``content``.
    """
    if not messages:
        raise InvalidRequest("a chat prompt needs at least one message")
    msgs = []
    for m in messages:
        if "role" not in m or "content" not in m:
            raise InvalidRequest("every chat message needs 'role' and 'content'")
        msgs.append({"role": str(m["role"]), "content": str(m["content"])})
    if continues_assistant(msgs):
        return str(tokenizer.apply_chat_template(msgs, tokenize=False, continue_final_message=True))
    return str(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))


# --------------------------------------------------------------------------------------------------- transformers
class TransformersSimulationEngine(SimulationEngine):
    """CPU simulation on the shared continuous-batching :class:`~searchrl.services.policy.engines.transformers.TransformersEngine`.

    Args:
        model: checkpoint directory (``searchrl.assets.policy_model_path()`` for the embedded SmolLM2-135M-Instruct,
            or a fine-tuned simulator written by ``searchrl simulator sft``), or an existing ``TransformersEngine``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        max_batch_size: rows decoded together at most (requests beyond it wait for a free row).
        batch_wait_ms: how long an idle engine waits for concurrent requests to join the first prefill.
        torch_threads: intra-op threads of the generation thread (0: torch's default; 1 avoids OpenMP
            oversubscription on a few shared cores).

    Raises:
        InvalidRequest: the checkpoint cannot be loaded.
    """

    name = "transformers"

    def __init__(
        self,
        model: Any,
        *,
        dtype: str = "float32",
        max_batch_size: int = 16,
        batch_wait_ms: float = 5.0,
        torch_threads: int = 0,
    ) -> None:
        from searchrl.services.policy.engines.transformers import TransformersEngine

        if isinstance(model, TransformersEngine):
            self.engine = model
        else:
            self.engine = TransformersEngine(
                str(model),
                dtype=dtype,
                max_batch_size=max_batch_size,
                batch_wait_ms=batch_wait_ms,
                torch_threads=torch_threads,
            )
        self.model = self.engine.model_name
        self.tokenizer = self.engine.tokenizer

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt (chat messages rendered with the chat template; no extra special tokens)."""
        text = prompt if isinstance(prompt, str) else render_chat(self.tokenizer, prompt)
        return [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]

    async def complete(
        self, prompt: Prompt, sampling: SamplingParams, stop: tuple[str, ...], seed: int | None
    ) -> Completion:
        """See :meth:`SimulationEngine.complete`. Concurrent prompts join the engine's running batch."""
        out = await self.engine.generate(self.encode(prompt), sampling, stop=stop, seed=seed)
        text, hit = cut_at_stop(out.text, stop)
        reason = "length" if out.finish_reason == "length" and not hit else "stop"
        return Completion(text=text, tokens=len(out.token_ids), finish_reason=reason)

    async def close(self) -> None:
        """Stops the engine's worker thread."""
        await self.engine.close()


# --------------------------------------------------------------------------------------------------- vLLM (GPU)
class VLLMSimulationEngine(SimulationEngine):
    """GPU simulation with an in-process vLLM ``AsyncLLM`` (v1 engine; ``AsyncLLMEngine`` on older vLLM).

    ``AsyncLLM.from_engine_args(AsyncEngineArgs(model=..., **engine_kwargs))``; each prompt is one
    ``generate(TokensPrompt, SamplingParams, request_id)`` stream read to its final output
    (``RequestOutputKind.FINAL_ONLY``); vLLM's scheduler batches the concurrent requests.

    Args:
        model: model name or checkpoint directory.
        engine_kwargs: extra ``AsyncEngineArgs`` (``gpu_memory_utilization``, ``max_model_len``,
            ``tensor_parallel_size`` ...).
        tokenizer: tokenizer for the chat template (default ``AutoTokenizer.from_pretrained(model)``).
    """

    name = "vllm"

    def __init__(self, model: str, *, engine_kwargs: Mapping[str, Any] | None = None, tokenizer: Any = None) -> None:
        from vllm import SamplingParams as VLLMSamplingParams  # lazy: GPU images only
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:  # vLLM before the v1 engine
            from vllm import AsyncLLMEngine as AsyncLLM

        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = model
        self.tokenizer = tokenizer
        self._SamplingParams = VLLMSamplingParams
        self._TokensPrompt = TokensPrompt
        self._final_only = RequestOutputKind.FINAL_ONLY
        args = AsyncEngineArgs(model=model, **dict(engine_kwargs or {}))
        self._engine = AsyncLLM.from_engine_args(args)

    async def complete(
        self, prompt: Prompt, sampling: SamplingParams, stop: tuple[str, ...], seed: int | None
    ) -> Completion:
        """See :meth:`SimulationEngine.complete`: one ``AsyncLLM.generate`` stream, read to its final output."""
        text = prompt if isinstance(prompt, str) else render_chat(self.tokenizer, prompt)
        ids = [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]
        params = self._SamplingParams(
            n=1,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            stop=list(stop) or None,
            seed=seed,
            output_kind=self._final_only,
        )
        final = None
        try:
            async for out in self._engine.generate(self._TokensPrompt(prompt_token_ids=ids), params, uuid.uuid4().hex):
                final = out
        except Exception as exc:
            # VLLMValidationError (a ValueError, or a VLLMClientError in newer vLLM): prompt over max_model_len ...
            if isinstance(exc, ValueError) or type(exc).__name__ in ("VLLMValidationError", "VLLMClientError"):
                raise InvalidRequest(f"vLLM rejected the request: {exc}") from exc
            # EngineDeadError / EngineGenerateError
            raise Unavailable(f"vLLM engine failed: {type(exc).__name__}: {exc}") from exc
        if final is None or not final.outputs:
            raise Unavailable("vLLM returned no output")
        comp = final.outputs[0]
        reason = "length" if comp.finish_reason == "length" else "stop"
        return Completion(text=comp.text, tokens=len(comp.token_ids), finish_reason=reason)

    async def close(self) -> None:
        """Shuts the engine core down."""
        self._engine.shutdown()


# --------------------------------------------------------------------------------------------------- OpenAI-compatible
class OpenAISimulationEngine(SimulationEngine):
    """Simulation through OpenAI-compatible servers (vLLM ``vllm serve``, SGLang ``launch_server``) with the ``openai`` SDK.

    Chat prompts go to ``POST {base}/v1/chat/completions``; a final assistant message is continued with
    ``continue_final_message: true`` and ``add_generation_prompt: false`` (vLLM and SGLang extensions). Text prompts go
    to ``POST {base}/v1/completions``. One HTTP request per prompt; the server batches concurrent requests.

    Args:
        base_urls: server base URLs (``http://sim-0:8000``, with or without ``/v1``); one ``openai.AsyncOpenAI`` client
            each, and requests rotate over them (round robin).
        model: the served model name (the ``model`` field of each request).
        api_key: bearer token for the servers (never logged); empty for none (the SDK then sends ``EMPTY``).
        timeout_s: read timeout of one attempt, in seconds; a server that exceeds it on every attempt raises
            :class:`DeadlineExceeded`.
        connect_timeout_s: TCP connect timeout, in seconds.
        max_attempts: attempts per prompt (>= 1): the SDK retries connection errors, timeouts, 408, 409, 429 and 5xx
            on the same server with exponential backoff and jitter (0.5 s doubling up to 8 s, or the server's
            ``Retry-After``).
        max_concurrency: requests in flight at once, over all servers.

    Raises:
        InvalidRequest: no base URL.
    """

    name = "openai"

    def __init__(
        self,
        base_urls: Sequence[str],
        model: str,
        *,
        api_key: str = "",
        timeout_s: float = 120.0,
        connect_timeout_s: float = 5.0,
        max_attempts: int = 3,
        max_concurrency: int = 64,
    ) -> None:
        import openai

        urls = [u.strip().rstrip("/") for u in base_urls if u.strip()]
        if not urls:
            raise InvalidRequest("the openai engine needs at least one base URL (--openai-base-urls)")
        self.base_urls = [u.removesuffix("/v1") for u in urls]
        self.model = model
        self.max_attempts = max(1, int(max_attempts))
        self._openai = openai
        self._clients = [
            openai.AsyncOpenAI(
                base_url=f"{u}/v1",
                api_key=api_key or "EMPTY",
                max_retries=self.max_attempts - 1,
                timeout=openai.Timeout(timeout_s, connect=connect_timeout_s),
            )
            for u in self.base_urls
        ]
        self._rr = itertools.cycle(range(len(self._clients)))
        self._sem = asyncio.Semaphore(max(1, max_concurrency))

    async def complete(
        self, prompt: Prompt, sampling: SamplingParams, stop: tuple[str, ...], seed: int | None
    ) -> Completion:
        """See :meth:`SimulationEngine.complete`.

        Raises:
            Unavailable: every attempt failed with a connection error, 429 or 5xx, or the reply was malformed.
            DeadlineExceeded: a server accepted the request but did not answer within ``timeout_s``.
            InvalidRequest: a server answered 400.
            FailedPrecondition: a server answered another 4xx (wrong model name, bad API key ...).
        """
        openai, i = self._openai, next(self._rr)
        client, base = self._clients[i], self.base_urls[i]
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "n": 1,
        }
        if stop:
            body["stop"] = list(stop)
        if seed is not None:
            body["seed"] = int(seed)
        extra: dict[str, Any] = {"top_k": sampling.top_k} if sampling.top_k != -1 else {}  # a vLLM/SGLang extension
        lost = f"simulation engine unavailable after {self.max_attempts} attempts; last error: {base}"
        try:
            async with self._sem:
                if isinstance(prompt, str):
                    reply: Any = await client.completions.create(prompt=prompt, extra_body=extra or None, **body)
                else:
                    messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
                    if not messages:
                        raise InvalidRequest("a chat prompt needs at least one message")
                    if continues_assistant(messages):
                        extra.update(continue_final_message=True, add_generation_prompt=False)
                    reply = await client.chat.completions.create(messages=messages, extra_body=extra or None, **body)
        except openai.APITimeoutError as exc:
            if type(exc.__cause__).__name__ == "ConnectTimeout":
                raise Unavailable(f"{lost}: connect timeout") from exc
            raise DeadlineExceeded(f"simulation engine {base} did not answer within the timeout") from exc
        except openai.APIConnectionError as exc:  # connection refused / reset, DNS ...
            raise Unavailable(f"{lost}: {type(exc.__cause__ or exc).__name__}: {exc.__cause__ or exc}") from exc
        except openai.APIStatusError as exc:
            code, text = exc.status_code, str(exc.message)[:300]
            if code == 400:
                raise InvalidRequest(f"simulation engine rejected the request: {text}") from exc
            if code in (408, 409, 429) or code >= 500:
                raise Unavailable(f"{lost}: HTTP {code}: {text}") from exc
            raise FailedPrecondition(f"simulation engine {base} answered HTTP {code}: {text}") from exc
        except openai.APIError as exc:  # a body that is not a completion
            raise Unavailable(f"simulation engine {base} sent a malformed reply: {exc}") from exc
        if not getattr(reply, "choices", None):
            raise Unavailable(f"simulation engine {base} sent a reply without choices")
        choice = reply.choices[0]
        text = (choice.text if isinstance(prompt, str) else choice.message.content) or ""
        text, _ = cut_at_stop(text, stop)  # servers already exclude the stop string; a no-op then
        tokens = int(reply.usage.completion_tokens or 0) if reply.usage else 0
        reason = "length" if choice.finish_reason == "length" else "stop"
        return Completion(text=text, tokens=tokens, finish_reason=reason)

    async def close(self) -> None:
        """Closes the HTTP connection pools."""
        await asyncio.gather(*(c.close() for c in self._clients))


def make_engine(
    kind: str,
    model: str,
    *,
    openai_base_urls: Sequence[str] = (),
    openai_api_key: str = "",
    timeout_s: float = 120.0,
    max_attempts: int = 3,
    max_batch_size: int = 16,
    dtype: str = "float32",
    torch_threads: int = 0,
    vllm_kwargs: Mapping[str, Any] | None = None,
) -> SimulationEngine:
    """Builds the engine named by ``kind``.

    Args:
        kind: ``"transformers"``, ``"vllm"`` or ``"openai"``.
        model: for transformers/vLLM a checkpoint directory or model name (``"smollm2-135m-instruct"`` is the
            embedded model); for openai the served model name.
        openai_base_urls, openai_api_key, timeout_s, max_attempts: see :class:`OpenAISimulationEngine`.
        max_batch_size, dtype, torch_threads: see :class:`TransformersSimulationEngine`.
        vllm_kwargs: extra ``AsyncEngineArgs`` for vLLM.

    Raises:
        InvalidRequest: an unknown kind or missing base URLs.
    """
    if kind == "transformers":
        from searchrl.assets import policy_model_path

        return TransformersSimulationEngine(
            policy_model_path(model), dtype=dtype, max_batch_size=max_batch_size, torch_threads=torch_threads
        )
    if kind == "vllm":
        from searchrl.assets import policy_model_path

        return VLLMSimulationEngine(policy_model_path(model), engine_kwargs=vllm_kwargs)
    if kind == "openai":
        return OpenAISimulationEngine(
            openai_base_urls, model, api_key=openai_api_key, timeout_s=timeout_s, max_attempts=max_attempts
        )
    raise InvalidRequest(f"unknown simulation engine {kind!r}; expected one of {', '.join(ENGINES)}")
