"""Search-R1- and FlashRAG-compatible HTTP API on the retriever's event loop (aiohttp).

Existing Search-R1 scripts and verl's stock ``SearchTool`` (tool config ``retrieval_service_url``) talk to this
unchanged; so do ReSearch/FlashRAG clients:

``POST /retrieve`` (Search-R1 ``search_r1/search/retrieval_server.py``)
    ``{"queries": [...], "topk": 3, "return_scores": true}`` ->
    ``{"result": [[{"document": {"id": ..., "contents": "\\"Title\\"\\ntext"}, "score": s}, ...], ...]}``;
    without ``return_scores``: ``{"result": [[{"id": ..., "contents": ...}, ...], ...]}``. A missing/0 ``topk`` means
    the server default.
``POST /search`` (FlashRAG/ReSearch ``retriever_serving.py``)
    ``{"query": "...", "top_n": 10, "return_score": false}`` -> ``[doc, ...]``, or ``[[doc, ...], [score, ...]]``.
``POST /batch_search``
    ``{"query": [...], "top_n": 10, "return_score": false}`` -> ``[[doc, ...], ...]``, or ``[[[doc, ...], ...],
    [[score, ...], ...]]``.
``GET /health``
    ``{"status": "healthy", "index": {...}}``.

Bad JSON or bad fields -> HTTP 400 ``{"detail": message}`` (FastAPI's error shape); limits are the gRPC ones.

Security follows the gRPC port's settings: with a bearer token (``--auth-token`` / ``--auth-token-file``) every route
but ``/health`` needs ``Authorization: Bearer <token>`` (compared in constant time), else HTTP 401
``{"detail": ...}`` with ``WWW-Authenticate: Bearer``; with ``--tls-cert-file``/``--tls-key-file`` the port serves
HTTPS with that certificate, and with ``--tls-client-ca-file`` it requires client certificates (mTLS), as gRPC does.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
from typing import Any

from aiohttp import web

from searchrl.errors import InvalidRequest, SearchRLError
from searchrl.retriever.engine import RetrievalEngine

log = logging.getLogger("searchrl.retriever.http")

FLASHRAG_DEFAULT_TOP_N = 10  # FlashRAG's retriever_serving.py default


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"detail": message}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body


def _int_field(body: dict[str, Any], name: str, default: int | None) -> int | None:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"'{name}' must be an integer, got {type(v).__name__}")
    return v


def _bool_field(body: dict[str, Any], name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise InvalidRequest(f"'{name}' must be true or false")
    return v


def _str_list(v: Any, name: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(q, str) for q in v):
        raise InvalidRequest(f"'{name}' must be a list of strings")
    return v


def _doc(d: Any) -> dict[str, str]:
    return {"id": d.id, "contents": f'"{d.title}"\n{d.text}'}


#: Routes that never need a token (Kubernetes probes).
OPEN_PATHS = frozenset({"/health"})


def server_ssl_context(cert_file: str, key_file: str, client_ca_file: str = "") -> ssl.SSLContext | None:
    """TLS server context for the HTTP port from the service's TLS settings, or ``None`` for plain HTTP.

    Args:
        cert_file: PEM server certificate (chain).
        key_file: PEM private key of the certificate.
        client_ca_file: PEM CA bundle; when set, clients must present a certificate it signed (mTLS).

    Raises:
        ValueError: only one of ``cert_file`` / ``key_file`` is set.
        OSError, ssl.SSLError: unreadable or mismatched files.
    """
    if not (cert_file or key_file):
        return None
    if not (cert_file and key_file):
        raise ValueError("TLS needs both --tls-cert-file and --tls-key-file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca_file:
        ctx.load_verify_locations(cafile=client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class HttpApi:
    """The aiohttp application serving :class:`RetrievalEngine` over HTTP(S).

    Args:
        engine: the shared engine (same batcher and cache as gRPC).
        max_body_mb: largest request body accepted, MiB.
        token: bearer token required on every route but ``/health`` (empty: no auth).
        ssl_context: serve HTTPS with this context (:func:`server_ssl_context`); ``None``: plain HTTP.
    """

    def __init__(
        self,
        engine: RetrievalEngine,
        max_body_mb: int = 64,
        token: str = "",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.engine = engine
        self._expected_auth = f"Bearer {token}".encode() if token else b""
        self.ssl_context = ssl_context
        self.app = web.Application(client_max_size=max_body_mb * 1024 * 1024, middlewares=[self._auth, self._errors])
        self.app.add_routes(
            [
                web.post("/retrieve", self.retrieve),
                web.post("/search", self.search),
                web.post("/batch_search", self.batch_search),
                web.get("/health", self.health),
            ]
        )
        self._runner: web.AppRunner | None = None
        self.port = -1

    @property
    def scheme(self) -> str:
        """``"https"`` with TLS, else ``"http"``."""
        return "https" if self.ssl_context is not None else "http"

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """401 unless ``Authorization`` is exactly ``Bearer <token>`` (constant-time compare); ``/health`` is open."""
        if self._expected_auth and request.path not in OPEN_PATHS:
            got = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(got, self._expected_auth):
                return web.json_response(
                    {"detail": "missing or invalid bearer token (send 'Authorization: Bearer <token>')"},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except InvalidRequest as exc:
            return _error(400, str(exc))
        except SearchRLError as exc:
            status = {
                "UNAVAILABLE": 503,
                "DEADLINE_EXCEEDED": 504,
                "RESOURCE_EXHAUSTED": 429,
                "FAILED_PRECONDITION": 503,
            }
            return _error(status.get(exc.grpc_code_name, 500), str(exc))
        except Exception:  # noqa: BLE001 - never a stack trace to the caller
            log.exception("unhandled error in %s %s", request.method, request.path)
            return _error(500, "internal error; see the server log")

    async def retrieve(self, request: web.Request) -> web.Response:
        """Search-R1 ``/retrieve``."""
        body = await _body(request)
        queries = _str_list(body.get("queries"), "queries")
        topk = _int_field(body, "topk", None)
        with_scores = _bool_field(body, "return_scores")
        results = await self.engine.search(queries, topk, api="http")
        out: list[list[Any]] = []
        for r in results:
            if with_scores:
                out.append([{"document": _doc(d), "score": float(d.score)} for d in r.documents])
            else:
                out.append([_doc(d) for d in r.documents])
        return web.json_response({"result": out})

    async def search(self, request: web.Request) -> web.Response:
        """FlashRAG ``/search`` (one query)."""
        body = await _body(request)
        query = body.get("query")
        if not isinstance(query, str):
            raise InvalidRequest("'query' must be a string")
        top_n = _int_field(body, "top_n", FLASHRAG_DEFAULT_TOP_N)
        with_scores = _bool_field(body, "return_score")
        (r,) = await self.engine.search([query], top_n, api="http")
        docs = [_doc(d) for d in r.documents]
        if with_scores:
            return web.json_response([docs, [float(d.score) for d in r.documents]])
        return web.json_response(docs)

    async def batch_search(self, request: web.Request) -> web.Response:
        """FlashRAG ``/batch_search``."""
        body = await _body(request)
        queries = _str_list(body.get("query"), "query")
        top_n = _int_field(body, "top_n", FLASHRAG_DEFAULT_TOP_N)
        with_scores = _bool_field(body, "return_score")
        results = await self.engine.search(queries, top_n, api="http")
        docs = [[_doc(d) for d in r.documents] for r in results]
        if with_scores:
            return web.json_response([docs, [[float(d.score) for d in r.documents] for r in results]])
        return web.json_response(docs)

    async def health(self, request: web.Request) -> web.Response:
        """Liveness plus a description of the index."""
        info = self.engine.info()
        return web.json_response(
            {
                "status": "healthy",
                "index": {
                    "embedding_model": info.embedding_model,
                    "dimension": info.dimension,
                    "size": info.size,
                    "index_type": info.index_type,
                    "corpus_checksum": info.corpus_checksum,
                    "on_gpu": info.on_gpu,
                },
            }
        )

    async def start(self, host: str, port: int) -> int:
        """Binds ``host:port`` (0: a free port) on the running loop, over TLS when configured; returns the bound port.

        Raises:
            OSError: the port cannot be bound.
        """
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=self.ssl_context)
        await site.start()
        addresses = self._runner.addresses  # bound (host, port, ...) tuples: the real port when 0 was asked
        self.port = int(addresses[0][1]) if addresses else port
        return self.port

    async def stop(self) -> None:
        """Stops accepting connections and closes the app."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
