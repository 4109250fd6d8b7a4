"""Simulation engines: one async interface over transformers (CPU), vLLM (GPU, in-process) and OpenAI-compatible servers.

Every engine implements :class:`SimulationEngine`::

    await engine.generate(prompts, max_tokens=..., temperature=..., top_p=..., stop=[...], seed=...) -> [Completion]

A prompt is either plain text (sent as is) or chat messages. When the last message is an assistant message, the
engine *continues* it (the chat template is rendered up to and including that message's text, with no end-of-turn
marker): the simulator uses this to prefill ``"Doc 1:"``. Completions exclude the prompt, the prefill and the stop
string (OpenAI semantics), and report how many tokens were generated (the cost counted in
``searchrl_simulator_engine_tokens_total``).

* :class:`TransformersSimulationEngine` - the embedded CPU default, on the shared continuous-batching
  :class:`searchrl.services.policy.engines.TransformersEngine`: concurrent ``generate`` calls (from concurrent gRPC
  requests) are decoded together in one running batch, each row with its own seeded sampler.
* :class:`VLLMSimulationEngine` - an in-process ``vllm.v1.engine.async_llm.AsyncLLM`` on a GPU; vLLM batches
  concurrent requests itself. Imported lazily.
* :class:`OpenAISimulationEngine` - one or more vLLM/SGLang servers speaking the OpenAI API (``/v1/chat/completions``
  or ``/v1/completions``), as ZeroSearch deploys its simulator: round-robin over base URLs, retries with exponential
  backoff on connection errors, 429 and 5xx, and per-request timeouts. A dead server becomes
  :class:`~searchrl.errors.Unavailable`, a slow one :class:`~searchrl.errors.DeadlineExceeded`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from searchrl.errors import DeadlineExceeded, FailedPrecondition, InvalidRequest, Unavailable

log = logging.getLogger("searchrl.simulator.engines")

Message = Mapping[str, str]
Prompt = str | Sequence[Message]

ENGINES = ("transformers", "vllm", "openai")


@dataclass(frozen=True)
class Completion:
    """One generated completion.

    Attributes:
        text: the generated text, without the prompt, the prefill or the stop string.
        tokens: number of tokens generated (the engine cost of this completion).
        finish_reason: ``"stop"`` (a stop string or EOS), ``"length"`` (``max_tokens`` reached) or ``""`` (unknown).
    """

    text: str
    tokens: int
    finish_reason: str = ""


class SimulationEngine(Protocol):
    """What the simulator needs from an LLM engine."""

    #: ``"transformers"``, ``"vllm"`` or ``"openai"``.
    name: str
    #: model name or path (reported by ``GetSimulatorInfo`` and part of the cache key).
    model: str

    async def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int,
        temperature: float = 0.7,
        top_p: float = 0.95,
        stop: Sequence[str] = (),
        seed: int | Sequence[int] | None = None,
    ) -> list[Completion]:
        """Completes every prompt; see the module docstring for prompt and completion semantics.

        Args:
            prompts: N prompts (text or chat messages).
            max_tokens: at most this many new tokens per prompt (>= 1).
            temperature: sampling temperature (>= 0; 0 is greedy).
            top_p: nucleus mass in (0, 1].
            stop: generation of a prompt ends at the first of these strings (excluded from the text).
            seed: one seed per prompt, or one base seed (prompt ``i`` gets ``seed + i``), or ``None`` (unseeded).

        Returns:
            N completions, in order.

        Raises:
            InvalidRequest: bad sampling parameters or a prompt the engine cannot take (too long ...).
            Unavailable: the engine is down.
            DeadlineExceeded: the engine did not answer in time.
        """
        ...

    async def close(self) -> None:
        """Releases the engine's resources."""
        ...


def check_sampling(max_tokens: int, temperature: float, top_p: float) -> None:
    """Validates sampling parameters.

    Raises:
        InvalidRequest: ``max_tokens < 1``, ``temperature < 0`` or ``top_p`` outside (0, 1].
    """
    if max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}")
    if temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")


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
class TransformersSimulationEngine:
    """CPU simulation on the shared continuous-batching :class:`~searchrl.services.policy.engines.TransformersEngine`.

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
        from searchrl.services.policy.engines import TransformersEngine

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

    async def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int,
        temperature: float = 0.7,
        top_p: float = 0.95,
        stop: Sequence[str] = (),
        seed: int | Sequence[int] | None = None,
    ) -> list[Completion]:
        """See :meth:`SimulationEngine.generate`. All prompts join the engine's running batch at once."""
        check_sampling(max_tokens, temperature, top_p)
        seeds = seeds_for(len(prompts), seed)
        ids = [self.encode(p) for p in prompts]
        outs = await asyncio.gather(
            *(
                self.engine.generate(
                    x, max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop), seed=s
                )
                for x, s in zip(ids, seeds, strict=True)
            )
        )
        completions = []
        for out in outs:
            text, hit = cut_at_stop(out.text, stop)
            reason = "length" if out.finish_reason == "length" and not hit else "stop"
            completions.append(Completion(text=text, tokens=len(out.token_ids), finish_reason=reason))
        return completions

    async def close(self) -> None:
        """Stops the engine's worker thread."""
        await self.engine.close()


# --------------------------------------------------------------------------------------------------- vLLM (GPU)
class VLLMSimulationEngine:
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
        from vllm import SamplingParams  # lazy: GPU images only
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
        self._SamplingParams = SamplingParams
        self._TokensPrompt = TokensPrompt
        self._final_only = RequestOutputKind.FINAL_ONLY
        args = AsyncEngineArgs(model=model, **dict(engine_kwargs or {}))
        self._engine = AsyncLLM.from_engine_args(args)

    async def _one(self, ids: list[int], params: Any) -> Completion:
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

    async def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int,
        temperature: float = 0.7,
        top_p: float = 0.95,
        stop: Sequence[str] = (),
        seed: int | Sequence[int] | None = None,
    ) -> list[Completion]:
        """See :meth:`SimulationEngine.generate`."""
        check_sampling(max_tokens, temperature, top_p)
        seeds = seeds_for(len(prompts), seed)
        jobs = []
        for p, s in zip(prompts, seeds, strict=True):
            text = p if isinstance(p, str) else render_chat(self.tokenizer, p)
            ids = [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]
            params = self._SamplingParams(
                n=1,
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                stop=[x for x in stop if x] or None,
                seed=s,
                output_kind=self._final_only,
            )
            jobs.append(self._one(ids, params))
        return list(await asyncio.gather(*jobs))

    async def close(self) -> None:
        """Shuts the engine core down."""
        self._engine.shutdown()


# --------------------------------------------------------------------------------------------------- OpenAI-compatible
class OpenAISimulationEngine:
    """Simulation through OpenAI-compatible servers (vLLM ``vllm serve``, SGLang ``launch_server``) with httpx.

    Chat prompts go to ``POST {base}/v1/chat/completions``; a final assistant message is continued with
    ``continue_final_message: true`` and ``add_generation_prompt: false`` (vLLM and SGLang extensions). Text prompts go
    to ``POST {base}/v1/completions``. One HTTP request per prompt; the server batches concurrent requests.

    Args:
        base_urls: server base URLs (``http://sim-0:8000``); requests rotate over them (round robin) and a retry goes
            to the next one.
        model: the served model name (the ``model`` field of each request).
        api_key: bearer token for the servers (never logged); empty for none.
        timeout_s: read timeout of one request, in seconds; exceeding it raises :class:`DeadlineExceeded`.
        connect_timeout_s: TCP connect timeout, in seconds.
        max_attempts: attempts per prompt on connection errors, 429 and 5xx (>= 1), with exponential backoff.
        backoff_s: first backoff, in seconds (doubles per attempt, with jitter).
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
        backoff_s: float = 0.2,
        max_concurrency: int = 64,
    ) -> None:
        import httpx

        urls = [u.strip().rstrip("/") for u in base_urls if u.strip()]
        if not urls:
            raise InvalidRequest("the openai engine needs at least one base URL (--openai-base-urls)")
        self.base_urls = [u[: -len("/v1")] if u.endswith("/v1") else u for u in urls]
        self.model = model
        self.max_attempts = max(1, int(max_attempts))
        self.backoff_s = max(0.0, backoff_s)
        self._rr = itertools.cycle(range(len(self.base_urls)))
        self._sem = asyncio.Semaphore(max(1, max_concurrency))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            headers=headers,
            limits=httpx.Limits(
                max_connections=max(1, max_concurrency), max_keepalive_connections=max(1, max_concurrency)
            ),
        )
        self._httpx = httpx

    def _payload(
        self, prompt: Prompt, max_tokens: int, temperature: float, top_p: float, stop: Sequence[str], seed: int | None
    ) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "n": 1,
        }
        stops = [s for s in stop if s]
        if stops:
            body["stop"] = stops
        if seed is not None:
            body["seed"] = int(seed)
        if isinstance(prompt, str):
            body["prompt"] = prompt
            return "/v1/completions", body
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        if not messages:
            raise InvalidRequest("a chat prompt needs at least one message")
        body["messages"] = messages
        if continues_assistant(messages):
            body["continue_final_message"] = True
            body["add_generation_prompt"] = False
        return "/v1/chat/completions", body

    async def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        httpx = self._httpx
        last = ""
        for attempt in range(self.max_attempts):
            base = self.base_urls[next(self._rr)]
            url = base + route
            try:
                async with self._sem:
                    resp = await self._http.post(url, json=body)
            except httpx.TimeoutException as exc:
                if isinstance(exc, httpx.ConnectTimeout):
                    last = f"{base}: connect timeout"
                else:
                    raise DeadlineExceeded(f"simulation engine {base} did not answer within the timeout") from exc
            except httpx.TransportError as exc:  # connection refused / reset, DNS ...
                last = f"{base}: {type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 429 or resp.status_code >= 500:
                    last = f"{base}: HTTP {resp.status_code}: {resp.text[:200]}"
                elif resp.status_code == 400:
                    raise InvalidRequest(f"simulation engine rejected the request: {resp.text[:300]}")
                elif resp.status_code >= 400:
                    raise FailedPrecondition(
                        f"simulation engine {base} answered HTTP {resp.status_code}: {resp.text[:200]}"
                    )
                else:
                    try:
                        data = resp.json()
                    except ValueError as exc:
                        raise Unavailable(f"simulation engine {base} sent a body that is not JSON") from exc
                    if not isinstance(data, dict) or not data.get("choices"):
                        raise Unavailable(f"simulation engine {base} sent a reply without choices")
                    return data
            if attempt + 1 < self.max_attempts:
                delay = self.backoff_s * (2**attempt) * (0.5 + random.random())
                log.warning("simulation engine call failed (%s); retrying in %.2fs", last, delay)
                await asyncio.sleep(delay)
        raise Unavailable(f"simulation engine unavailable after {self.max_attempts} attempts; last error: {last}")

    async def _one(
        self, prompt: Prompt, max_tokens: int, temperature: float, top_p: float, stop: Sequence[str], seed: int | None
    ) -> Completion:
        route, body = self._payload(prompt, max_tokens, temperature, top_p, stop, seed)
        data = await self._post(route, body)
        choice = data["choices"][0]
        if route.endswith("/chat/completions"):
            text = str((choice.get("message") or {}).get("content") or "")
        else:
            text = str(choice.get("text") or "")
        text, _ = cut_at_stop(text, stop)  # servers already exclude the stop string; a no-op then
        usage = data.get("usage") or {}
        tokens = int(usage.get("completion_tokens") or 0)
        reason = "length" if choice.get("finish_reason") == "length" else "stop"
        return Completion(text=text, tokens=tokens, finish_reason=reason)

    async def generate(
        self,
        prompts: Sequence[Prompt],
        *,
        max_tokens: int,
        temperature: float = 0.7,
        top_p: float = 0.95,
        stop: Sequence[str] = (),
        seed: int | Sequence[int] | None = None,
    ) -> list[Completion]:
        """See :meth:`SimulationEngine.generate`.

        Raises:
            Unavailable: every attempt failed with a connection error, 429 or 5xx, or the reply was malformed.
            DeadlineExceeded: a server accepted the request but did not answer within ``timeout_s``.
            InvalidRequest: a server answered 400.
            FailedPrecondition: a server answered another 4xx (wrong model name, bad API key ...).
        """
        check_sampling(max_tokens, temperature, top_p)
        seeds = seeds_for(len(prompts), seed)
        return list(
            await asyncio.gather(
                *(self._one(p, max_tokens, temperature, top_p, stop, s) for p, s in zip(prompts, seeds, strict=True))
            )
        )

    async def close(self) -> None:
        """Closes the HTTP connection pool."""
        await self._http.aclose()


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
