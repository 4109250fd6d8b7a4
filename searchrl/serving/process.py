"""Starting and watching server processes: free loopback ports, one polling loop with a deadline, gRPC health and
Redis readiness checks, a private ``redis-server``, and stopping a child's whole process group.

Shared by ``searchrl up`` (:mod:`searchrl.stack`) and the test kit (:mod:`searchrl.testing`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

T = TypeVar("T")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll_until(
    check: Callable[[], T],
    timeout_s: float,
    what: str,
    interval_s: float = 0.2,
    proc: subprocess.Popen[Any] | None = None,
) -> T:
    """Calls ``check`` every ``interval_s`` seconds until it returns a truthy value, and returns that value.

    Raises:
        RuntimeError: ``proc`` exited first (the message names ``what`` and the exit code).
        TimeoutError: ``check`` stayed falsy for ``timeout_s`` seconds (the message names ``what``).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with code {proc.returncode} first")
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:.0f}s")
        time.sleep(interval_s)


def wait_for_health(
    target: str,
    service: str = "",
    timeout_s: float = 120.0,
    proc: subprocess.Popen[bytes] | None = None,
    root_ca: bytes | None = None,
    client_cert: tuple[bytes, bytes] | None = None,
) -> None:
    """Polls ``grpc.health.v1.Health/Check`` until SERVING (over TLS trusting ``root_ca`` when given, presenting
    ``client_cert`` = ``(certificate PEM, key PEM)`` to a server that requires client certificates).

    Raises:
        RuntimeError: ``proc`` exited before becoming healthy.
        TimeoutError: not SERVING within ``timeout_s``.
    """
    cert, key = client_cert or (None, None)
    channel = (
        grpc.secure_channel(target, grpc.ssl_channel_credentials(root_ca, key, cert))
        if root_ca is not None
        else grpc.insecure_channel(target)
    )
    with channel as ch:
        stub = health_pb2_grpc.HealthStub(ch)

        def serving() -> bool:
            try:
                resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            except grpc.RpcError:
                return False
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

        poll_until(serving, timeout_s, f"{target} SERVING", proc=proc)


def redis_command(
    port: int, data_dir: str | Path, password: str | None = None, appendfsync: str | None = None
) -> list[str]:
    """The argv of a private ``redis-server`` on 127.0.0.1:``port`` working in ``data_dir``, requiring AUTH with
    ``password`` when given; persistent (append-only file, fsync ``appendfsync``: ``"always"``, ``"everysec"`` or
    ``"no"``) when ``appendfsync`` is given, else without persistence.

    Raises:
        FileNotFoundError: no ``redis-server`` on ``PATH`` (the message says how to install it).
    """
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError(
            "redis-server not found. Install it (Debian/Ubuntu: sudo apt-get install redis-server; "
            "macOS: brew install redis), or use an existing Redis (searchrl up --redis-url)."
        )
    auth = ["--requirepass", password] if password else []
    if appendfsync not in (None, "always", "everysec", "no"):
        raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
    aof = ["--appendonly", "yes", "--appendfsync", appendfsync] if appendfsync else ["--appendonly", "no"]
    flags = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", *aof, "--dir", str(data_dir)]
    return [binary, *flags, *auth]


def wait_for_redis(
    url: str, timeout_s: float = 20.0, proc: subprocess.Popen[Any] | None = None, password: str | None = None
) -> None:
    """Polls ``PING`` on the Redis at ``url`` (AUTH with ``password`` when given) until it answers.

    Raises:
        RuntimeError: ``proc`` exited first.
        TimeoutError: no answer within ``timeout_s``.
    """
    import redis

    def answers() -> bool:
        with redis.Redis.from_url(url, password=password) as client:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

    poll_until(answers, timeout_s, f"redis at {url}", interval_s=0.05, proc=proc)


def start_redis(
    port: int,
    data_dir: str | Path,
    timeout_s: float = 20.0,
    password: str | None = None,
    appendfsync: str | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts a private ``redis-server`` (:func:`redis_command`, output discarded) and waits until it answers.

    Returns:
        The process and its URL, ``redis://127.0.0.1:<port>/0`` (without the password).

    Raises:
        FileNotFoundError: no ``redis-server`` binary.
        RuntimeError | TimeoutError: it exited or did not answer within ``timeout_s`` (the process is terminated).
    """
    cmd = redis_command(port, data_dir, password, appendfsync)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_for_redis(url, timeout_s, proc, password)
    except BaseException:
        stop_process_group(proc, group=False)
        raise
    return proc, url


def serve_command(service: str, grpc_port: int, metrics_port: int, args: Sequence[str] = ()) -> list[str]:
    """The argv of ``searchrl serve <service>`` on the given ports, run by this interpreter."""
    ports = ["--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    return [sys.executable, "-m", "searchrl", "serve", service, *ports, *args]


def stop_process_group(proc: subprocess.Popen[Any], grace_s: float = 15.0, group: bool = True) -> int | None:
    """SIGTERM, then SIGKILL after ``grace_s`` seconds, to ``proc``'s process group (``group``, for a child started
    with ``start_new_session=True``) or to ``proc`` alone; returns its exit code."""
    if proc.poll() is None:
        kill: Callable[[int], None] = (
            (lambda sig: os.killpg(proc.pid, sig)) if group else (lambda sig: proc.send_signal(sig))
        )
        with contextlib.suppress(ProcessLookupError):
            kill(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                kill(signal.SIGKILL)
            proc.wait(5)
    return proc.returncode
