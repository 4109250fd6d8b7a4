"""A service on the real runtime (``run_service``) whose first ``Sleep("hijack")`` call does what SGLang does on its
first request: ``loop.add_signal_handler(SIGTERM, <its own handler>)``. Used by ``test_runtime.py`` as a child
process; ``Sleep("<seconds>")`` is a call that stays in flight that long.

    python tests/serving/signal_hijack_server.py --grpc-port 50099 --metrics-port -1
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import grpc

from searchrl.serving.runtime import ServerConfig, ServiceSpec, run_service

SERVICE = "searchrl.test.Sleeper"


def library_sigterm_handler() -> None:
    print("LIBRARY SIGTERM HANDLER RAN", flush=True)


async def sleep(request: bytes, context: Any) -> bytes:
    if request == b"hijack":
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, library_sigterm_handler)
        return b"hijacked"
    await asyncio.sleep(float(request.decode()))
    return b"slept"


def add_to_server(servicer: Any, server: Any) -> None:
    handler = grpc.method_handlers_generic_handler(SERVICE, {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)})
    server.add_generic_rpc_handlers((handler,))


async def build(config: ServerConfig) -> tuple[list[ServiceSpec], None]:
    return [ServiceSpec(SERVICE, None, add_to_server)], None


if __name__ == "__main__":
    sys.exit(run_service(ServerConfig, "hijack", build))
