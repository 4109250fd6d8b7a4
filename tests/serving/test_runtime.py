"""The shared gRPC runtime: connection recycling (deploy review #12 / check C9), latency buckets (#17), metrics
during the build (#18), Redis password handling (#14, #35 / check C11) and the SIGTERM drain when a library replaces
the handler (GPU audit #11)."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import generate_latest

from searchrl.errors import InvalidRequest, Unavailable
from searchrl.serving import config as cfgmod
from searchrl.serving.runtime import (
    GRPC_LATENCY,
    GrpcServer,
    ServerConfig,
    ServiceSpec,
    run_service,
    serve_until_signal,
)
from searchrl.testing import free_port, redis_server, wait_for_health

HERE = Path(__file__).resolve().parent
PEER_SERVICE = "searchrl.test.Peer"


def _peer_spec() -> ServiceSpec:
    """A servicer that answers with the caller's address as the server sees it (ip:port of this connection)."""

    async def peer(request: bytes, context: Any) -> bytes:
        return str(context.peer()).encode()

    def add(servicer: Any, server: Any) -> None:
        handler = grpc.method_handlers_generic_handler(
            PEER_SERVICE, {"Peer": grpc.unary_unary_rpc_method_handler(peer)}
        )
        server.add_generic_rpc_handlers((handler,))

    return ServiceSpec(PEER_SERVICE, None, add)


# ------------------------------------------------------------------------------------------- connection age (C9)
def test_server_options_recycle_connections() -> None:
    from searchrl.serving.runtime import server_options

    opts = dict(server_options(ServerConfig()))
    assert opts["grpc.max_connection_age_ms"] == 60_000
    assert opts["grpc.max_connection_age_grace_ms"] == 600_000
    assert "grpc.max_connection_age_ms" not in dict(server_options(ServerConfig(max_connection_age_ms=0)))
    env = cfgmod.from_sources(ServerConfig, {}, {"SEARCHRL_MAX_CONNECTION_AGE_MS": "30000"})
    assert dict(server_options(env))["grpc.max_connection_age_ms"] == 30_000


async def test_long_lived_channel_reconnects_after_max_age() -> None:
    """A client channel that stays open gets a new connection after max_connection_age (so it re-resolves DNS)."""
    from searchrl.client.base import make_channel

    cfg = ServerConfig(grpc_port=0, metrics_port=-1, max_connection_age_ms=500, max_connection_age_grace_ms=1000)
    server = GrpcServer(cfg, [_peer_spec()], "peer")
    await server.start()
    channel = make_channel(f"127.0.0.1:{server.port}", [PEER_SERVICE])
    try:
        call = channel.unary_unary(f"/{PEER_SERVICE}/Peer")
        first = await call(b"", timeout=10)
        assert await call(b"", timeout=10) == first  # one connection while young
        await asyncio.sleep(2.0)  # > 500 ms (+10% jitter) + grace
        later = {await call(b"", timeout=10) for _ in range(3)}
        assert first not in later, f"still on the first connection {first!r} after its max age"
    finally:
        await channel.close()
        await server.stop(0)


# ------------------------------------------------------------------------------------------- latency buckets
def test_latency_histogram_reaches_600_seconds() -> None:
    from searchrl.serving.runtime import LATENCY_BUCKETS_S

    assert LATENCY_BUCKETS_S[-4:] == (60, 120, 300, 600)
    GRPC_LATENCY.labels("bucket-test", "Slow").observe(250.0)
    text = generate_latest().decode()
    prefix = 'searchrl_grpc_request_duration_seconds_bucket{le="%s",method="Slow",service="bucket-test"}'
    assert f"{prefix % '120.0'} 0.0" in text
    assert f"{prefix % '300.0'} 1.0" in text and f"{prefix % '600.0'} 1.0" in text


# ------------------------------------------------------------------------------------------- metrics during build
async def test_metrics_answer_while_build_runs() -> None:
    port = free_port()
    cfg = ServerConfig(grpc_port=0, metrics_port=port)
    release = asyncio.Event()
    entered = asyncio.Event()

    async def build(config: Any) -> Any:  # a model that takes a while to load
        entered.set()
        await release.wait()
        raise InvalidRequest("index is corrupt")  # then fails: the metrics server must not outlive the start-up

    task = asyncio.create_task(serve_until_signal(cfg, "slowbuild", build))
    await asyncio.wait_for(entered.wait(), 10)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return str(resp.read().decode())

    body = await asyncio.to_thread(scrape)
    assert 'searchrl_service_serving{service="slowbuild"} 0.0' in body
    assert not task.done()
    release.set()
    with pytest.raises(InvalidRequest):
        await asyncio.wait_for(task, 10)
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(scrape)


# ------------------------------------------------------------------------------------------- Redis password (C11)
def test_redacted_strips_url_userinfo() -> None:
    cfg = ServerConfig(redis_url="redis://:hunter2@redis:6379/0", redis_password="s3cret", auth_token="tok")
    red = cfgmod.redacted(cfg)
    assert red["redis_url"] == "redis://***@redis:6379/0"
    assert red["redis_password"] == "***" and red["auth_token"] == "***"
    assert cfgmod.redact_userinfo("redis://user:p@ss/w#rd@redis:6379/0") == "redis://***@redis:6379/0"
    assert cfgmod.redact_userinfo("redis://redis:6379/0") == "redis://redis:6379/0"
    assert "hunter2" not in str(red) and "s3cret" not in str(red)


def test_start_up_log_never_shows_the_redis_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SEARCHRL_REDIS_PASSWORD", "canary-env-7f3a")
    seen: list[ServerConfig] = []

    async def build(config: ServerConfig) -> Any:
        seen.append(config)
        raise InvalidRequest("stop after the start-up line")

    argv = ["--redis-url", "redis://:canary-url-9c1d@127.0.0.1:6390/0", "--metrics-port", "-1", "--grpc-port", "0"]
    with caplog.at_level(logging.INFO):
        assert run_service(ServerConfig, "canary", build, argv) == 2
    out = capsys.readouterr()
    text = "\n".join(r.getMessage() for r in caplog.records) + out.out + out.err
    assert "starting canary with" in text and "redis://***@127.0.0.1:6390/0" in text
    assert "canary-env-7f3a" not in text and "canary-url-9c1d" not in text
    assert seen[0].redis_password == "canary-env-7f3a"  # read from the environment, kept out of the log


@pytest.fixture(scope="module")
def redis_with_password() -> Iterator[tuple[str, str]]:
    """A throwaway redis-server that requires AUTH; yields (url without password, password)."""
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary")
    password = "p@ss/w#rd?%"  # characters that break a password inside a URL
    with redis_server(password=password) as url:
        yield url, password


async def test_redis_password_is_passed_apart_from_the_url(
    redis_with_password: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from searchrl.rollout.v1 import rollout_pb2
    from searchrl.services.rollouts.store import RolloutStore
    from searchrl.serving.cache import SearchCache, make_cache

    url, password = redis_with_password
    monkeypatch.delenv("SEARCHRL_REDIS_PASSWORD", raising=False)
    no_auth = SearchCache(url, 60)
    await no_auth.set_many({"retriever:k": b"v"})
    assert await no_auth.get_many(["retriever:k"]) == [None]  # NOAUTH: the cache degrades to misses
    await no_auth.close()
    explicit = SearchCache(url, 60, password=password)
    await explicit.set_many({"retriever:k": b"v"})
    assert await explicit.get_many(["retriever:k"]) == [b"v"]
    await explicit.close()
    monkeypatch.setenv("SEARCHRL_REDIS_PASSWORD", password)  # what the chart sets from its Secret
    from_env = make_cache(url, 60)
    assert from_env is not None and await from_env.get_many(["retriever:k"]) == [b"v"]
    await from_env.close()
    async with RolloutStore(url) as store:
        assert await store.add(rollout_pb2.Trajectory(id="t1"))
    monkeypatch.delenv("SEARCHRL_REDIS_PASSWORD")
    with pytest.raises(Unavailable):
        async with RolloutStore(url) as store:
            await store.add(rollout_pb2.Trajectory(id="t2"))


# ------------------------------------------------------------------------------------------- SIGTERM drain
def test_sigterm_drains_after_a_library_replaced_the_handler() -> None:
    """SGLang calls ``loop.add_signal_handler(SIGTERM, ...)`` on its first request, replacing the runtime's; the
    runtime re-asserts its handler, so a later SIGTERM still drains: the in-flight call completes, exit code 0."""
    port = free_port()
    log_path = Path(tempfile.mkstemp(prefix="searchrl-hijack-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "signal_hijack_server.py"), "--grpc-port", str(port), "--metrics-port", "-1"]
            + ["--grace-s", "20"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_for_health(f"127.0.0.1:{port}", timeout_s=120, proc=proc)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            call = ch.unary_unary("/searchrl.test.Sleeper/Sleep")
            assert call(b"hijack", timeout=10) == b"hijacked"
            time.sleep(2.5)  # the runtime re-asserts its handlers every second
            future = call.future(b"3", timeout=30)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert future.result() == b"slept"
        assert proc.wait(20) == 0
        text = log_path.read_text()
        assert "hijack: signal received, draining" in text and "LIBRARY SIGTERM HANDLER RAN" not in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log_path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- undecodable requests
async def test_undecodable_request_bytes_are_invalid_argument_in_every_method() -> None:
    """#17: bytes that do not parse as the method's message get INVALID_ARGUMENT from the runtime, for a service's
    methods (counted in the metrics, after the auth check) and for the health service, and the server stays up."""
    from grpc_health.v1 import health_pb2

    from searchrl.services.reward.server import RewardConfig, specs

    cfg = RewardConfig(grpc_port=0, metrics_port=-1, auth_token="s3cret")
    server = GrpcServer(cfg, specs(cfg), "reward-undecodable")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    bad = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, a length far past the end
    auth = (("authorization", "Bearer s3cret"),)
    try:
        score = channel.unary_unary("/searchrl.reward.v1.RewardService/Score")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await score(bad, timeout=10, metadata=auth)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert (err.value.details() or "").startswith("request is not a valid ScoreRequest: ")
        with pytest.raises(grpc.aio.AioRpcError) as err:  # auth first: no token, no parse error to read
            await score(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        check = channel.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await check(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = health_pb2.HealthCheckResponse.FromString(await check(b"", timeout=10))
        assert ok.status == health_pb2.HealthCheckResponse.SERVING
        text = generate_latest().decode()
        assert (
            'searchrl_grpc_requests_total{code="INVALID_ARGUMENT",method="Score",service="reward-undecodable"} 1.0'
            in text
        )
    finally:
        await channel.close()
        await server.stop(0)


# ------------------------------------------------------------------------------- admission control and deadlines
SLOW_SERVICE = "searchrl.test.Slow"


def _slow_spec(started: list[str], release: asyncio.Event) -> ServiceSpec:
    """``Wait`` records its request and waits for ``release``; ``Block`` holds the event loop for the request's
    number of milliseconds (a server too busy to pick up new calls)."""

    async def wait(request: bytes, context: Any) -> bytes:
        started.append(request.decode())
        try:
            await release.wait()
        except asyncio.CancelledError:
            started.append(f"{request.decode()} cancelled")
            raise
        return b"done"

    async def block(request: bytes, context: Any) -> bytes:
        time.sleep(int(request) / 1000)  # blocks the loop on purpose
        return b"done"

    def add(servicer: Any, server: Any) -> None:
        handler = grpc.method_handlers_generic_handler(
            SLOW_SERVICE,
            {"Wait": grpc.unary_unary_rpc_method_handler(wait), "Block": grpc.unary_unary_rpc_method_handler(block)},
        )
        server.add_generic_rpc_handlers((handler,))

    return ServiceSpec(SLOW_SERVICE, None, add)


async def test_admission_bound_rejects_at_once_and_is_exported() -> None:
    """#17: past --max-concurrent-rpcs a call is RESOURCE_EXHAUSTED at once (not queued), counted by status, and the
    bound is a metric next to the in-flight gauge (the chart's queue alert divides one by the other)."""
    started: list[str] = []
    release = asyncio.Event()
    cfg = ServerConfig(grpc_port=0, metrics_port=-1, max_concurrent_rpcs=2)
    server = GrpcServer(cfg, [_slow_spec(started, release)], "admission")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    wait = channel.unary_unary(f"/{SLOW_SERVICE}/Wait")
    try:
        held = [asyncio.ensure_future(wait(str(i).encode(), timeout=30)) for i in range(2)]
        while len(started) < 2:
            await asyncio.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wait(b"third", timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than 2 concurrent requests" in (err.value.details() or "")
        assert time.monotonic() - t0 < 5, "a rejected call must not wait for capacity"
        assert "third" not in started
        text = generate_latest().decode()
        assert 'searchrl_grpc_max_in_flight_requests{service="admission"} 2.0' in text
        assert 'searchrl_grpc_in_flight_requests{service="admission"} 2.0' in text
        assert 'searchrl_grpc_requests_total{code="RESOURCE_EXHAUSTED",method="Wait",service="admission"} 1.0' in text
        release.set()
        assert await asyncio.gather(*held) == [b"done", b"done"]
        assert await wait(b"after", timeout=30) == b"done"  # capacity is back
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_call_whose_deadline_passed_is_not_computed() -> None:
    """#17: the caller's deadline reaches the server. A call that waits in the server (for a batch, for the engine)
    past its deadline is cancelled there: the handler gets CancelledError, which the batchers of the retriever and
    the policy engine turn into dropping the row before it is computed (tests/services/test_policy_engine.py,
    tests/retriever/test_batcher.py). A call that could reach its handler only after its deadline (the server's loop
    was busy) is DEADLINE_EXCEEDED and its handler never runs."""
    started: list[str] = []
    cfg = ServerConfig(grpc_port=0, metrics_port=-1)
    server = GrpcServer(cfg, [_slow_spec(started, asyncio.Event())], "deadlines")
    await server.start()
    # The server's loop is this test's loop: block it from a second process's point of view with a thread client.
    target = f"127.0.0.1:{server.port}"

    def client() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        with grpc.insecure_channel(target) as ch:
            grpc.channel_ready_future(ch).result(timeout=10)
            busy = ch.unary_unary(f"/{SLOW_SERVICE}/Block").future(b"1500", timeout=30)
            time.sleep(0.2)  # Block now holds the server's loop
            try:
                ch.unary_unary(f"/{SLOW_SERVICE}/Wait")(b"late", timeout=0.5)
                late = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                late = exc.code()  # type: ignore[attr-defined]
            busy.result()
            return late, grpc.StatusCode.OK

    try:
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(f"/{SLOW_SERVICE}/Wait")(b"queued", timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(100):
            if "queued cancelled" in started:
                break
            await asyncio.sleep(0.02)
        assert started == ["queued", "queued cancelled"], "the waiting handler must be cancelled at the deadline"
        started.clear()
        late, _ = await asyncio.to_thread(client)
        assert late == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.5)  # the loop is free: a handler that was going to run has run by now
        assert started == [], "the handler ran for a call whose caller had given up"
    finally:
        await server.stop(0)
