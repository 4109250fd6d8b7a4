"""Copied from sglang 0.5.23 ``srt/utils/aio_rwlock.py`` (Apache-2.0, SGLang Team), unchanged but for comments."""

import asyncio


class RWLock:
    def __init__(self):
        self._lock = asyncio.Lock()
        self._cond = asyncio.Condition(self._lock)
        self._readers = 0
        self._writer_active = False
        self._waiting_writers = 0

    @property
    def reader_lock(self):
        return _ReaderLock(self)

    @property
    def writer_lock(self):
        return _WriterLock(self)

    async def acquire_reader(self):
        async with self._lock:
            while self._writer_active or self._waiting_writers > 0:
                await self._cond.wait()
            self._readers += 1

    async def release_reader(self):
        async with self._lock:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    async def acquire_writer(self):
        async with self._lock:
            self._waiting_writers += 1
            try:
                while self._writer_active or self._readers > 0:
                    await self._cond.wait()
                self._writer_active = True
            finally:
                self._waiting_writers -= 1

    async def release_writer(self):
        async with self._lock:
            self._writer_active = False
            self._cond.notify_all()

    async def is_locked(self):
        async with self._lock:
            return self._writer_active or self._readers > 0


class _ReaderLock:
    def __init__(self, rwlock: RWLock):
        self._rwlock = rwlock

    async def __aenter__(self):
        await self._rwlock.acquire_reader()
        return self

    async def __aexit__(self, exc_type, exc_val, exc_tb):
        await self._rwlock.release_reader()


class _WriterLock:
    def __init__(self, rwlock: RWLock):
        self._rwlock = rwlock

    async def __aenter__(self):
        await self._rwlock.acquire_writer()
        return self

    async def __aexit__(self, exc_type, exc_val, exc_tb):
        await self._rwlock.release_writer()
