"""Channel construction shared by every searchrl client: retries, load balancing, TLS and token auth."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc

from searchrl.serving.methods import retryable_methods

# Statuses a retried call may have failed with without the server having computed it: the connection or the
# server was down (UNAVAILABLE), or admission control turned it away (RESOURCE_EXHAUSTED).
DEFAULT_RETRY_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


def service_config_json(
    service_names: list[str],
    *,
    max_attempts: int = 5,
    initial_backoff_s: float = 0.1,
    max_backoff_s: float = 5.0,
    lb_policy: str = "round_robin",
    wait_for_ready: bool = False,
) -> str:
    """gRPC service config (JSON): per-call load balancing, and retries of the idempotent methods only.

    A method the proto marks idempotent (:func:`retryable_methods`) is retried on :data:`DEFAULT_RETRY_CODES` by
    gRPC's own retry machinery (gRFC A6): attempt ``n`` waits a random time in ``[0, min(initial_backoff_s *
    2**(n-1), max_backoff_s)]`` (full jitter), a streaming call only until its first response arrives, and never past
    the call's deadline. Other methods get no retry policy (gRPC still replays a call that never left the client).

    Args:
        service_names: fully-qualified service names (e.g. ``searchrl.retrieval.v1.RetrievalService``).
        max_attempts: total attempts including the first (gRPC caps this at 5).
        initial_backoff_s: first backoff bound, in seconds; it doubles per attempt up to ``max_backoff_s``.
        lb_policy: ``round_robin`` (one sub-channel per resolved address) or ``pick_first``.
        wait_for_ready: every method waits for the server to become reachable (gRPC wait-for-ready) within its
            deadline instead of failing at once while it is down: a service that restarts faster than the call's
            deadline is not noticed by the caller. Only the idempotent methods are also retried once sent.
    """
    names = [{"service": s, "method": m} for s in service_names for m in retryable_methods(s)]
    method_config = [
        {
            "name": names,
            "retryPolicy": {
                "maxAttempts": max(2, min(5, max_attempts)),
                "initialBackoff": f"{initial_backoff_s}s",
                "maxBackoff": f"{max_backoff_s}s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": list(DEFAULT_RETRY_CODES),
            },
            **({"waitForReady": True} if wait_for_ready else {}),
        }
    ] if names else []
    if wait_for_ready:
        # Every other method (those that change state: LoadWeights) waits too, without retries: waiting happens before
        # the call is sent, so it cannot apply a change twice. A method-level entry above takes precedence.
        method_config.append({"name": [{"service": s} for s in service_names], "waitForReady": True})
    return json.dumps({"loadBalancingConfig": [{lb_policy: {}}], "methodConfig": method_config})


@dataclass
class ChannelOptions:
    """How to reach a service.

    Attributes:
        timeout_s: default deadline per call, in seconds.
        token: bearer token sent as ``authorization: Bearer <token>``; empty for none.
        tls: use TLS; ``root_ca``/``client_cert``/``client_key`` are PEM bytes (``None``: system roots / no mTLS).
        max_message_mb: message-size limit, MiB.
        max_attempts: attempts of an idempotent call on UNAVAILABLE / RESOURCE_EXHAUSTED (backoff with jitter).
        wait_for_ready: idempotent calls wait (within their deadline) for a server that is down or restarting
            instead of failing at once (:func:`service_config_json`); for clients that would rather wait than fail,
            such as a trainer's search and policy channels.
    """

    timeout_s: float = 30.0
    token: str = ""
    tls: bool = False
    root_ca: bytes | None = None
    client_cert: bytes | None = None
    client_key: bytes | None = None
    max_message_mb: int = 64
    max_attempts: int = 5
    wait_for_ready: bool = False
    extra: list[tuple[str, Any]] = field(default_factory=list)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, admin: bool = False, **overrides: Any
    ) -> ChannelOptions:
        """Client TLS and auth settings from the environment the chart and the RayJob manifests set.

        Variables (all optional):

        * ``SEARCHRL_TLS``: ``true``/``1`` to use TLS (the endpoints ConfigMap mirrors ``global.tls.enabled``);
        * ``SEARCHRL_TLS_CA_FILE``: PEM CA bundle that signed the servers' certificates (default: system roots);
        * ``SEARCHRL_TLS_CLIENT_CERT_FILE`` / ``SEARCHRL_TLS_CLIENT_KEY_FILE``: client certificate for mTLS;
        * ``SEARCHRL_AUTH_TOKEN_FILE`` (wins) or ``SEARCHRL_AUTH_TOKEN``: the bearer token;
        * with ``admin=True``, ``SEARCHRL_ADMIN_TOKEN_FILE`` (wins) or ``SEARCHRL_ADMIN_TOKEN``, when set, replaces
          it: the token a server with auth on requires for calls that change its state (``LoadWeights``), used by
          the client that owns the weights (the trainer's policy channel).

        ``overrides`` replace fields after the environment is read (e.g. ``timeout_s=5``).

        Raises:
            InvalidRequest: a named file cannot be read, or a client certificate is given without its key.
        """
        from searchrl.errors import InvalidRequest

        env = os.environ if environ is None else environ

        def _read(var: str) -> bytes | None:
            path = env.get(var, "").strip()
            if not path:
                return None
            try:
                with open(path, "rb") as fh:
                    return fh.read()
            except OSError as exc:
                raise InvalidRequest(f"{var}={path} cannot be read: {exc.strerror or exc}") from exc

        tls = env.get("SEARCHRL_TLS", "").strip().lower() in ("1", "true", "yes", "on")
        cert, key = _read("SEARCHRL_TLS_CLIENT_CERT_FILE"), _read("SEARCHRL_TLS_CLIENT_KEY_FILE")
        if (cert is None) != (key is None):
            raise InvalidRequest("SEARCHRL_TLS_CLIENT_CERT_FILE and SEARCHRL_TLS_CLIENT_KEY_FILE go together (mTLS)")
        token_file = _read("SEARCHRL_AUTH_TOKEN_FILE")
        token = token_file.decode().strip() if token_file is not None else env.get("SEARCHRL_AUTH_TOKEN", "").strip()
        if admin:
            admin_file = _read("SEARCHRL_ADMIN_TOKEN_FILE")
            admin_token = (
                admin_file.decode().strip() if admin_file is not None else env.get("SEARCHRL_ADMIN_TOKEN", "").strip()
            )
            token = admin_token or token
        opts = cls(
            token=token,
            tls=tls,
            root_ca=_read("SEARCHRL_TLS_CA_FILE") if tls else None,
            client_cert=cert if tls else None,
            client_key=key if tls else None,
        )
        for name, value in overrides.items():
            setattr(opts, name, value)
        return opts


def make_channel(target: str, service_names: list[str], options: ChannelOptions | None = None) -> grpc.aio.Channel:
    """An asyncio channel to ``target`` with the retry/load-balancing service config and optional TLS/token.

    Args:
        target: ``host:port`` or ``dns:///host:port`` (headless Service: calls spread over all pod IPs).
        service_names: services the retry policy covers.
        options: connection settings.
    """
    o = options or ChannelOptions()
    mb = o.max_message_mb * 1024 * 1024
    chan_opts: list[tuple[str, Any]] = [
        (
            "grpc.service_config",
            service_config_json(service_names, max_attempts=o.max_attempts, wait_for_ready=o.wait_for_ready),
        ),
        ("grpc.enable_retries", 1),
        ("grpc.max_send_message_length", mb),
        ("grpc.max_receive_message_length", mb),
        ("grpc.keepalive_time_ms", 30_000),
        *o.extra,
    ]
    if o.tls:
        creds = grpc.ssl_channel_credentials(o.root_ca, o.client_key, o.client_cert)
        if o.token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(o.token))
        return grpc.aio.secure_channel(target, creds, options=chan_opts)
    return grpc.aio.insecure_channel(target, options=chan_opts)


class BaseClient:
    """Base of the typed clients: owns the channel, default deadline and auth metadata; an async context manager."""

    service_name: str = ""

    def __init__(self, target: str, options: ChannelOptions | None = None) -> None:
        self.target = target
        self.options = options or ChannelOptions()
        self.channel = make_channel(target, [self.service_name], self.options)
        # Plaintext + token (loopback development) sends the token as metadata; TLS sends it as call credentials.
        self._metadata: tuple[tuple[str, str], ...] = ()
        if self.options.token and not self.options.tls:
            self._metadata = (("authorization", f"Bearer {self.options.token}"),)

    def call_kwargs(self, timeout_s: float | None = None) -> dict[str, Any]:
        """Keyword arguments for a stub call: deadline and metadata."""
        kw: dict[str, Any] = {"timeout": self.options.timeout_s if timeout_s is None else timeout_s}
        if self._metadata:
            kw["metadata"] = self._metadata
        return kw

    async def close(self) -> None:
        """Closes the channel."""
        await self.channel.close(None)

    async def __aenter__(self) -> BaseClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Waits until the channel connects.

        Raises:
            TimeoutError: not connected within ``timeout_s``.
        """
        import asyncio

        await asyncio.wait_for(self.channel.channel_ready(), timeout_s)
