"""Typed service configuration: one dataclass per service, kebab-case CLI flags and ``SEARCHRL_`` env vars.

Mirrors vLLM's ``EngineArgs``/SGLang's ``ServerArgs``: every field of a config dataclass becomes a CLI flag
(``max_batch_size`` -> ``--max-batch-size``) and an environment variable (``SEARCHRL_MAX_BATCH_SIZE``). Precedence:
CLI flag > environment variable > dataclass default. The prefix avoids ``<SERVICE>_PORT`` names, which Kubernetes
service links inject into every pod.

The field's ``metadata["help"]`` is the flag's help text; fields whose metadata has ``secret=True`` are never printed,
and :func:`redacted` strips the userinfo of any URL-valued field before a config is logged.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

ENV_PREFIX = "SEARCHRL_"

T = TypeVar("T")


def env_name(field_name: str) -> str:
    """Environment variable for a config field, e.g. ``grpc_port`` -> ``SEARCHRL_GRPC_PORT``."""
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    """CLI flag for a config field, e.g. ``grpc_port`` -> ``--grpc-port``."""
    return "--" + field_name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """Strips ``Optional[...]``/``X | None`` and returns the remaining type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _base_type(args[0])
    return tp


def parse_value(tp: Any, raw: str) -> Any:
    """Converts a string from the command line or the environment to the field's type.

    Raises:
        ValueError: the string does not parse as the type (the message names the accepted forms).
    """
    base = _base_type(tp)
    if base is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false/1/0), got {raw!r}")
    if base in (int, float, str):
        return base(raw)
    origin = typing.get_origin(base)
    if origin in (list, tuple, Sequence):
        (item,) = typing.get_args(base)[:1] or (str,)
        items = [parse_value(item, p) for p in raw.split(",") if p.strip()]
        return tuple(items) if origin is tuple else items
    if typing.get_origin(base) is typing.Literal:
        if raw not in typing.get_args(base):
            raise ValueError(f"expected one of {typing.get_args(base)}, got {raw!r}")
        return raw
    return raw


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Adds one flag per dataclass field of ``cls`` to ``parser`` (default: not given, so env/defaults apply)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        helptext = f.metadata.get("help", "")
        default = None if f.metadata.get("secret") else _default_of(f)
        helptext = f"{helptext} [env {env_name(f.name)}; default {default!r}]"
        parser.add_argument(
            flag_name(f.name), dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(), help=helptext, type=str
        )
        del tp


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def from_sources(
    cls: type[T], args: argparse.Namespace | Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> T:
    """Builds a ``cls`` instance from CLI args, then ``SEARCHRL_*`` env vars, then defaults.

    Raises:
        ValueError: a flag or env var does not parse; the message names the flag/variable.
    """
    environ = os.environ if environ is None else environ
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if f.name in given and given[f.name] is not None:
            value = given[f.name]
            source = flag_name(f.name)
        elif env_name(f.name) in environ:
            value = environ[env_name(f.name)]
            source = env_name(f.name)
        else:
            continue
        if isinstance(value, str):
            try:
                value = parse_value(tp, value)
            except ValueError as exc:
                raise ValueError(f"{source}: {exc}") from None
        kwargs[f.name] = value
    return cls(**kwargs)


def redis_password(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The Redis AUTH password for redis-py's ``password=``: ``explicit`` when non-empty, else the
    ``SEARCHRL_REDIS_PASSWORD`` environment variable (what the chart sets from its Secret), else ``None``.

    The password travels apart from ``redis_url`` so that it is never part of a logged URL and needs no URL escaping
    (redis-py gives a password inside the URL precedence over this one).
    """
    env = os.environ if environ is None else environ
    return explicit or env.get(env_name("redis_password")) or None


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


def redacted(cfg: Any) -> dict[str, Any]:
    """The config as a dict for logs: secret fields that are set become ``'***'``, and every string value that is a
    URL with userinfo (e.g. ``redis_url`` with a password) has it replaced by ``***`` (:func:`redact_userinfo`)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("secret") and v:
            v = "***"
        elif isinstance(v, str):
            v = redact_userinfo(v)
        out[f.name] = v
    return out


def field(
    default: Any = dataclasses.MISSING, *, help: str, secret: bool = False, default_factory: Any = dataclasses.MISSING
) -> Any:  # noqa: A002
    """A dataclass field with help text (and a secret marker) for :func:`add_arguments`."""
    md = {"help": help, "secret": secret}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)
