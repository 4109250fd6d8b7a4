"""Starting and watching server processes: a free loopback port, and waiting for a gRPC health check.

Shared by ``searchrl up`` (:mod:`searchrl.stack`) and the test kit (:mod:`searchrl.testing`).
"""

from __future__ import annotations

import socket
import subprocess
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_health(
    target: str,
    service: str = "",
    timeout_s: float = 120.0,
    proc: subprocess.Popen[bytes] | None = None,
    root_ca: bytes | None = None,
) -> None:
    """Polls ``grpc.health.v1.Health/Check`` until SERVING (over TLS trusting ``root_ca`` when given).

    Raises:
        RuntimeError: ``proc`` exited before becoming healthy (its output is in the message when captured).
        TimeoutError: not SERVING within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    channel = (
        grpc.secure_channel(target, grpc.ssl_channel_credentials(root_ca))
        if root_ca is not None
        else grpc.insecure_channel(target)
    )
    with channel as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"server process exited with code {proc.returncode} before it was healthy")
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING after {timeout_s:.0f}s")
