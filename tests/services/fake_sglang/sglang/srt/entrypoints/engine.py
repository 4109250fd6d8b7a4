"""``sglang.Engine`` of sglang 0.5.23 (``srt/entrypoints/engine.py``), reduced to what searchrl uses: construction
keeps the running loop (``_ensure_event_loop``), ``async_generate`` (returns the first item of the tokenizer
manager's generator, leaving it suspended inside the reader lock as the real one does),
``update_weights_from_disk`` (the blocking ``run_until_complete`` wrapper) and ``shutdown``."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Any

from sglang.srt.managers.io_struct import GenerateReqInput, UpdateWeightFromDiskReqInput
from sglang.srt.managers.scheduler import Scheduler
from sglang.srt.managers.tokenizer_manager import TokenizerManager


@dataclass(kw_only=True)
class ServerArgs:
    """A subset of the real ``ServerArgs`` fields; an unknown keyword raises ``TypeError`` as in the real one."""

    model_path: str
    tokenizer_path: str | None = None
    skip_tokenizer_init: bool = False
    log_level: str = "error"
    dtype: str = "auto"
    mem_fraction_static: float | None = None
    tp_size: int = 1
    random_seed: int | None = None
    context_length: int | None = None
    enable_deterministic_inference: bool = False
    sampling_backend: str | None = None
    attention_backend: str | None = None
    weight_version: str = "default"


class Engine:
    def __init__(self, **kwargs: Any) -> None:
        if "log_level" not in kwargs:
            kwargs["log_level"] = "error"
        server_args = ServerArgs(**kwargs)
        self.server_args = server_args
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = None if server_args.skip_tokenizer_init else AutoTokenizer.from_pretrained(server_args.model_path)
        vocab = int(AutoConfig.from_pretrained(server_args.model_path).vocab_size)
        eos = getattr(AutoConfig.from_pretrained(server_args.model_path), "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        # "Launch subprocesses": the scheduler reads SGLANG_RETURN_ORIGINAL_LOGPROB now, as a spawned process would.
        recv_sock, send_sock = socket.socketpair()
        self._scheduler = Scheduler(
            model_path=server_args.model_path,
            tokenizer=tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(server_args.model_path),
            vocab_size=vocab,
            eos_ids=eos_ids,
            deterministic=server_args.enable_deterministic_inference,
            out_sock=send_sock,
        )
        self._scheduler.start()
        self.tokenizer_manager = TokenizerManager(server_args, tokenizer, vocab, self._scheduler, recv_sock)
        self.loop = self._ensure_event_loop()

    @staticmethod
    def _ensure_event_loop() -> asyncio.AbstractEventLoop:
        try:
            return asyncio.get_running_loop()
        except RuntimeError:
            pass
        try:
            return asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            return loop

    async def async_generate(
        self,
        prompt: Any = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        return_logprob: bool = False,
        stream: bool = False,
        rid: str | None = None,
    ) -> Any:
        obj = GenerateReqInput(
            text=prompt,
            input_ids=input_ids,
            sampling_params=sampling_params,
            return_logprob=return_logprob,
            stream=stream,
            rid=rid,
        )
        generator = self.tokenizer_manager.generate_request(obj, None)
        if stream is True:
            return generator
        return await generator.__anext__()

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None) -> Any:
        obj = UpdateWeightFromDiskReqInput(model_path=model_path, load_format=load_format)
        return self.loop.run_until_complete(self.tokenizer_manager.update_weights_from_disk(obj, None))

    def shutdown(self) -> None:
        self._scheduler.inbox.put(None)
        tm = self.tokenizer_manager
        if tm.event_loop is not None and not tm.event_loop.is_closed():  # the real one kills its child processes
            for task in list(tm.asyncio_tasks):
                tm.event_loop.call_soon_threadsafe(task.cancel)
