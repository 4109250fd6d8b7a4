"""The CPU engine: :class:`TransformersEngine`, continuous batching over a transformers causal LM.

Concurrent :meth:`~TransformersEngine.generate` calls are joined into one running batch over a shared KV cache
(continuous batching at token granularity: a request that arrives while others decode is prefilled and merged into the
batch at the next step; a finished row leaves at once). Every row keeps its own sampling parameters and its own seeded
``torch.Generator``, so a seeded request samples the same tokens whatever else is in the batch (up to float rounding
of padded attention).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchrl.agent.loop import GenerationOutput
from searchrl.agent.settings import SamplingParams
from searchrl.errors import InvalidRequest, Unavailable
from searchrl.services.policy.engines.base import EngineBase
from searchrl.services.policy.engines.kv_cache import Batch, PrefixCache, common_prefix, drop, merge, model_device

log = logging.getLogger("searchrl.policy.engines")

_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(eq=False)
class _Request:
    """One generation request travelling from the event loop to the worker thread."""

    prompt_ids: list[int]
    params: SamplingParams  # max_new_tokens already clamped to the context left
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


class TransformersEngine(EngineBase):
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
            avoids OpenMP oversubscription (see ``benchmarks/rollout_bench.py``).

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
        self._prefix: PrefixCache | None = None
        self.num_running = 0  # rows decoding now (read-only outside the worker)
        self.eos_token_ids = self._eos_ids(model)
        pad = getattr(model.config, "pad_token_id", None)
        if pad is None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_token_ids)
        self.pad_token_id = int(pad if not isinstance(pad, list) else pad[0])
        self.max_context_tokens = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
        self.vocab_size = int(getattr(model.config, "vocab_size", 0) or len(self.tokenizer))

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
        self, prompt_ids: list[int], sampling: SamplingParams, *, stop: Sequence[str] = (), seed: int | None = None
    ) -> GenerationOutput:
        """Samples one completion of ``prompt_ids``.

        Args:
            prompt_ids: prompt token ids, length >= 1.
            sampling: temperature (0 is greedy), top-p, top-k (-1: no limit) and ``max_new_tokens`` (clamped to the
                context left after the prompt).
            stop: generation stops after the first token whose decoded text completes any of these strings; the
                stop string stays in ``text`` (the token that completed it may carry a few characters after it).
            seed: makes the sampled tokens reproducible (per request, independent of batching).

        Returns:
            The completion: ``token_ids`` (the EOS token is included when sampled), ``logprobs`` (one per token,
            natural log of ``softmax(logits)`` before temperature/top-p/top-k), ``text`` (special tokens skipped)
            and ``finish_reason`` ``"stop"``, ``"eos"`` or ``"length"``.

        Raises:
            InvalidRequest: empty prompt, a token id outside the vocabulary or a prompt that fills the context window.
            Unavailable: the engine is closed or the forward pass failed.
        """
        params = self.check_request(prompt_ids, sampling)
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise InvalidRequest(f"prompt token ids must be in [0, {self.vocab_size})")
        if self._closed:
            raise Unavailable("the engine is closed")
        loop = asyncio.get_running_loop()
        req = _Request(
            prompt_ids=list(prompt_ids),
            params=params,
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
            _settle(loop, fut, version)

    def _worker(self) -> None:
        torch = self._torch
        if self.torch_threads > 0:
            torch.set_num_threads(self.torch_threads)  # per calling thread under OpenMP: set it here
        batch: Batch[_Request] | None = None
        while True:
            if self._closed:
                err = Unavailable("the engine is closed")
                for req in [*self._waiting, *(batch.rows if batch else [])]:
                    _settle(req.loop, req.future, error=err)
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
                    _settle(req.loop, req.future, error=Unavailable(f"generation failed: {type(exc).__name__}: {exc}"))
                batch = None
                self.num_running = 0

    # -- the batch: rows, left-padded attention mask, KV cache
    def _new_generator(self, seed: int | None) -> Any:
        g = self._torch.Generator(device=model_device(self._model))  # on the device that samples
        g.manual_seed(seed if seed is not None else random.getrandbits(63))
        return g

    def _admit(self, batch: Batch[_Request] | None, reqs: list[_Request]) -> Batch[_Request] | None:
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
        if self._prefix is not None and self._prefix.key != key:
            self._prefix = None  # the weights changed: the cached KV is stale
        prefix = self._prefix
        with_prefix = [r for r in reqs if prefix is not None and prefix.starts(r.prompt_ids)]
        others = [r for r in reqs if r not in with_prefix]
        # Rows that match the cached prefix are prefilled before a new prefix may replace it below: prefilling them
        # after the replacement would use KV of another prefix (and could leave them nothing to prefill).
        if with_prefix:
            batch = merge(batch, self._prefill(with_prefix, prefix))
        if others:
            lcp = common_prefix([r.prompt_ids for r in others]) if len(others) > 1 else 0
            prefix = None
            if self.prefix_cache and lcp >= self.min_prefix_tokens:
                tokens = others[0].prompt_ids[: min(lcp, min(len(r.prompt_ids) for r in others) - 1)]
                prefix = self._prefix = PrefixCache.compute(self._model, key, tokens)
            batch = merge(batch, self._prefill(others, prefix))
        return batch

    def _prefill(self, reqs: list[_Request], prefix: PrefixCache | None) -> Batch[_Request] | None:
        """One left-padded forward over ``reqs`` (after ``prefix``, when given); samples token 1."""
        torch = self._torch
        from transformers import DynamicCache

        model = self._model
        plen = len(prefix.tokens) if prefix is not None else 0
        rests = [r.prompt_ids[plen:] for r in reqs]
        width = max(len(x) for x in rests)
        ids = torch.full((len(reqs), width), self.pad_token_id, dtype=torch.long)
        rest_mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, rest in enumerate(rests):
            ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            rest_mask[i, width - len(rest) :] = 1
        if prefix is not None:
            # Layout per row: [shared prefix][padding][rest]; the mask hides the padding, positions skip it.
            mask = torch.cat([torch.ones((len(reqs), plen), dtype=torch.long), rest_mask], dim=1)
            cache = prefix.expand(len(reqs), model.config)
        else:
            mask = rest_mask
            cache = DynamicCache(config=model.config)
        dev = model_device(model)  # rows are assembled on the CPU, then moved once
        ids, mask = ids.to(dev), mask.to(dev)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, plen:]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
        new = Batch(
            rows=list(reqs), mask=mask, cache=out.past_key_values, model=model, last_logits=out.logits[:, -1, :]
        )
        return drop(new, self._sample(new))

    def _step(self, batch: Batch[_Request]) -> Batch[_Request] | None:
        """Feeds every row's last token, samples the next, and drops finished or cancelled rows."""
        torch = self._torch
        cancelled = {i for i, r in enumerate(batch.rows) if r.cancelled}
        if cancelled:
            maybe = drop(batch, cancelled)
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
        return drop(batch, self._sample(batch))

    def _sample(self, batch: Batch[_Request]) -> set[int]:
        """Samples one token per row from ``batch.last_logits``; returns the indices of rows that finished."""
        torch = self._torch
        logits = batch.last_logits.float()
        logprobs_all = torch.log_softmax(logits, dim=-1)
        finished: set[int] = set()
        for i, r in enumerate(batch.rows):
            p = r.params
            if p.temperature == 0.0:
                tok = int(torch.argmax(logits[i]))
            else:
                scaled = logits[i] / p.temperature
                if 0 < p.top_k < scaled.shape[-1]:
                    kth = torch.topk(scaled, p.top_k).values[-1]
                    scaled = scaled.masked_fill(scaled < kth, float("-inf"))
                probs = torch.softmax(scaled, dim=-1)
                if p.top_p < 1.0:
                    sorted_p, order = torch.sort(probs, descending=True)
                    cum = torch.cumsum(sorted_p, dim=-1)
                    cut = (cum - sorted_p) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
                    sorted_p = sorted_p.masked_fill(cut, 0.0)
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
            elif len(r.token_ids) >= p.max_new_tokens:
                reason = "length"
            if reason:
                finished.add(i)
                text = self.tokenizer.decode(r.token_ids, skip_special_tokens=True)
                _settle(
                    r.loop,
                    r.future,
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


def _settle(
    loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], result: Any = None, error: Exception | None = None
) -> None:
    """Sets ``fut``'s result or ``error`` on its loop, from the worker thread (unless it is done or the loop closed)."""

    def settle() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits for this result
        loop.call_soon_threadsafe(settle)
