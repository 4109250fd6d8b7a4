"""The GPU engine: :class:`SGLangEngine`, an in-process ``sglang.Engine`` or a remote SGLang server."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from searchrl.agent.loop import GenerationOutput
from searchrl.agent.settings import SamplingParams
from searchrl.errors import InvalidRequest, Unavailable
from searchrl.services.policy.engines.base import EngineBase

log = logging.getLogger("searchrl.policy.engines")

# SGLang returns log_softmax(logits) (before temperature) only when its scheduler processes see this set to 1.
RAW_LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"


class SGLangEngine(EngineBase):
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
        self, prompt_ids: list[int], sampling: SamplingParams, *, stop: Sequence[str] = (), seed: int | None = None
    ) -> GenerationOutput:
        """Samples one completion; the contract of :meth:`TransformersEngine.generate`, except that ``seed``
        reproduces tokens only with deterministic inference (see the class doc).

        Returns:
            ``token_ids``, ``logprobs`` (one per token: ``log_softmax(logits)`` before temperature/top-p/top-k),
            ``text`` (special tokens skipped, the stop string kept) and ``finish_reason`` ``"stop"``, ``"eos"`` or
            ``"length"``.

        Raises:
            InvalidRequest: empty or over-long prompt, sampling parameters SGLang rejects (its ``ValueError``).
            Unavailable: the SGLang server is unreachable or failed.
            RuntimeError: called on another event loop than the one the in-process engine was built on.
        """
        params = self.check_request(prompt_ids, sampling)
        if seed is not None and not self.deterministic and not self._seed_warned:
            self._seed_warned = True
            log.warning(
                "SGLang ignores sampling seeds unless deterministic inference is on (--sglang-deterministic / "
                "enable_deterministic_inference): seeded requests are not reproducible"
            )
        body: dict[str, Any] = {
            **params.model_dump(),
            "no_stop_trim": True,  # keep the stop string in the output text
            "skip_special_tokens": True,
            # SGLang's range is int64; deterministic mode gives unseeded requests seed 42, so draw one.
            "sampling_seed": int(seed) % 2**63 if seed is not None else random.getrandbits(63),
        }
        if stop:
            body["stop"] = list(stop)
        if self._engine is not None:
            self._check_loop()
            try:
                out = await self._engine.async_generate(
                    input_ids=list(prompt_ids), sampling_params=body, return_logprob=True
                )
            except ValueError as exc:  # SamplingParams.verify/normalize and request validation
                raise InvalidRequest(f"SGLang rejected the request: {exc}") from exc
        else:
            out = await self._post(
                "/generate", {"input_ids": list(prompt_ids), "sampling_params": body, "return_logprob": True}
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
