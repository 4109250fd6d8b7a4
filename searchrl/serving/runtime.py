"""The gRPC server runtime every searchrl service uses.

One :class:`GrpcServer` hosts a service's servicers on a ``grpc.aio`` server with:

* the standard ``grpc.health.v1`` service (what Kubernetes gRPC probes call) and server reflection;
* Prometheus metrics on an HTTP port, served from before the (slow) build step so that a loading model or index
  is scrapable: ``searchrl_grpc_requests_total{service,method,code}``,
  ``searchrl_grpc_request_duration_seconds{service,method}`` (buckets :data:`LATENCY_BUCKETS_S`, up to 600 s),
  ``searchrl_grpc_in_flight_requests{service}`` and ``searchrl_service_serving{service}`` (0 while building);
* mapping of :mod:`searchrl.errors` exceptions to status codes (no stack trace ever reaches a caller);
* optional TLS (server certificate, and mTLS with a client CA) and bearer-token auth;
* message-size, keepalive and connection-age options (``grpc.max_connection_age_ms``: clients on long-lived channels
  reconnect, and so re-resolve a headless Service's DNS and reach pods added by a scale-out);
* a graceful shutdown on SIGTERM/SIGINT: health goes NOT_SERVING, then ``server.stop(grace)`` lets in-flight calls
  finish (the pattern of vLLM's ``grpc_server.py``). The handlers are re-asserted every
  :data:`SIGNAL_GUARD_INTERVAL_S` seconds, because libraries loaded by a service install their own on the same loop
  (SGLang's ``TokenizerManager.auto_create_handle_loop`` calls ``loop.add_signal_handler(SIGTERM, ...)``).

:func:`run_service` is the entry point of ``searchrl serve <service>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from searchrl.errors import SearchRLError
from searchrl.serving.config import ServerConfig as ServerConfig  # servers subclass it from here
from searchrl.serving.config import from_sources, parser_for, redacted
from searchrl.serving.methods import changes_state

log = logging.getLogger("searchrl.runtime")

GRPC_REQUESTS = Counter(
    "searchrl_grpc_requests_total", "gRPC requests by service, method and status code.", ["service", "method", "code"]
)
# Upper bounds (seconds) of the request-latency histogram. Policy Rollout / LoadWeights calls take minutes, so the
# finite buckets reach 600 s: ``histogram_quantile`` never reports more than the largest finite bound, and an alert
# threshold above it could never fire.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip
GRPC_LATENCY = Histogram(
    "searchrl_grpc_request_duration_seconds",
    "gRPC request latency in seconds, by service and method.",
    ["service", "method"],
    buckets=LATENCY_BUCKETS_S,
)
GRPC_IN_FLIGHT = Gauge("searchrl_grpc_in_flight_requests", "gRPC requests being served now.", ["service"])
GRPC_MAX_IN_FLIGHT = Gauge(
    "searchrl_grpc_max_in_flight_requests",
    "Admission bound (--max-concurrent-rpcs): past it a call is RESOURCE_EXHAUSTED at once; 0: unbounded.",
    ["service"],
)
SERVICE_UP = Gauge("searchrl_service_serving", "1 while the service reports SERVING on its health check.", ["service"])
GC_PAUSE = Histogram(
    "searchrl_gc_pause_seconds",
    "Pauses of CPython's cyclic garbage collector (the whole process stops), by generation.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)

# Methods that never need a token (Kubernetes probes and tooling).
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# How often the serving loop re-installs its SIGTERM/SIGINT handlers (seconds), in case a library replaced them.
SIGNAL_GUARD_INTERVAL_S = 1.0


@dataclass
class ServiceSpec:
    """One servicer to host: its full service name (for health/reflection) and the generated ``add_*`` function."""

    name: str
    servicer: Any
    add_to_server: Callable[[Any, Any], None]


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, SearchRLError):
        return getattr(grpc.StatusCode, exc.grpc_code_name), str(exc)
    return grpc.StatusCode.INTERNAL, "internal error; see the server log"


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a request message whose bytes did not parse; the handler wrapper answers INVALID_ARGUMENT."""

    error: str


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns :class:`_Undecodable` instead of raising: grpc answers a raising deserializer
    with a bare UNKNOWN/INTERNAL, while a caller that sent bad bytes should read INVALID_ARGUMENT and why."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)  # Message.FromString is bound to its class
    name = getattr(getattr(owner, "DESCRIPTOR", None), "name", "") or "request message"

    def parse(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, RuntimeWarning-derived and others
            return _Undecodable(f"request is not a valid {name}: {str(exc)[:300]}")

    return parse


async def _responses(result: Any) -> AsyncIterator[Any]:
    """The messages of a server-streaming handler's result: an async generator's items, or none for a coroutine
    handler that writes with ``context.write`` (grpc's health ``Watch``)."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    else:
        await result


async def _refuse_undecodable(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)


class _ObservedHandlers(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]  # grpc-stubs: generic
    """Auth, metrics, concurrency limit and error mapping around every RPC handler; one server-wide rule for request
    bytes that do not parse as the method's message: INVALID_ARGUMENT (health and reflection included)."""

    def __init__(self, service_label: str, token: str, max_concurrent: int, admin_token: str = "") -> None:
        self._label = service_label
        self._token = token
        self._admin_token = admin_token
        self._max = max_concurrent
        self._in_flight = 0
        GRPC_MAX_IN_FLIGHT.labels(service_label).set(max_concurrent)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method or ""
        parse = _tolerant(handler.request_deserializer)
        if method.startswith(UNAUTHENTICATED_PREFIXES):  # health and reflection: no auth, no metrics
            return self._unobserved(handler, parse)
        rejected = self._check_auth(details)
        short = method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                async with self._observe(short, context, rejected):
                    await _refuse_undecodable(request, context)
                    return await inner(request, context)  # type: ignore[arg-type]  # grpc-stubs types the sync API

            return grpc.unary_unary_rpc_method_handler(unary, parse, handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                async with self._observe(short, context, rejected):
                    await _refuse_undecodable(request, context)
                    async for item in _responses(inner_stream(request, context)):  # type: ignore[arg-type]
                        yield item

            return grpc.unary_stream_rpc_method_handler(stream, parse, handler.response_serializer)
        return handler

    @staticmethod
    def _unobserved(handler: grpc.RpcMethodHandler[Any, Any], parse: Any) -> grpc.RpcMethodHandler[Any, Any]:
        """``handler`` with only the undecodable-request rule (streaming-request methods unchanged)."""
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await _refuse_undecodable(request, context)
                return await inner(request, context)  # type: ignore[arg-type]

            return grpc.unary_unary_rpc_method_handler(unary, parse, handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
                await _refuse_undecodable(request, context)
                async for item in _responses(inner_stream(request, context)):  # type: ignore[arg-type]
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, parse, handler.response_serializer)
        return handler

    def _check_auth(self, details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message to refuse it with. With auth on, the service
        token or the admin token passes; a method that changes the server's state (no idempotency level in its
        proto: ``LoadWeights``) needs the admin token."""
        if not self._token:
            return None
        meta = dict(details.invocation_metadata or ())
        got = meta.get("authorization", "")
        got_b = got.encode() if isinstance(got, str) else b""
        admin = bool(self._admin_token) and hmac.compare_digest(got_b, f"Bearer {self._admin_token}".encode())
        if not admin and not hmac.compare_digest(got_b, f"Bearer {self._token}".encode()):
            return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
        if not admin and changes_state(details.method or ""):
            why = "" if self._admin_token else "; this server has no admin token (--admin-token-file), so no caller may"
            return (
                grpc.StatusCode.PERMISSION_DENIED,
                f"this method changes the server's state: it needs the admin token{why}",
            )
        return None

    @contextlib.asynccontextmanager
    async def _observe(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], rejected: tuple[grpc.StatusCode, str] | None
    ) -> AsyncIterator[None]:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        GRPC_IN_FLIGHT.labels(self._label).inc()
        self._in_flight += 1
        try:
            if rejected:
                code, why = rejected
                await context.abort(code, why)
            if self._max and self._in_flight > self._max:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED
                await context.abort(code, f"server busy: more than {self._max} concurrent requests; retry with backoff")
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                # The caller has given up already (it waited in grpc's queue or a slow client took its deadline):
                # computing the answer would only take capacity from calls that can still use theirs.
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                await context.abort(code, "the call's deadline passed before it was served; not computed")
            yield
        except grpc.aio.AbortError:
            got = context.code()
            code = got if isinstance(got, grpc.StatusCode) else code
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # mapped to a status; the traceback stays in the server log
            code, message = _status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("unhandled error in %s", method)
            await context.abort(code, message)
        finally:
            self._in_flight -= 1
            GRPC_IN_FLIGHT.labels(self._label).dec()
            GRPC_REQUESTS.labels(self._label, method, code.name).inc()
            GRPC_LATENCY.labels(self._label, method).observe(time.perf_counter() - start)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the config, or ``None`` for plaintext.

    Raises:
        ValueError: only one of cert/key is set.
    """
    if not (config.tls_cert_file or config.tls_key_file):
        return None
    if not (config.tls_cert_file and config.tls_key_file):
        raise ValueError("TLS needs both --tls-cert-file and --tls-key-file")
    ca = _read(config.tls_client_ca_file) if config.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(_read(config.tls_key_file), _read(config.tls_cert_file))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    """The ``grpc.aio.server`` channel arguments for ``config``: message sizes, keepalive and connection age."""
    mb = config.max_message_mb * 1024 * 1024
    options = [
        ("grpc.max_send_message_length", mb),
        ("grpc.max_receive_message_length", mb),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]
    if config.max_connection_age_ms > 0:
        options += [
            ("grpc.max_connection_age_ms", int(config.max_connection_age_ms)),
            ("grpc.max_connection_age_grace_ms", int(config.max_connection_age_grace_ms)),
        ]
    return options


class GrpcServer:
    """A started ``grpc.aio`` server with health, reflection, metrics and graceful shutdown.

    Args:
        config: shared server settings.
        specs: the servicers to host (may be set later, before :meth:`start`).
        label: service label for metrics (e.g. ``"reward"``).
    """

    def __init__(self, config: ServerConfig, specs: Sequence[ServiceSpec], label: str) -> None:
        self.config = config
        self.specs = list(specs)
        self.label = label
        self.port = 0
        self.metrics_port = -1
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]  # grpc-stubs lacks grpc_health aio
        self._server: grpc.aio.Server | None = None
        self._metrics_httpd: Any = None
        self._stopping = False

    def start_metrics(self) -> int:
        """Starts the Prometheus HTTP server (once; a no-op when ``metrics_port`` is -1 or it already runs).

        Returns:
            The bound metrics port, or -1 when disabled.

        Raises:
            OSError: the port could not be bound.
        """
        if self.config.metrics_port >= 0 and self._metrics_httpd is None:
            SERVICE_UP.labels(self.label).set(0)
            httpd, _thread = start_http_server(self.config.metrics_port, addr=self.config.host)
            self._metrics_httpd = httpd
            self.metrics_port = httpd.server_port
        return self.metrics_port

    def stop_metrics(self) -> None:
        """Stops the Prometheus HTTP server if it runs."""
        if self._metrics_httpd is not None:
            self._metrics_httpd.shutdown()
            self._metrics_httpd.server_close()
            self._metrics_httpd = None

    async def start(self) -> None:
        """Binds the ports and starts serving (and the metrics server, unless already started); health of every
        service becomes SERVING.

        Raises:
            RuntimeError: the gRPC port could not be bound.
        """
        server = grpc.aio.server(
            interceptors=[
                _ObservedHandlers(
                    self.label,
                    self.config.resolved_token(),
                    self.config.max_concurrent_rpcs,
                    self.config.resolved_admin_token(),
                )
            ],
            options=server_options(self.config),
        )
        for spec in self.specs:
            spec.add_to_server(spec.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [s.name for s in self.specs] + [
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, server)
        address = f"{self.config.host}:{self.config.grpc_port}"
        creds = server_credentials(self.config)
        port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
        if not port:
            raise RuntimeError(f"could not bind gRPC port {address}")
        self.port = port
        await server.start()
        self._server = server
        self.start_metrics()
        for spec in self.specs:
            await self.health.set(spec.name, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        SERVICE_UP.labels(self.label).set(1)
        log.info(
            "%s serving gRPC on %s:%d (tls=%s), metrics on %s",
            self.label,
            self.config.host,
            port,
            bool(creds),
            self.metrics_port,
        )

    async def stop(self, grace: float | None = None) -> None:
        """Health -> NOT_SERVING, then stops accepting calls and lets in-flight ones finish within ``grace`` seconds."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        SERVICE_UP.labels(self.label).set(0)
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.config.grace_s if grace is None else grace)
        self.stop_metrics()
        log.info("%s stopped", self.label)

    async def wait(self) -> None:
        """Blocks until the server terminates."""
        if self._server is not None:
            await self._server.wait_for_termination()


def freeze_startup_objects() -> int:
    """Moves every object alive after start-up (models, tokenizers, indexes, modules) out of the garbage collector's
    reach, so that its full collections no longer traverse them while serving.

    With a transformers model loaded a process holds ~500k tracked objects, and one full (generation-2) collection
    over them stopped the whole process (GIL held) for 100-300 ms on the development machine: a latency spike for
    every request in flight, which showed as the p99 tail of ``benchmarks/retrieval_bench.py``. This is CPython's
    ``gc.freeze()``, as pre-fork servers use it; objects created later are collected as usual. From then on every
    collection's pause is observed in ``searchrl_gc_pause_seconds{generation}``.

    Returns:
        The number of objects frozen.
    """
    import gc

    gc.collect()
    gc.freeze()
    if _gc_timer not in gc.callbacks:
        gc.callbacks.append(_gc_timer)
    return gc.get_freeze_count()


_gc_started: list[float] = []


def _gc_timer(phase: str, info: dict[str, int]) -> None:
    """``gc.callbacks`` hook: observes every collection's pause into ``searchrl_gc_pause_seconds``."""
    if phase == "start":
        _gc_started.append(time.perf_counter())
    elif _gc_started:
        GC_PAUSE.labels(str(info.get("generation", -1))).observe(time.perf_counter() - _gc_started.pop())


Builder = Callable[[Any], Awaitable[tuple[list[ServiceSpec], Callable[[], Awaitable[None]] | None]]]


async def _guard_signal_handlers(
    loop: asyncio.AbstractEventLoop, handler: Callable[[], None], interval_s: float
) -> None:
    """Re-installs ``handler`` for SIGTERM/SIGINT every ``interval_s`` seconds.

    ``loop.add_signal_handler`` keeps one callback per signal, so a library that calls it later (SGLang does on its
    first request: ``tokenizer_manager.py`` ``auto_create_handle_loop``) silently replaces ours, and SIGTERM would no
    longer drain the gRPC server. Re-adding is idempotent and costs three system calls.
    """
    while True:
        await asyncio.sleep(interval_s)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, handler)


async def serve_until_signal(config: ServerConfig, label: str, build: Builder) -> None:
    """Builds the servicers, serves them, and shuts down gracefully on SIGTERM/SIGINT.

    The metrics HTTP server starts before ``build`` (models and indexes load there, for minutes on a GPU service),
    so Prometheus scrapes succeed, with ``searchrl_service_serving`` 0, while the service loads.

    Args:
        config: the service's config (a :class:`ServerConfig` subclass).
        label: service label for metrics and logs.
        build: async factory ``build(config) -> (specs, cleanup)``; ``cleanup`` (or ``None``) runs after the server stops.
    """
    server = GrpcServer(config, [], label)
    server.start_metrics()
    try:
        specs, cleanup = await build(config)
        freeze_startup_objects()
        server.specs = list(specs)
        await server.start()
    except BaseException:
        server.stop_metrics()
        raise
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    guard = asyncio.create_task(_guard_signal_handlers(loop, stop_requested.set, SIGNAL_GUARD_INTERVAL_S))
    # Printed for supervisors (searchrl up) and humans: the ports actually bound.
    print(f"READY {label} grpc={config.host}:{server.port} metrics={server.metrics_port}", flush=True)
    try:
        await stop_requested.wait()
    finally:
        guard.cancel()
    log.info("%s: signal received, draining", label)
    await server.stop()
    if cleanup is not None:
        await cleanup()


def run_service(
    config_cls: type[ServerConfig], label: str, build: Builder, argv: Sequence[str] | None = None, description: str = ""
) -> int:
    """CLI entry of ``searchrl serve <label>``: parses flags/env into ``config_cls`` and serves until a signal.

    Returns:
        The process exit code (0 after a clean shutdown, 2 on a configuration error).
    """
    parser = parser_for(config_cls, f"searchrl serve {label}", description)
    try:
        config = from_sources(config_cls, sys.argv[1:] if argv is None else argv, parser=parser)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("starting %s with %s", label, redacted(config))
    try:
        asyncio.run(serve_until_signal(config, label, build))
    except (SearchRLError, ValueError, OSError, RuntimeError) as exc:
        log.error("%s failed to start: %s", label, exc)
        print(f"error: {label} failed to start: {exc}", flush=True)
        return 2
    return 0
