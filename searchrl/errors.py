"""Errors shared by the libraries and the services.

Library code raises these; the gRPC runtime (:mod:`searchrl.serving.runtime`) maps them to status codes, so a caller
sees a clear message and never a stack trace:

=====================  ======================
exception              gRPC status
=====================  ======================
``InvalidRequest``     ``INVALID_ARGUMENT``
``Unavailable``        ``UNAVAILABLE``
``DeadlineExceeded``   ``DEADLINE_EXCEEDED``
``ResourceExhausted``  ``RESOURCE_EXHAUSTED``
``FailedPrecondition`` ``FAILED_PRECONDITION``
``PermissionDenied``   ``PERMISSION_DENIED``
=====================  ======================
"""

from __future__ import annotations


class SearchRLError(Exception):
    """Base class of the errors searchrl raises on purpose; ``str(exc)`` is safe to show to a caller."""

    grpc_code_name = "INTERNAL"


class InvalidRequest(SearchRLError, ValueError):
    """The caller sent something invalid (empty batch, bad top-k, unknown scheme ...)."""

    grpc_code_name = "INVALID_ARGUMENT"


class Unavailable(SearchRLError):
    """A dependency (engine, Redis, another service) is down; the caller may retry with backoff."""

    grpc_code_name = "UNAVAILABLE"


class DeadlineExceeded(SearchRLError):
    """A dependency did not answer in time."""

    grpc_code_name = "DEADLINE_EXCEEDED"


class ResourceExhausted(SearchRLError):
    """The server is over a configured limit (queue full, too many concurrent requests)."""

    grpc_code_name = "RESOURCE_EXHAUSTED"


class FailedPrecondition(SearchRLError):
    """The server is not in a state to serve the request (e.g. index and model disagree)."""

    grpc_code_name = "FAILED_PRECONDITION"


class PermissionDenied(SearchRLError):
    """The caller may not do this here (e.g. load weights from outside the server's checkpoint roots)."""

    grpc_code_name = "PERMISSION_DENIED"


def error_for_status(code_name: str, message: str) -> SearchRLError:
    """The searchrl error a gRPC status maps to (the inverse of the table above), for clients that turn a peer's
    status back into an exception: ``error_for_status("UNAVAILABLE", "...")`` is an :class:`Unavailable`. Any other
    status is a plain :class:`SearchRLError` whose message names it."""
    for cls in (InvalidRequest, Unavailable, DeadlineExceeded, ResourceExhausted, FailedPrecondition, PermissionDenied):
        if cls.grpc_code_name == code_name:
            return cls(message)
    return SearchRLError(f"{code_name}: {message}")
