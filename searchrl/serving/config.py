"""Typed service configuration on pydantic-settings: one class per server, kebab-case CLI flags and ``SEARCHRL_`` env.

Mirrors vLLM's ``EngineArgs``/SGLang's ``ServerArgs``: every field of a :class:`ServerConfig` subclass becomes a CLI
flag (``max_batch_size`` -> ``--max-batch-size``) and an environment variable. Precedence (:func:`from_sources`):
CLI flag > environment variable > default. Values are validated by pydantic (booleans accept
``1/0/true/false/yes/no/on/off``; a list reads ``a,b,c`` from a flag or the environment).

Environment names (:func:`env_name`): the settings every server shares (the fields of :class:`ServerConfig`: host,
ports, TLS, auth, Redis, ...) read ``SEARCHRL_<FIELD>`` (``SEARCHRL_GRPC_PORT``); a server's own fields read
``SEARCHRL_<SERVICE>_<FIELD>``, the service being the class name without ``Config`` (``PolicyConfig.max_batch_size``
reads ``SEARCHRL_POLICY_MAX_BATCH_SIZE``), so that a variable meant for one server never reaches a sibling started
from the same environment. The prefix avoids ``<SERVICE>_PORT`` names, which Kubernetes service links inject.

A field's ``help`` is its flag's help text; fields declared with ``secret=True`` are shown as ``***`` by
:func:`redacted`, which also strips the userinfo of any URL-valued field before a config is logged.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from pydantic import Field, NonNegativeInt, ValidationError, field_validator
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings, CliSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

ENV_PREFIX = "SEARCHRL_"
DEFAULT_PORTS = {
    "reward": (50051, 9091),
    "retriever": (50052, 9092),
    "simulator": (50053, 9093),
    "policy": (50054, 9094),
}
"""Default (gRPC, metrics) ports of each server: its config's ``grpc_port``/``metrics_port``, ``searchrl up
--fixed-ports``, the Dockerfiles' ``ENV`` and the chart's ``service`` values (tests/serving/test_config.py checks)."""


def field(default: Any = PydanticUndefined, *, help: str, secret: bool = False, default_factory: Any = None) -> Any:  # noqa: A002
    """A config field with help text (the flag's ``--help``) and an optional secret marker (see :func:`redacted`)."""
    extra: dict[str, Any] | None = {"secret": True} if secret else None
    if default_factory is not None:
        return Field(default_factory=default_factory, description=help, json_schema_extra=extra)
    return Field(default, description=help, json_schema_extra=extra)


class ServerConfig(BaseSettings):
    """Settings every service shares. Service configs subclass it and add their own fields.

    Constructing a config directly (``RewardConfig(max_batch_size=8)``) uses the given values and the defaults only;
    :func:`from_sources` adds the command line and the environment.
    """

    model_config = SettingsConfigDict(cli_kebab_case=True, cli_implicit_flags=False)

    host: str = field("127.0.0.1", help="Address to bind (loopback by default; 0.0.0.0 in a pod).")
    grpc_port: int = field(50051, help="gRPC port; 0 picks a free port.")
    metrics_port: int = field(9090, help="Prometheus /metrics HTTP port; 0 picks a free port, -1 disables.")
    max_message_mb: int = field(64, help="Max gRPC message size, in MiB, both directions.")
    max_concurrent_rpcs: NonNegativeInt = field(
        1024,
        help="Admission bound: max RPCs in the service at once (being computed or queued for a batch); a call past it"
        " gets RESOURCE_EXHAUSTED at once instead of waiting and growing memory. 0: unbounded.",
    )
    grace_s: float = field(10.0, help="Seconds in-flight calls get to finish on shutdown.")
    tls_cert_file: str = field("", help="PEM server certificate; enables TLS with tls_key_file.")
    tls_key_file: str = field("", help="PEM private key of the server certificate.")
    tls_client_ca_file: str = field(
        "", help="PEM CA bundle; when set, clients must present a certificate it signed (mTLS)."
    )
    auth_token: str = field(
        "",
        help="Bearer token callers must send ('authorization: Bearer <token>'). Prefer auth_token_file.",
        secret=True,
    )
    auth_token_file: str = field("", help="File holding the bearer token (e.g. a mounted Kubernetes Secret).")
    admin_token: str = field(
        "",
        help="With auth on: the bearer token that may call methods that change the server's state"
        " (PolicyService.LoadWeights); the auth token may not. Empty: no caller may. Prefer admin_token_file.",
        secret=True,
    )
    admin_token_file: str = field("", help="File holding the admin token (e.g. a mounted Kubernetes Secret).")
    max_connection_age_ms: int = field(
        60_000,
        help="Close each client connection (HTTP/2 GOAWAY; gRPC adds +-10 percent jitter) after this many ms, so "
        "that long-lived client channels reconnect and re-resolve DNS (new pods of a scale-out get traffic). 0: never.",
    )
    max_connection_age_grace_ms: int = field(
        600_000,
        help="How long calls already running on an aged connection may go on before it is closed, in ms.",
    )
    redis_url: str = field(
        "",
        help="Redis URL for the search cache / rollout store, e.g. redis://127.0.0.1:6379/0 (no password: use "
        "redis_password). Empty: none.",
    )
    redis_password: str = field(
        "",
        help="Redis password (AUTH), passed to redis-py apart from the URL; never logged. Prefer the env variable.",
        secret=True,
    )
    cache_ttl_s: int = field(7 * 24 * 3600, help="TTL of search-cache entries, in seconds.")
    log_level: str = field("INFO", help="Python log level.")

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        """A server's ``grpc_port``/``metrics_port`` default to its :data:`DEFAULT_PORTS` row (``RewardConfig``: reward)."""
        if ports := DEFAULT_PORTS.get(cls.__name__.removesuffix("Config").lower()):
            cls.model_fields["grpc_port"].default, cls.model_fields["metrics_port"].default = ports
            cls.model_rebuild(force=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the given values: the command line and the environment come in through :func:`from_sources`."""
        return (init_settings,)

    @field_validator("*", mode="before")
    @classmethod
    def _parse_raw_strings(cls, value: Any, info: Any) -> Any:
        """A flag's or variable's string: ``"a,b,,c"`` -> ``["a", "b", "c"]`` for a list field (empty items dropped),
        and ``" On "`` -> ``"On"`` for a boolean one."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, str) and str(annotation).startswith(("list[", "tuple[")):
            return [part for part in value.split(",") if part.strip()]
        return value.strip() if isinstance(value, str) and annotation is bool else value

    def resolved_token(self) -> str:
        """The bearer token from ``auth_token`` or ``auth_token_file`` (file wins); empty when auth is off."""
        if self.auth_token_file:
            with open(self.auth_token_file, encoding="utf-8") as fh:
                return fh.read().strip()
        return self.auth_token

    def resolved_admin_token(self) -> str:
        """The admin token from ``admin_token`` or ``admin_token_file`` (file wins); empty when none is set or the file
        does not exist (the chart mounts it from an optional Secret key: no key, no admin, LoadWeights refused)."""
        if self.admin_token_file:
            try:
                with open(self.admin_token_file, encoding="utf-8") as fh:
                    return fh.read().strip()
            except FileNotFoundError:
                return ""
        return self.admin_token


C = TypeVar("C", bound=ServerConfig)


def env_name(cls: type[ServerConfig], field_name: str) -> str:
    """Environment variable of a config field: ``SEARCHRL_GRPC_PORT`` for a shared :class:`ServerConfig` field,
    ``SEARCHRL_POLICY_MAX_BATCH_SIZE`` for ``PolicyConfig.max_batch_size``."""
    if field_name in ServerConfig.model_fields:
        return ENV_PREFIX + field_name.upper()
    return f"{ENV_PREFIX}{cls.__name__.removesuffix('Config').upper()}_{field_name.upper()}"


def flag_name(field_name: str) -> str:
    """CLI flag for a config field, e.g. ``grpc_port`` -> ``--grpc-port``."""
    return "--" + field_name.replace("_", "-")


def parser_for(cls: type[ServerConfig], prog: str | None = None, description: str = "") -> argparse.ArgumentParser:
    """An argument parser with one flag per field of ``cls``; its help ends with the environment variable names."""
    names = "\n".join(f"  {flag_name(n):34} {env_name(cls, n)}" for n in cls.model_fields)
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"environment variables (a flag wins over its variable):\n{names}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def from_sources(
    cls: type[C],
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
    parser: argparse.ArgumentParser | None = None,
) -> C:
    """Builds a ``cls`` instance from the flags in ``argv``, then the environment (:func:`env_name`), then defaults.

    Args:
        argv: command-line flags (``["--max-batch-size", "7"]``); ``None``: none.
        environ: the environment; ``None``: ``os.environ``.
        parser: the argparse parser to add the flags to (:func:`parser_for` when ``None``); ``--help`` and unknown
            flags exit through it.

    Raises:
        ValueError: a flag or env var does not validate; the message names the flag or variable.
    """
    environ = os.environ if environ is None else environ
    env = {n: environ[env_name(cls, n)] for n in cls.model_fields if env_name(cls, n) in environ}
    cli = CliSettingsSource(cls, root_parser=parser or parser_for(cls), cli_parse_args=list(argv or ()))()
    try:
        return cls(**{**env, **cli})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else ""
            source = flag_name(name) if name in cli else env_name(cls, name) if name in env else name
            problems.append(f"{source}: {err['msg']} (got {err.get('input')!r})")
        raise ValueError("; ".join(problems)) from None


def redis_password(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The Redis AUTH password for redis-py's ``password=``: ``explicit`` when non-empty, else the
    ``SEARCHRL_REDIS_PASSWORD`` environment variable (what the chart sets from its Secret), else ``None``.

    The password travels apart from ``redis_url`` so that it is never part of a logged URL and needs no URL escaping
    (redis-py gives a password inside the URL precedence over this one).
    """
    env = os.environ if environ is None else environ
    return explicit or env.get(env_name(ServerConfig, "redis_password")) or None


def redact_userinfo(value: str) -> str:
    """A URL with its userinfo (``user:password@``) replaced by ``***@``; any other string unchanged.

    ``redis://:s3cret@redis:6379/0`` -> ``redis://***@redis:6379/0``. Everything between ``://`` and the *last*
    ``@`` counts as userinfo, so an unescaped ``@``, ``/`` or ``#`` inside a password is redacted too (an ``@`` in a
    path is over-redacted, which is harmless in a log).
    """
    scheme, sep, rest = value.partition("://")
    if not sep or "@" not in rest:
        return value
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def redacted(cfg: ServerConfig) -> dict[str, Any]:
    """The config as a dict for logs: secret fields that are set become ``'***'``, and every string value that is a
    URL with userinfo (e.g. ``redis_url`` with a password) has it replaced by ``***`` (:func:`redact_userinfo`)."""
    out: dict[str, Any] = {}
    for name, info in type(cfg).model_fields.items():
        v = getattr(cfg, name)
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("secret") and v:
            v = "***"
        elif isinstance(v, str):
            v = redact_userinfo(v)
        out[name] = v
    return out
