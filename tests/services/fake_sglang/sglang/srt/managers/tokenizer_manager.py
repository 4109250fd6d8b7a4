"""``TokenizerManager`` of sglang 0.5.23 (``srt/managers/tokenizer_manager.py``), reduced to what searchrl uses, with
the real control flow: ``auto_create_handle_loop`` (handle loop on the loop of the first call, signal handlers in the
main thread), ``generate_request`` (reader lock held while the request runs, yield inside it),
``update_weights_from_disk`` (writer lock; a future created on the caller's loop and resolved by ``handle_loop`` with
a plain ``set_result``), ``sigterm_watchdog`` and ``SignalHandler``."""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import socket
import struct
import sys
import threading
import uuid
from contextlib import nullcontext
from typing import Any

from sglang.srt.managers.io_struct import (
    GenerateReqInput,
    UpdateWeightFromDiskReqInput,
    UpdateWeightFromDiskReqOutput,
)
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.utils.aio_rwlock import RWLock

logger = logging.getLogger("sglang.srt.managers.tokenizer_manager")


def get_or_create_event_loop() -> asyncio.AbstractEventLoop:
    """``sglang.srt.utils.common.get_or_create_event_loop``."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        return loop


class ReqState:
    def __init__(self, obj: GenerateReqInput) -> None:
        self.obj = obj
        self.out: dict[str, Any] | None = None
        self.event = asyncio.Event()


class TokenizerManager:
    def __init__(self, server_args: Any, tokenizer: Any, vocab_size: int, scheduler: Any, recv_sock: socket.socket):
        self.server_args = server_args
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.event_loop: asyncio.AbstractEventLoop | None = None
        self.asyncio_tasks: set[asyncio.Task[Any]] = set()
        self.model_update_lock = RWLock()
        self.model_update_result: asyncio.Future[Any] | None = None
        self.model_update_expected_workers = 1
        self.is_pause = False
        self.rid_to_state: dict[str, ReqState] = {}
        self.gracefully_exit = False
        self.weight_version = server_args.weight_version
        self.model_path = server_args.model_path
        self.signal_handler_class = SignalHandler
        self.crashed: BaseException | None = None  # the real process is killed instead (print_exception_wrapper)
        self._scheduler = scheduler
        self._recv_sock = recv_sock

    def _dispatch_to_scheduler(self, obj: Any) -> None:
        self._scheduler.inbox.put(obj)

    def auto_create_handle_loop(self) -> None:
        if self.event_loop is not None:
            return
        loop = get_or_create_event_loop()
        self.asyncio_tasks.add(loop.create_task(self._print_exception_wrapper(self.handle_loop)))
        self.event_loop = loop
        # We only add signal handler when the tokenizer manager is in the main thread (CPython limitation).
        if threading.current_thread() is threading.main_thread():
            signal_handler = self.signal_handler_class(self)
            loop.add_signal_handler(signal.SIGTERM, signal_handler.sigterm_handler)
            loop.add_signal_handler(signal.SIGQUIT, signal_handler.running_phase_sigquit_handler)
        self.asyncio_tasks.add(loop.create_task(self._print_exception_wrapper(self.sigterm_watchdog)))

    async def _print_exception_wrapper(self, func: Any) -> None:
        try:
            await func()
        except Exception as exc:  # the real one logs, kills the process tree (parent included) and exits 1
            logger.error("TokenizerManager hit an exception: %r", exc)
            self.crashed = exc

    async def handle_loop(self) -> None:
        reader, _writer = await asyncio.open_connection(sock=self._recv_sock)
        while True:
            (n,) = struct.unpack("!I", await reader.readexactly(4))
            recv_obj = pickle.loads(await reader.readexactly(n))
            if isinstance(recv_obj, UpdateWeightFromDiskReqOutput):
                # _handle_update_weights_from_disk_req_output: raises InvalidStateError when the waiter was cancelled
                self.model_update_result.set_result(recv_obj)  # type: ignore[union-attr]
                continue
            state = self.rid_to_state.get(recv_obj["rid"])
            if state is None:
                logger.warning("Received output for rid=%s but the state was deleted.", recv_obj["rid"])
                continue
            state.out = recv_obj
            state.event.set()

    async def generate_request(self, obj: GenerateReqInput, request: Any = None) -> Any:
        self.auto_create_handle_loop()
        if self.crashed is not None:
            raise RuntimeError(f"the tokenizer manager crashed: {self.crashed!r}")
        sampling_params = SamplingParams(**(obj.sampling_params or {}))
        sampling_params.normalize(self.tokenizer)
        sampling_params.verify(self.vocab_size)
        input_ids = list(obj.input_ids or self.tokenizer.encode(obj.text))
        if max(input_ids) >= self.vocab_size or min(input_ids) < 0:
            raise ValueError(
                f"The input_ids {input_ids} contains values greater than the vocab size ({self.vocab_size})."
            )
        rid = obj.rid or uuid.uuid4().hex
        state = ReqState(obj)
        self.rid_to_state[rid] = state
        try:
            async with self.model_update_lock.reader_lock:
                self._dispatch_to_scheduler({"rid": rid, "input_ids": input_ids, "sampling_params": sampling_params})
                await state.event.wait()
                out = state.out
                assert out is not None
                meta_info: dict[str, Any] = {
                    "id": rid,
                    "finish_reason": out["finish_reason"],
                    "prompt_tokens": out["prompt_tokens"],
                    "weight_version": self.weight_version,
                    "completion_tokens": len(out["output_ids"]),
                }
                if obj.return_logprob:
                    meta_info["output_token_logprobs"] = [
                        (lp, tok, None) for lp, tok in zip(out["logprobs"], out["output_ids"], strict=True)
                    ]
                yield {"text": out["text"], "output_ids": out["output_ids"], "meta_info": meta_info}
        finally:
            self.rid_to_state.pop(rid, None)

    async def update_weights_from_disk(
        self, obj: UpdateWeightFromDiskReqInput, request: Any = None
    ) -> tuple[bool, str, Any]:
        self.auto_create_handle_loop()
        lock_context = self.model_update_lock.writer_lock if not self.is_pause else nullcontext()
        async with lock_context:  # type: ignore[attr-defined]
            success, message, num_paused_requests = await self._wait_for_model_update_from_disk(obj)
        if success and obj.weight_version is not None:
            self.weight_version = obj.weight_version
            message += f" Weight version updated to {obj.weight_version}."
        return success, message, num_paused_requests

    async def _wait_for_model_update_from_disk(self, obj: UpdateWeightFromDiskReqInput) -> tuple[bool, str, Any]:
        self.model_update_result = asyncio.Future()  # bound to the *calling* thread's event loop
        self._dispatch_to_scheduler(obj)
        result = await self.model_update_result
        if result.success:
            self.model_path = obj.model_path
        return result.success, result.message, result.num_paused_requests

    async def sigterm_watchdog(self) -> None:
        while not self.gracefully_exit:
            await asyncio.sleep(5)
        while self.rid_to_state:  # drain requests
            logger.info("Gracefully exiting... Remaining number of requests %d.", len(self.rid_to_state))
            await asyncio.sleep(5)
        self._scheduler.inbox.put(None)
        sys.exit(0)


class SignalHandler:
    def __init__(self, tokenizer_manager: TokenizerManager) -> None:
        self.tokenizer_manager = tokenizer_manager

    def sigterm_handler(self, signum: Any = None, frame: Any = None) -> None:
        logger.warning("SIGTERM received. signum=%s frame=%s. Draining requests and shutting down...", signum, frame)
        print("FAKE-SGLANG: SIGTERM received, draining and shutting down", flush=True)
        self.tokenizer_manager.gracefully_exit = True

    def running_phase_sigquit_handler(self, signum: Any = None, frame: Any = None) -> None:
        logger.error("SIGQUIT received. It usually means one child failed.")
