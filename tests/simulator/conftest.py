"""Fixtures of the simulator tests: the real CPU engine, and real OpenAI-compatible HTTP servers in front of it.

:class:`OpenAICompatServer` is an aiohttp app speaking the OpenAI ``/v1/completions`` and ``/v1/chat/completions``
JSON (with vLLM's ``continue_final_message``), backed by the real transformers engine: a real engine behind the real
protocol, on a loopback port, in its own thread and event loop. It can also answer 503 to its first requests or answer
late, which is how a real overloaded server behaves, to test retries and timeouts.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from searchrl.agent.settings import SamplingParams
from searchrl.testing import free_port


@pytest.fixture(scope="session")
def sim_engine(policy_path: str) -> Iterator[Any]:
    """The embedded SmolLM2-135M-Instruct on the shared continuous-batching engine, one torch thread.

    One thread: on 2 busy cores, two OpenMP threads per process spin against each other (measured 5x slower).
    """
    from searchrl.simulator.engines import TransformersSimulationEngine

    engine = TransformersSimulationEngine(policy_path, max_batch_size=24, torch_threads=1)
    yield engine
    engine.engine.shutdown()


class OpenAICompatServer:
    """An OpenAI-compatible completion server on 127.0.0.1 (see the module docstring).

    Args:
        engine: a :class:`~searchrl.simulator.engines.TransformersSimulationEngine`, or ``None`` for a server that
            only ever answers late / with errors.
        fail_first: answer HTTP 503 to this many requests first.
        delay_s: wait this long before answering each request.
    """

    def __init__(self, engine: Any = None, *, fail_first: int = 0, delay_s: float = 0.0) -> None:
        self.engine = engine
        self.fail_first = fail_first
        self.delay_s = delay_s
        self.requests = 0
        self.bodies: list[dict[str, Any]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=f"openai-compat-{self.port}", daemon=True)

    def __enter__(self) -> OpenAICompatServer:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("OpenAI-compatible test server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._stop = asyncio.Event()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    async def _gate(self, request: Any) -> tuple[dict[str, Any] | None, Any]:
        from aiohttp import web

        self.requests += 1
        number = self.requests  # before any await: concurrent requests must not see each other's count
        body = await request.json()
        self.bodies.append(body)
        if number <= self.fail_first:
            return None, web.json_response({"error": {"message": "overloaded"}}, status=503)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.engine is None:
            return None, web.json_response({"error": {"message": "no engine"}}, status=500)
        return body, None

    async def _generate(self, prompt: Any, body: dict[str, Any]) -> Any:
        stop = body.get("stop") or []
        [comp] = await self.engine.generate(
            [prompt],
            SamplingParams(
                max_new_tokens=int(body.get("max_tokens", 16)),
                temperature=float(body.get("temperature", 1.0)),
                top_p=float(body.get("top_p", 1.0)),
            ),
            stop=[stop] if isinstance(stop, str) else list(stop),
            seed=body.get("seed"),
        )
        return comp

    @staticmethod
    def _usage(comp: Any) -> dict[str, int]:
        return {"prompt_tokens": 0, "completion_tokens": comp.tokens, "total_tokens": comp.tokens}

    async def _completions(self, request: Any) -> Any:
        from aiohttp import web

        body, early = await self._gate(request)
        if early is not None:
            return early
        comp = await self._generate(str(body["prompt"]), body)
        return web.json_response(
            {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [{"index": 0, "text": comp.text, "finish_reason": comp.finish_reason, "logprobs": None}],
                "usage": self._usage(comp),
            }
        )

    async def _chat(self, request: Any) -> Any:
        from aiohttp import web

        body, early = await self._gate(request)
        if early is not None:
            return early
        messages = body["messages"]
        if not body.get("continue_final_message") and messages and messages[-1]["role"] == "assistant":
            return web.json_response(
                {"error": {"message": "final assistant message needs continue_final_message"}}, status=400
            )
        comp = await self._generate(messages, body)
        return web.json_response(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", ""),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": comp.text},
                        "finish_reason": comp.finish_reason,
                    }
                ],
                "usage": self._usage(comp),
            }
        )


@pytest.fixture
def openai_server_factory() -> Iterator[Any]:
    """Starts :class:`OpenAICompatServer` instances and stops them at the end of the test."""
    started: list[OpenAICompatServer] = []

    def make(engine: Any = None, **kw: Any) -> OpenAICompatServer:
        server = OpenAICompatServer(engine, **kw).__enter__()
        started.append(server)
        return server

    yield make
    for server in started:
        server.__exit__()
