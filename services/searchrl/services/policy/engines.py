"""Policy inference engines behind one async interface (:class:`searchrl.agent.loop.GenerationBackend`).

* :class:`TransformersEngine` - the CPU default. Concurrent :meth:`~TransformersEngine.generate` calls are joined into
  one running batch over a shared KV cache (continuous batching at token granularity: a request that arrives while
  others decode is prefilled and merged into the batch at the next step; a finished row leaves at once). Every row
  keeps its own sampling parameters and its own seeded ``torch.Generator``, so a seeded request samples the same
  tokens whatever else is in the batch (up to float rounding of padded attention).
* :class:`SGLangEngine` - GPU: an in-process ``sglang.Engine`` (``async_generate`` with ``return_logprob``) or a
  remote SGLang server's native ``POST /generate`` API.
* :class:`RemotePolicyBackend` - the PolicyService ``Generate`` RPC, so an agent loop can drive a remote policy.

Log-probs are natural-log probabilities of each sampled token under the model's raw next-token distribution
(``log_softmax`` of the logits, before temperature / top-p / top-k): what the trainer's forward pass computes
(``trainer/searchrl/trainer/local.py`` ``_forward_logprobs``, verl's ``logprobs_from_logits``), so the two agree at any sampling
temperature. SGLang's are ``log_softmax(logits / temperature)`` unless ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``, which
:class:`SGLangEngine` sets for its in-process engine.

Seeds: :class:`TransformersEngine` reproduces a seeded request's tokens (per request, whatever the batch);
:class:`SGLangEngine` only with deterministic inference on (``deterministic=True``), otherwise SGLang ignores seeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchrl.agent.loop import GenerationOutput
from searchrl.errors import InvalidRequest, Unavailable

log = logging.getLogger("searchrl.policy.engines")

_DTYPES = ("float32", "bfloat16", "float16")

# SGLang returns log_softmax(logits) (before temperature) only when its scheduler processes see this set to 1.
RAW_LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"


def validate_sampling(max_new_tokens: int, temperature: float, top_p: float, top_k: int = 0) -> None:
    """Checks sampling parameters.

    Raises:
        InvalidRequest: ``max_new_tokens < 1``, ``temperature < 0``, ``top_p`` outside (0, 1] or ``top_k < 0``.
    """
    if max_new_tokens < 1:
        raise InvalidRequest(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise InvalidRequest(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0, got {top_k}")


@dataclass(eq=False)
class _Request:
    """One generation request travelling from the event loop to the worker thread."""

    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[GenerationOutput]
    cancelled: bool = False
    # Filled by the worker.
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    generator: Any = None
    version: str = ""
    stop_tail_tokens: int = 0


class TransformersEngine:
    """CPU generation with a transformers causal LM: continuous batching, stop strings, log-probs, hot-swap.

    Args:
        model_path_or_model: a checkpoint directory / model name for ``AutoModelForCausalLM.from_pretrained``, or
            an already-built ``PreTrainedModel`` (e.g. the live training model of the local trainer).
        tokenizer: a tokenizer, or ``None`` to load it from the checkpoint (required when passing a model object
            whose ``name_or_path`` is not a loadable directory).
        dtype: ``"float32"`` (default; needed for 1e-4 log-prob agreement), ``"bfloat16"`` or ``"float16"``.
        max_batch_size: rows decoded together at most; further requests wait in the queue.
        batch_wait_ms: when the engine is idle, how long the first request waits for others to join its prefill.
        version: label of the initial weights (default ``"0"``).
        prefix_cache: reuse the KV of the prompt prefix shared by concurrent requests (the system prompt of every
            episode, and so every later turn of them) instead of recomputing it in each prefill.
        min_prefix_tokens: shortest common prefix worth caching.
        torch_threads: intra-op threads of the generation thread (0: torch's default). On a few shared cores, 1
            avoids OpenMP oversubscription (measured 4-10x faster decode steps on 2 busy cores).

    Raises:
        InvalidRequest: an unknown ``dtype`` or ``max_batch_size < 1``.
    """

    engine_name = "transformers"

    def __init__(
        self,
        model_path_or_model: Any,
        tokenizer: Any = None,
        dtype: str = "float32",
        max_batch_size: int = 16,
        batch_wait_ms: float = 5.0,
        version: str = "0",
        prefix_cache: bool = True,
        min_prefix_tokens: int = 32,
        torch_threads: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise InvalidRequest(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if max_batch_size < 1:
            raise InvalidRequest(f"max_batch_size must be >= 1, got {max_batch_size}")
        import torch
        from transformers import AutoTokenizer

        self._torch = torch
        self.dtype = dtype
        self.max_batch_size = max_batch_size
        self.batch_wait_s = max(0.0, batch_wait_ms) / 1000.0
        if isinstance(model_path_or_model, (str, Path)):
            self.model_name = str(model_path_or_model)
            model = self._load(self.model_name)
        else:
            model = model_path_or_model
            self.model_name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(self.model_name)
        self._model = model
        self._version = version
        self._pending_swap: tuple[Any, str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[str]]]] | None = None
        self._swap_lock = threading.Lock()
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._waiting: list[_Request] = []
        self._closed = False
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self.prefix_cache = prefix_cache
        self.min_prefix_tokens = max(1, min_prefix_tokens)
        self.torch_threads = torch_threads
        self._prefix: tuple[tuple[int, str], list[int], list[tuple[Any, Any]]] | None = None
        self.generated_tokens = 0
        self.num_running = 0  # rows decoding now (read-only outside the worker)
        self.eos_token_ids = self._eos_ids(model)
        pad = getattr(model.config, "pad_token_id", None)
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        self.pad_token_id = int(pad if not isinstance(pad, list) else pad[0])
        self.max_context_tokens = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        self.vocab_size = int(getattr(model.config, "vocab_size", 0) or len(self.tokenizer))

    # ----------------------------------------------------------------------------------------------- properties
    @property
    def version(self) -> str:
        """Version label of the weights new requests are served with."""
        return self._version

    @property
    def model(self) -> Any:
        """The model object currently serving."""
        return self._model

    @property
    def eos_token_id(self) -> int:
        """The primary EOS token id."""
        tok = self.tokenizer.eos_token_id
        return int(tok) if tok is not None else min(self.eos_token_ids)

    def _eos_ids(self, model: Any) -> set[int]:
        ids: set[int] = set()
        gen_cfg = getattr(model, "generation_config", None)
        for src in (
            getattr(gen_cfg, "eos_token_id", None),
            getattr(model.config, "eos_token_id", None),
            self.tokenizer.eos_token_id,
        ):
            if src is None:
                continue
            ids.update(int(x) for x in (src if isinstance(src, (list, tuple)) else [src]))
        if not ids:
            raise InvalidRequest("the model has no EOS token id (config.eos_token_id / tokenizer.eos_token)")
        return ids

    def _load(self, path: str) -> Any:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(self._torch, self.dtype))
        except OSError as exc:
            raise InvalidRequest(f"cannot load a causal LM from {path!r}: {exc}") from exc
        model.eval()  # type: ignore[no-untyped-call,unused-ignore]
        return model

    # ----------------------------------------------------------------------------------------------- public API
    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        top_k: int = 0,
    ) -> GenerationOutput:
        """Samples one completion of ``prompt_ids``.

        Args:
            prompt_ids: prompt token ids, length >= 1.
            max_new_tokens: at most this many new tokens (clamped to the context left after the prompt).
            temperature: softmax temperature; 0 is greedy.
            top_p: nucleus mass in (0, 1].
            stop: generation stops after the first token whose decoded text completes any of these strings; the
                stop string stays in ``text`` (the token that completed it may carry a few characters after it).
            seed: makes the sampled tokens reproducible (per request, independent of batching).
            top_k: keep the k most likely tokens; 0 disables.

        Returns:
            The completion: ``token_ids`` (the EOS token is included when sampled), ``logprobs`` (one per token,
            natural log of ``softmax(logits)`` before temperature/top-p/top-k), ``text`` (special tokens skipped)
            and ``finish_reason`` ``"stop"``, ``"eos"`` or ``"length"``.

        Raises:
            InvalidRequest: empty prompt, a token id outside the vocabulary, a prompt that fills the context window,
                or bad sampling parameters.
            Unavailable: the engine is closed or the forward pass failed.
        """
        validate_sampling(max_new_tokens, temperature, top_p, top_k)
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        if len(prompt_ids) >= self.max_context_tokens:
            raise InvalidRequest(
                f"prompt has {len(prompt_ids)} tokens; the model's context window is {self.max_context_tokens} tokens"
            )
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {self.vocab_size})")
        if self._closed:
            raise Unavailable("the engine is closed")
        loop = asyncio.get_running_loop()
        req = _Request(
            prompt_ids=list(prompt_ids),
            max_new_tokens=min(max_new_tokens, self.max_context_tokens - len(prompt_ids)),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            stop=tuple(s for s in stop if s),
            seed=seed,
            loop=loop,
            future=loop.create_future(),
        )
        self._ensure_worker()
        self._queue.put(req)
        try:
            return await req.future
        except asyncio.CancelledError:
            req.cancelled = True  # the worker drops the row at its next step
            raise

    async def generate_text(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[str]:
        """Text in, text out: completes each prompt (tokenised without special tokens) concurrently.

        Args:
            prompts: prompt strings (apply a chat template first if the model needs one).
            max_new_tokens, temperature, top_p, stop: as in :meth:`generate`.
            seed: prompt ``i`` is sampled with ``seed + i`` (``None``: unseeded).

        Returns:
            One completion text per prompt, in order.

        Raises:
            InvalidRequest: an empty prompt or bad sampling parameters.
        """
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = await asyncio.gather(
            *(
                self.generate(
                    i_ids,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    stop=stop,
                    seed=None if seed is None else seed + i,
                )
                for i, i_ids in enumerate(ids)
            )
        )
        return [o.text for o in outs]

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template."""
        out: Any = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=add_generation_prompt
        )
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return [int(x) for x in out]

    async def load_weights(self, path: str, version: str = "") -> str:
        """Hot-swaps the weights from a checkpoint directory.

        The new model is loaded in a worker thread while serving goes on; then requests already decoding finish on
        the old weights, and every request admitted afterwards uses the new ones. Returns once the new weights serve.

        Args:
            path: a Hugging Face checkpoint directory with the same architecture and tokenizer.
            version: label of the new weights; empty means the directory name.

        Returns:
            The version now serving.

        Raises:
            InvalidRequest: ``path`` does not exist or does not hold a loadable causal LM.
        """
        if not Path(path).exists():
            raise InvalidRequest(f"checkpoint path {path!r} does not exist")
        model = await asyncio.to_thread(self._load, path)
        return await self.swap_model(model, version or Path(path).name)

    async def swap_model(self, model: Any, version: str) -> str:
        """Serves ``model`` (same tokenizer) from the next admission on; waits until it serves. Returns ``version``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        with self._swap_lock:
            if self._pending_swap is None:
                self._pending_swap = (model, version, [(loop, fut)])
            else:  # a newer swap replaces a pending one; both callers learn the final version
                self._pending_swap = (model, version, [*self._pending_swap[2], (loop, fut)])
        self._ensure_worker()
        self._queue.put(None)  # wake the worker
        return await fut

    def set_model(self, model: Any, version: str) -> None:
        """Shares a live model object (e.g. the local trainer's policy) without waiting.

        Rows decoding now finish on the previous model; rows admitted afterwards use ``model``. Callers that
        update ``model`` in place must not do so while a generation is running on it.
        """
        with self._swap_lock:
            waiters = self._pending_swap[2] if self._pending_swap else []
            self._pending_swap = (model, version, waiters)
        self._ensure_worker()
        self._queue.put(None)

    async def close(self) -> None:
        """Stops the worker thread; pending requests fail with :class:`Unavailable`."""
        await asyncio.to_thread(self.shutdown)

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Synchronous :meth:`close` (for code outside an event loop)."""
        self._closed = True
        self._queue.put(None)
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    # ----------------------------------------------------------------------------------------------- worker
    def _ensure_worker(self) -> None:
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._worker, name="searchrl-policy-engine", daemon=True)
                self._thread.start()

    def _resolve(
        self, req: _Request, result: GenerationOutput | None = None, error: BaseException | None = None
    ) -> None:
        def _set() -> None:
            if req.future.done():
                return
            if error is not None:
                req.future.set_exception(error)
            else:
                req.future.set_result(result)  # type: ignore[arg-type,unused-ignore]

        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits for this result
            req.loop.call_soon_threadsafe(_set)

    def _collect(self, block: bool) -> None:
        """Moves queued requests to ``self._waiting``; blocks for the first one when ``block``."""
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return
        if item is not None:
            self._waiting.append(item)
            if block and self.batch_wait_s:
                deadline = time.monotonic() + self.batch_wait_s
                while len(self._waiting) < self.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        more = self._queue.get(timeout=left)
                    except queue.Empty:
                        break
                    if more is not None:
                        self._waiting.append(more)
        while True:
            try:
                more = self._queue.get_nowait()
            except queue.Empty:
                return
            if more is not None:
                self._waiting.append(more)

    def _apply_swap(self) -> None:
        with self._swap_lock:
            pending, self._pending_swap = self._pending_swap, None
        if pending is None:
            return
        model, version, waiters = pending
        self._model = model
        self._version = version
        log.info("policy weights now %s", version)
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_set_if_pending, fut, version)

    def _worker(self) -> None:
        torch = self._torch
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)  # per calling thread under OpenMP: set it here
        batch: _Batch | None = None
        while True:
            if self._closed:
                err = Unavailable("the engine is closed")
                for req in [*self._waiting, *(batch.rows if batch else [])]:
                    self._resolve(req, error=err)
                self._waiting.clear()
                return
            self._collect(block=batch is None and not self._waiting and self._pending_swap is None)
            if batch is None and self._pending_swap is not None:
                self._apply_swap()  # nothing in flight: the swap is immediate
            try:
                with torch.no_grad():
                    # Admit waiting requests unless a weight swap waits for the running rows to drain.
                    if self._waiting and self._pending_swap is None:
                        room = self.max_batch_size - (len(batch.rows) if batch else 0)
                        admit = [r for r in self._waiting[:room] if not r.cancelled]
                        self._waiting = self._waiting[room:]
                        if admit:
                            batch = self._admit(batch, admit)
                    if batch is not None:
                        batch = self._step(batch)
                    self.num_running = len(batch.rows) if batch is not None else 0
            except Exception as exc:  # a failed forward pass fails the rows in it, never the worker
                log.exception("generation step failed")
                failed = batch.rows if batch else []
                for req in failed:
                    self._resolve(req, error=Unavailable(f"generation failed: {type(exc).__name__}: {exc}"))
                batch = None
                self.num_running = 0

    # -- the batch: rows, left-padded attention mask, KV cache
    def _new_generator(self, seed: int | None) -> Any:
        g = self._torch.Generator(device=_model_device(self._model))  # on the device that samples
        g.manual_seed(seed if seed is not None else random.getrandbits(63))
        return g

    def _admit(self, batch: _Batch | None, reqs: list[_Request]) -> _Batch | None:
        """Prefills ``reqs``, samples their first token, and merges them into ``batch``.

        Rows whose prompt starts with the cached shared prefix (e.g. the system prompt every episode shares, and
        every later turn of those episodes) reuse its KV and prefill only the rest. A group of new rows that share a
        long common prefix replaces the cached prefix.
        """
        for r in reqs:
            r.generator = self._new_generator(r.seed)
            r.version = self._version
            r.stop_tail_tokens = max((len(s) for s in r.stop), default=0) + 4
        key = (id(self._model), self._version)
        if self._prefix is not None and self._prefix[0] != key:
            self._prefix = None  # the weights changed: the cached KV is stale
        with_prefix = [r for r in reqs if self._prefix is not None and self._uses_prefix(r, self._prefix[1])]
        others = [r for r in reqs if r not in with_prefix]
        # Rows that match the cached prefix are prefilled before a new prefix may replace it below: prefilling them
        # after the replacement would use KV of another prefix (and could leave them nothing to prefill).
        if with_prefix:
            batch = self._merge_into(batch, self._prefill(with_prefix, True))
        if others:
            lcp = _common_prefix([r.prompt_ids for r in others]) if len(others) > 1 else 0
            use_prefix = self.prefix_cache and lcp >= self.min_prefix_tokens
            if use_prefix:
                self._set_prefix(key, others[0].prompt_ids[: min(lcp, min(len(r.prompt_ids) for r in others) - 1)])
            batch = self._merge_into(batch, self._prefill(others, use_prefix))
        return batch

    def _merge_into(self, batch: _Batch | None, new: _Batch | None) -> _Batch | None:
        if new is None:
            return batch
        return new if batch is None else self._merge(batch, new)

    def _uses_prefix(self, r: _Request, prefix: list[int]) -> bool:
        n = len(prefix)
        return len(r.prompt_ids) > n and r.prompt_ids[:n] == prefix

    def _set_prefix(self, key: tuple[int, str], tokens: list[int]) -> None:
        """Computes and caches the KV of ``tokens`` (one row, positions 0..P-1)."""
        torch = self._torch
        from transformers import DynamicCache

        out = self._model(
            input_ids=torch.tensor([tokens], dtype=torch.long, device=_model_device(self._model)),
            past_key_values=DynamicCache(config=self._model.config),
            use_cache=True,
        )
        kv = [(layer.keys, layer.values) for layer in _cache_layers(out.past_key_values)]
        self._prefix = (key, list(tokens), kv)

    def _prefill(self, reqs: list[_Request], use_prefix: bool) -> _Batch | None:
        """One left-padded forward over ``reqs`` (after the cached prefix when ``use_prefix``); samples token 1."""
        torch = self._torch
        from transformers import DynamicCache

        model = self._model
        plen = len(self._prefix[1]) if use_prefix and self._prefix is not None else 0
        rests = [r.prompt_ids[plen:] for r in reqs]
        width = max(len(x) for x in rests)
        ids = torch.full((len(reqs), width), self.pad_token_id, dtype=torch.long)
        rest_mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, rest in enumerate(rests):
            ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            rest_mask[i, width - len(rest) :] = 1
        if plen and self._prefix is not None:
            # Layout per row: [shared prefix][padding][rest]; the mask hides the padding, positions skip it.
            mask = torch.cat([torch.ones((len(reqs), plen), dtype=torch.long), rest_mask], dim=1)
            data = [(k.expand(len(reqs), -1, -1, -1), v.expand(len(reqs), -1, -1, -1)) for k, v in self._prefix[2]]
            cache = DynamicCache(data, config=model.config)
        else:
            mask = rest_mask
            cache = DynamicCache(config=model.config)
        dev = _model_device(model)  # rows are assembled on the CPU, then moved once
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, plen:]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        new = _Batch(rows=list(reqs), mask=mask, cache=out.past_key_values, model=model)
        new.last_logits = out.logits[:, -1, :]
        finished = self._sample(new)
        return self._drop(new, finished)

    def _step(self, batch: _Batch) -> _Batch | None:
        """Feeds every row's last token, samples the next, and drops finished or cancelled rows."""
        torch = self._torch
        cancelled = {i for i, r in enumerate(batch.rows) if r.cancelled}
        if cancelled:
            maybe = self._drop(batch, cancelled)
            if maybe is None:
                return None
            batch = maybe
        dev = batch.mask.device
        last = torch.tensor([[r.token_ids[-1]] for r in batch.rows], dtype=torch.long, device=dev)
        positions = batch.mask.sum(-1, keepdim=True)
        batch.mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=torch.long, device=dev)], dim=-1)
        out = batch.model(
            input_ids=last,
            attention_mask=batch.mask,
            position_ids=positions,
            past_key_values=batch.cache,
            use_cache=True,
        )
        batch.cache = out.past_key_values
        batch.last_logits = out.logits[:, -1, :]
        finished = self._sample(batch)
        return self._drop(batch, finished)

    def _sample(self, batch: _Batch) -> set[int]:
        """Samples one token per row from ``batch.last_logits``; returns the indices of rows that finished."""
        torch = self._torch
        logits = batch.last_logits.float()
        logprobs_all = torch.log_softmax(logits, dim=-1)
        finished: set[int] = set()
        for i, r in enumerate(batch.rows):
            if r.temperature == 0.0:
                tok = int(torch.argmax(logits[i]))
            else:
                scaled = logits[i] / r.temperature
                if r.top_k and r.top_k < scaled.shape[-1]:
                    kth = torch.topk(scaled, r.top_k).values[-1]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                probs = torch.softmax(scaled, dim=-1)
                if r.top_p < 1.0:
                    sorted_p, order = torch.sort(probs, descending=True)
                    cum = torch.cumsum(sorted_p, dim=-1)
                    drop = (cum - sorted_p) >= r.top_p  # keep the smallest prefix whose mass reaches top_p
                    sorted_p = sorted_p.masked_fill(drop, 0.0)
                    probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
                tok = int(torch.multinomial(probs, 1, generator=r.generator))
            r.token_ids.append(tok)
            r.logprobs.append(float(logprobs_all[i, tok]))
            self.generated_tokens += 1
            reason = ""
            if tok in self.eos_token_ids:
                reason = "eos"
            elif r.stop and self._hit_stop(r):
                reason = "stop"
            elif len(r.token_ids) >= r.max_new_tokens:
                reason = "length"
            if reason:
                finished.add(i)
                text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
                self._resolve(
                    r,
                    GenerationOutput(
                        token_ids=list(r.token_ids),
                        logprobs=list(r.logprobs),
                        text=text,
                        finish_reason=reason,
                        policy_version=r.version,
                    ),
                )
        return finished

    def _hit_stop(self, r: _Request) -> bool:
        tail = str(self.tokenizer.decode(r.token_ids[-r.stop_tail_tokens :], skip_special_tokens=False))
        last = str(self.tokenizer.decode(r.token_ids[-1:], skip_special_tokens=False))
        # Only a stop string that ends inside the newest token counts (an earlier one would have stopped already).
        for s in r.stop:
            pos = tail.rfind(s)
            if pos >= 0 and pos + len(s) > len(tail) - len(last):
                return True
        return False

    def _drop(self, batch: _Batch, rows: set[int]) -> _Batch | None:
        """Removes ``rows`` from the batch (KV cache and mask) and trims all-padding columns on the left."""
        if not rows:
            return batch
        keep = [i for i in range(len(batch.rows)) if i not in rows]
        if not keep:
            return None
        torch = self._torch
        idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
        batch.rows = [batch.rows[i] for i in keep]
        batch.mask = batch.mask[idx]
        batch.last_logits = batch.last_logits[idx]
        for layer in _cache_layers(batch.cache):
            layer.keys = layer.keys[idx]
            layer.values = layer.values[idx]
        # Columns that are padding in every remaining row carry no information: drop them.
        real_cols = batch.mask.any(dim=0).nonzero()
        first = int(real_cols[0]) if len(real_cols) else 0
        if first > 0:
            batch.mask = batch.mask[:, first:]
            for layer in _cache_layers(batch.cache):
                layer.keys = layer.keys[:, :, first:, :]
                layer.values = layer.values[:, :, first:, :]
        return batch

    def _merge(self, a: _Batch, b: _Batch) -> _Batch:
        """Concatenates two batches row-wise, left-padding the shorter one's mask and KV cache."""
        torch = self._torch
        if a.model is not b.model:
            raise RuntimeError("cannot merge rows decoded by different models")
        la, lb = a.mask.shape[1], b.mask.shape[1]
        width = max(la, lb)

        def pad_mask(m: Any, n: int) -> Any:
            return torch.cat([m.new_zeros((m.shape[0], n)), m], dim=1) if n else m

        def pad_kv(t: Any, n: int) -> Any:
            if not n:
                return t
            return torch.cat([t.new_zeros((*t.shape[:2], n, t.shape[3])), t], dim=2)

        for la_layer, lb_layer in zip(_cache_layers(a.cache), _cache_layers(b.cache), strict=True):
            la_layer.keys = torch.cat([pad_kv(la_layer.keys, width - la), pad_kv(lb_layer.keys, width - lb)], dim=0)
            la_layer.values = torch.cat(
                [pad_kv(la_layer.values, width - la), pad_kv(lb_layer.values, width - lb)], dim=0
            )
        a.mask = torch.cat([pad_mask(a.mask, width - la), pad_mask(b.mask, width - lb)], dim=0)
        a.rows = a.rows + b.rows
        a.last_logits = torch.cat([a.last_logits, b.last_logits], dim=0)
        return a


def _model_device(model: Any) -> Any:
    """The ``torch.device`` of ``model``'s parameters: where its inputs, KV cache and samplers must live."""
    import torch

    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def _set_if_pending(fut: asyncio.Future[str], value: str) -> None:
    if not fut.done():
        fut.set_result(value)


def _common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for i in range(n):
        t = first[i]
        if any(x[i] != t for x in seqs[1:]):
            return i
    return n


@dataclass(eq=False)
class _Batch:
    rows: list[_Request]
    mask: Any
    cache: Any
    model: Any
    last_logits: Any = None


def _cache_layers(cache: Any) -> list[Any]:
    """The per-layer K/V holders of a transformers ``DynamicCache`` (``.keys``/``.values`` of shape [B, H, T, D]).

    Raises:
        RuntimeError: a cache kind whose layers cannot be re-batched (e.g. sliding-window layers).
    """
    layers = list(getattr(cache, "layers", []))
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for layer in layers:
        if not isinstance(layer, DynamicLayer) or isinstance(layer, DynamicSlidingWindowLayer):
            raise RuntimeError(f"cache layer {type(layer).__name__} cannot be re-batched")
    return layers


# --------------------------------------------------------------------------------------------------- SGLang (GPU)
class SGLangEngine:
    """GPU generation through SGLang 0.5.23: an in-process ``sglang.Engine`` or a remote server's native HTTP API.

    In-process: ``sglang.Engine(model_path=..., skip_tokenizer_init=False, **engine_kwargs)`` and
    ``await engine.async_generate(input_ids=..., sampling_params=..., return_logprob=True)``; the result's
    ``meta_info["output_token_logprobs"]`` is a list of ``(logprob, token_id, None)`` tuples and
    ``meta_info["finish_reason"]`` a dict with ``type`` ``"stop"`` (EOS or a stop string; ``matched`` says which) or
    ``"length"``. Remote: the same JSON over ``POST {url}/generate``.

    **Event loop.** Build the in-process engine on the event loop that will serve it (in ``async`` code running on
    that loop, not in ``asyncio.to_thread``); the constructor raises ``RuntimeError`` when no loop runs.
    ``sglang.Engine`` keeps the running loop of its construction (``entrypoints/engine.py`` ``_ensure_event_loop``),
    and its tokenizer manager runs ``handle_loop``, which resolves every generation's and weight update's future with
    a plain ``Future.set_result``, on the loop of its first call (``managers/tokenizer_manager.py``
    ``auto_create_handle_loop``). The constructor calls ``auto_create_handle_loop`` at once, so both are the serving
    loop, and SGLang's own SIGTERM/SIGQUIT handlers are installed during the build, before
    :func:`searchrl.serving.runtime.serve_until_signal` installs the service's draining ones (which it also
    re-asserts every second).

    **Weight hot-swap** (:meth:`load_weights`): ``await engine.tokenizer_manager.update_weights_from_disk(
    UpdateWeightFromDiskReqInput(model_path=..., weight_version=...), None)`` on the serving loop, as SGLang's own
    ``POST /update_weights_from_disk`` route does (``entrypoints/http_server.py``). It returns ``(success, message,
    num_paused_requests)``. SGLang holds its ``model_update_lock`` writer lock during the swap: the swap waits for the
    generations in flight, generations that arrive meanwhile wait for it, and the lock is released when the update
    returns, fails or raises. ``Engine.update_weights_from_disk`` (the blocking wrapper: ``loop.run_until_complete``)
    is not usable in a server: on the serving loop it raises "This event loop is already running", and from a worker
    thread it runs the coroutine on a loop that ``handle_loop`` never wakes, so it hangs with the writer lock held.

    **Log-probs** are natural-log probabilities of the sampled tokens under the raw logits, ``log_softmax(logits)``
    before temperature / top-p / top-k: the convention of :class:`TransformersEngine` and of the trainer's forward
    pass. SGLang by default returns ``log_softmax(logits / temperature)`` (``layers/sampler.py``), which differs at any
    T other than 1, and returns the raw ones when its scheduler processes see ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``.
    The in-process engine sets that variable before SGLang spawns them (they read it at import). A remote server must
    be started with it; otherwise its log-probs are temperature-scaled.

    **Seeds.** SGLang reads ``sampling_seed`` only when deterministic inference is on
    (``sampling/sampling_batch_info.py``: otherwise the seed tensor is ``None``); without it, a seed is accepted and
    ignored, and the same seed does not reproduce the same tokens (a warning is logged once). With
    ``deterministic=True`` the in-process engine starts SGLang with ``enable_deterministic_inference=True``: a seeded
    request then samples the same tokens whatever else runs in its batch. SGLang then forces the ``pytorch`` sampling
    backend (``arg_groups/overrides.py`` ``_deterministic_sampling_backend``, so the flashinfer backend's assertion
    against seeded top-p/top-k sampling, ``layers/sampler.py``, is never reached), uses batch-invariant kernels and,
    for some attention backends, turns the radix cache off: slower. In deterministic mode SGLang samples every
    unseeded request with seed 42; this engine therefore sends a fresh random seed with every unseeded request.

    Args:
        model_path: model name or checkpoint directory (in-process) - also used to load the tokenizer.
        url: base URL of a running SGLang server (e.g. ``http://sglang:30000``); when set, no engine is started.
        tokenizer: optional tokenizer (default: ``AutoTokenizer.from_pretrained(model_path)``).
        engine_kwargs: extra ``sglang.Engine`` server arguments (``mem_fraction_static``, ``tp_size`` ...).
        timeout_s: HTTP timeout of one remote call, in seconds.
        deterministic: in-process: start SGLang with ``enable_deterministic_inference=True`` (seeded requests
            reproduce their tokens). Remote: states that the server was started with
            ``--enable-deterministic-inference`` (only silences the ignored-seed warning).

    Raises:
        RuntimeError: in-process, and no event loop runs in this thread.
    """

    engine_name = "sglang"

    def __init__(
        self,
        model_path: str,
        *,
        url: str = "",
        tokenizer: Any = None,
        engine_kwargs: dict[str, Any] | None = None,
        timeout_s: float = 600.0,
        deterministic: bool = False,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.model_name = model_path
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        kwargs: dict[str, Any] = dict(engine_kwargs or {})
        if deterministic:
            kwargs["enable_deterministic_inference"] = True
        self.deterministic = bool(kwargs.get("enable_deterministic_inference", False))
        self._seed_warned = False
        self._loop: asyncio.AbstractEventLoop | None = None
        if not self.url:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "the in-process SGLangEngine must be built on the event loop that serves it (inside async code, "
                    "not in asyncio.to_thread): sglang resolves its futures on that loop only"
                ) from None
        self.tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model_path)
        cfg = AutoConfig.from_pretrained(model_path)
        self.max_context_tokens = int(getattr(cfg, "max_position_embeddings", 0) or 32768)
        self.vocab_size = int(getattr(cfg, "vocab_size", 0) or len(self.tokenizer))
        self.eos_token_id = int(self.tokenizer.eos_token_id)
        self._version = "0"
        self.generated_tokens = 0
        self._engine: Any = None
        self._http: Any = None
        self._swaps: set[asyncio.Task[tuple[bool, str]]] = set()
        if not self.url:
            import sglang  # lazy: GPU images only

            # Raw log-probs (see the class doc); SGLang's scheduler processes are spawned and read it at import.
            if os.environ.get(RAW_LOGPROB_ENV) != "1":
                log.info("setting %s=1 so that SGLang returns log_softmax(logits) before temperature", RAW_LOGPROB_ENV)
            os.environ[RAW_LOGPROB_ENV] = "1"
            kwargs["skip_tokenizer_init"] = False  # stop strings are matched on decoded text
            self._engine = sglang.Engine(model_path=model_path, **kwargs)
            # Bind SGLang's handle_loop (and its signal handlers) to this loop now, not at the first request.
            self._engine.tokenizer_manager.auto_create_handle_loop()

    @property
    def version(self) -> str:
        """Version label of the weights serving."""
        return self._version

    def _check_loop(self) -> None:
        """Raises RuntimeError unless called on the loop the in-process engine was built on."""
        if asyncio.get_running_loop() is not self._loop:
            raise RuntimeError(
                "the in-process SGLangEngine is used from another event loop than the one it was built on; "
                "sglang resolves its futures on that loop only"
            )

    async def _post(self, route: str, payload: dict[str, Any]) -> Any:
        import httpx

        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout_s)
        try:
            resp = await self._http.post(f"{self.url}{route}", json=payload)
        except httpx.HTTPError as exc:
            raise Unavailable(f"SGLang server {self.url} unreachable: {exc}") from exc
        if resp.status_code >= 500:
            raise Unavailable(f"SGLang server error {resp.status_code}: {resp.text[:300]}")
        if resp.status_code >= 400:
            raise InvalidRequest(f"SGLang rejected the request ({resp.status_code}): {resp.text[:300]}")
        return resp.json()

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        top_k: int = 0,
    ) -> GenerationOutput:
        """Samples one completion; the contract of :meth:`TransformersEngine.generate`, except that ``seed``
        reproduces tokens only with deterministic inference (see the class doc).

        Returns:
            ``token_ids``, ``logprobs`` (one per token: ``log_softmax(logits)`` before temperature/top-p/top-k),
            ``text`` (special tokens skipped, the stop string kept) and ``finish_reason`` ``"stop"``, ``"eos"`` or
            ``"length"``.

        Raises:
            InvalidRequest: empty or over-long prompt, bad sampling parameters (ours, or SGLang's ``ValueError``).
            Unavailable: the SGLang server is unreachable or failed.
            RuntimeError: called on another event loop than the one the in-process engine was built on.
        """
        validate_sampling(max_new_tokens, temperature, top_p, top_k)
        if not prompt_ids:
            raise InvalidRequest("prompt is empty")
        if len(prompt_ids) >= self.max_context_tokens:
            raise InvalidRequest(
                f"prompt has {len(prompt_ids)} tokens; the model's context window is {self.max_context_tokens} tokens"
            )
        if seed is not None and not self.deterministic and not self._seed_warned:
            self._seed_warned = True
            log.warning(
                "SGLang ignores sampling seeds unless deterministic inference is on (--sglang-deterministic / "
                "enable_deterministic_inference): seeded requests are not reproducible"
            )
        sampling: dict[str, Any] = {
            "max_new_tokens": min(max_new_tokens, self.max_context_tokens - len(prompt_ids)),
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k if top_k > 0 else -1,
            "no_stop_trim": True,  # keep the stop string in the output text
            "skip_special_tokens": True,
            # SGLang's range is int64; deterministic mode gives unseeded requests seed 42, so draw one.
            "sampling_seed": int(seed) % 2**63 if seed is not None else random.getrandbits(63),
        }
        if stop:
            sampling["stop"] = list(stop)
        if self._engine is not None:
            self._check_loop()
            try:
                out = await self._engine.async_generate(
                    input_ids=list(prompt_ids), sampling_params=sampling, return_logprob=True
                )
            except ValueError as exc:  # SamplingParams.verify/normalize and request validation
                raise InvalidRequest(f"SGLang rejected the request: {exc}") from exc
        else:
            out = await self._post(
                "/generate", {"input_ids": list(prompt_ids), "sampling_params": sampling, "return_logprob": True}
            )
        if isinstance(out, list):
            out = out[0]
        return self._to_output(out, stop)

    def _to_output(self, out: dict[str, Any], stop: Sequence[str]) -> GenerationOutput:
        meta = out.get("meta_info", {})
        triples = meta.get("output_token_logprobs") or []
        token_ids = [int(t[1]) for t in triples]
        logprobs = [float(t[0]) if t[0] is not None else 0.0 for t in triples]
        if not token_ids and "output_ids" in out:
            token_ids = [int(t) for t in out["output_ids"]]
            logprobs = [0.0] * len(token_ids)
        fr = meta.get("finish_reason") or {}
        kind = fr.get("type", "length") if isinstance(fr, dict) else str(fr)
        matched = fr.get("matched") if isinstance(fr, dict) else None
        if kind == "length":
            reason = "length"
        elif isinstance(matched, str) and matched in stop:
            reason = "stop"
        else:
            reason = "eos"
        self.generated_tokens += len(token_ids)
        text = out.get("text")
        if text is None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        return GenerationOutput(
            token_ids=token_ids, logprobs=logprobs, text=str(text), finish_reason=reason, policy_version=self._version
        )

    async def generate_text(
        self,
        prompts: Sequence[str],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> list[str]:
        """Text in, text out (see :meth:`TransformersEngine.generate_text`)."""
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = await asyncio.gather(
            *(
                self.generate(
                    x,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_p=top_p,
                    stop=stop,
                    seed=None if seed is None else seed + i,
                )
                for i, x in enumerate(ids)
            )
        )
        return [o.text for o in outs]

    async def _swap(self, path: str, version: str) -> tuple[bool, str]:
        """One in-process weight update on the serving loop (SGLang's async API, as its HTTP route calls it)."""
        from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput

        req = UpdateWeightFromDiskReqInput(model_path=path, weight_version=version)
        success, message, _paused = await self._engine.tokenizer_manager.update_weights_from_disk(req, None)
        if success:
            self._version = version
        return bool(success), str(message)

    async def load_weights(self, path: str, version: str = "") -> str:
        """Hot-swaps the weights from a checkpoint directory; returns once the new weights serve.

        In-process: SGLang's async ``tokenizer_manager.update_weights_from_disk`` on the serving loop (see the class
        doc: generations in flight finish on the old weights, later ones wait for the swap). The update runs as a
        task shielded from the caller's cancellation: cancelling SGLang's coroutine midway would leave its pending
        future cancelled, and ``handle_loop``'s ``set_result`` on it would raise and take the process down; a
        cancelled caller therefore leaves the swap to finish (and the version to change) in the background. Remote:
        ``POST /update_weights_from_disk``.

        Args:
            path: checkpoint directory (Hugging Face format, same architecture) readable by the SGLang process.
            version: label of the new weights (also SGLang's ``weight_version``); empty means the directory name.

        Returns:
            The version now serving.

        Raises:
            InvalidRequest: SGLang reported failure (``success`` false / HTTP 400), e.g. a path it cannot load.
            Unavailable: the remote server is unreachable or failed.
            RuntimeError: called on another event loop than the one the in-process engine was built on.
        """
        version = version or Path(path).name
        if self._engine is not None:
            self._check_loop()
            task = asyncio.get_running_loop().create_task(self._swap(path, version))
            self._swaps.add(task)
            task.add_done_callback(self._swaps.discard)
            ok, message = await asyncio.shield(task)
        else:
            try:
                body = await self._post("/update_weights_from_disk", {"model_path": path, "weight_version": version})
            except InvalidRequest as exc:
                raise InvalidRequest(f"SGLang could not load weights from {path!r}: {exc}") from exc
            ok, message = bool(body.get("success", False)), str(body.get("message", ""))
            if ok:
                self._version = version
        if not ok:
            raise InvalidRequest(f"SGLang could not load weights from {path!r}: {message}")
        return version

    async def close(self) -> None:
        """Shuts the in-process engine down (after any weight update still running) / closes the HTTP client."""
        if self._swaps:
            await asyncio.gather(*self._swaps, return_exceptions=True)
        if self._engine is not None:
            await asyncio.to_thread(self._engine.shutdown)
            self._engine = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None


# --------------------------------------------------------------------------------------------------- remote policy
class RemotePolicyBackend:
    """A :class:`~searchrl.agent.loop.GenerationBackend` over the PolicyService ``Generate`` RPC.

    Args:
        client: a :class:`searchrl.client.policy.PolicyClient`.
        tokenizer: the policy's tokenizer (the agent loop tokenises prompts and observations locally).
    """

    def __init__(self, client: Any, tokenizer: Any) -> None:
        self.client = client
        self.tokenizer = tokenizer

    async def generate(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> GenerationOutput:
        """Calls ``Generate`` with n=1 and returns its completion.

        Raises:
            InvalidRequest: the server rejected the request (INVALID_ARGUMENT).
            Unavailable: the server is down.
        """
        resp = await self.client.generate(
            token_ids=list(prompt_ids),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=list(stop),
            seed=seed,
            n=1,
        )
        c = resp.completions[0]
        return GenerationOutput(
            token_ids=list(c.token_ids),
            logprobs=list(c.logprobs),
            text=c.text,
            finish_reason=c.finish_reason,
            policy_version=resp.policy_version,
        )
