"""Micro-batching of concurrent requests: collect, run once in a worker thread, fan the results out.

Encoding one query with a small transformer on CPU costs nearly as much as encoding eight (the matmuls are tiny and
the fixed per-call overhead dominates), and FAISS scans the index once per batch. A server that runs each request
alone, like a blocking FastAPI retriever, therefore wastes most of its capacity under concurrent rollouts. The
:class:`MicroBatcher` queues requests from many coroutines (gRPC and HTTP handlers), and one collector task

1. waits for the first request;
2. takes whatever is already queued, then waits for more until the batch holds ``max_items`` units (queries), or as
   many requests as were in the system (queued or running) at the recent peak (last 8 batches, last second), or
   ``max_wait_ms`` has passed.
   Closed-loop clients (rollout workers) come back a moment after their answer, so waiting for the recent peak
   gathers all of them into one batch instead of settling into two half-size groups that alternate; a lone client
   (peak 1) is never delayed;
3. runs ``fn(batch)`` in a single worker thread (the event loop stays free to accept requests, and the model uses the
   cores through its own intra-op threads);
4. resolves each request's future with its slice of the result.

This is the dynamic-batching scheme of inference servers (Triton's ``max_queue_delay_microseconds``, vLLM's scheduler)
reduced to a queue and a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger("searchrl.retriever.batcher")

PEAK_WINDOW_S = 1.0  # concurrency "seen lately": peaks of the last 8 batches within this many seconds

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T, R]):
    item: T
    units: int
    future: asyncio.Future[R]


class MicroBatcher(Generic[T, R]):
    """Coalesces concurrent :meth:`submit` calls into batches for ``fn``.

    Args:
        fn: ``fn(items) -> results``, one result per item, same order; runs in the worker thread. An exception fails
            every request of that batch.
        max_items: batch budget in units (``units(item)``, e.g. queries); a single item larger than the budget runs
            alone.
        max_wait_ms: how long to wait for more requests once one has arrived (only after a multi-request batch).
        units: size of an item in budget units (default 1).
        on_batch: called in the worker thread with ``(n_items, n_units)`` of every batch (metrics hook).
        thread_init: run once in the worker thread before its first batch (per-thread settings such as OpenMP's
            thread count, which ``omp_set_num_threads`` sets for the calling thread only).

    Call :meth:`start` inside the running event loop before submitting and :meth:`close` at shutdown.
    """

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[R]],
        max_items: int = 64,
        max_wait_ms: float = 10.0,
        units: Callable[[T], int] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        self._fn = fn
        self._max_items = max_items
        self._max_wait = max(0.0, max_wait_ms) / 1000.0
        self._units = units or (lambda _item: 1)
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending[T, R]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="searchrl-batch", initializer=thread_init)
        self._in_system = 0  # submitted, not yet answered
        self._peak = 0  # largest _in_system since the last dispatch
        self._recent_peaks: deque[tuple[float, int]] = deque(maxlen=8)  # (time, peak) per dispatch
        self._carry: _Pending[T, R] | None = None
        self.batches = 0

    async def start(self) -> None:
        """Starts the collector task on the running loop (idempotent)."""
        if self._task is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._run(), name="searchrl-microbatcher")

    async def close(self) -> None:
        """Stops the collector; pending requests fail with ``CancelledError``; the worker thread is released."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._queue is not None:
            while not self._queue.empty():
                p = self._queue.get_nowait()
                if not p.future.done():
                    p.future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: T) -> R:
        """Queues ``item`` and waits for its result.

        Raises:
            RuntimeError: the batcher was not started.
            Exception: whatever ``fn`` raised for the batch holding ``item``.
        """
        if self._queue is None or self._task is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._in_system += 1
        self._peak = max(self._peak, self._in_system)
        try:
            await self._queue.put(_Pending(item, max(1, self._units(item)), fut))
            return await fut
        finally:
            self._in_system -= 1

    async def _collect(self) -> list[_Pending[T, R]]:
        assert self._queue is not None
        first = self._carry if self._carry is not None else await self._queue.get()
        self._carry = None
        batch = [first]
        used = first.units
        loop = asyncio.get_running_loop()
        now = loop.time()
        expect = max((peak for t, peak in self._recent_peaks if now - t < PEAK_WINDOW_S), default=1)
        deadline = loop.time() + (self._max_wait if expect > 1 else 0.0)
        while used < self._max_items:
            if self._queue.empty():
                if len(batch) >= expect:
                    break  # everyone seen lately is in: go
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                nxt = self._queue.get_nowait()  # whatever is already queued joins without waiting
            if used + nxt.units > self._max_items:
                self._carry = nxt  # first of the next batch; keeps FIFO order
                break
            batch.append(nxt)
            used += nxt.units
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [p for p in batch if not p.future.cancelled()]
            if not live:
                continue
            self._recent_peaks.append((loop.time(), self._peak))
            self._peak = self._in_system
            self.batches += 1
            units = sum(p.units for p in live)
            try:
                results = await loop.run_in_executor(self._executor, self._call, [p.item for p in live], units)
            except asyncio.CancelledError:
                for p in live:
                    if not p.future.done():
                        p.future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - delivered to every waiting request
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for p, res in zip(live, results, strict=True):
                if not p.future.done():
                    p.future.set_result(res)

    def _call(self, items: list[T], units: int) -> Sequence[R]:
        if self._on_batch is not None:
            self._on_batch(len(items), units)
        results = self._fn(items)
        if len(results) != len(items):
            raise RuntimeError(f"batch function returned {len(results)} results for {len(items)} items")
        return results
