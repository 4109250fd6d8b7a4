"""The Search-R1 HTTP API under the gRPC port's security settings, against a real ``searchrl serve retriever`` process:
bearer token on every route but ``/health`` (401 JSON otherwise), HTTPS with the service certificate."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from searchrl.testing import free_port, self_signed_certificate

TOKEN = "s3cret-retriever-token"
QUERY = "What is the population of Macau?"


def _self_signed(tmp: Path) -> tuple[Path, Path, bytes]:
    """A self-signed certificate for localhost / 127.0.0.1: ``(cert path, key path, cert PEM)``."""
    cert, key = self_signed_certificate(tmp)
    return cert, key, cert.read_bytes()


@dataclass
class SecureServer:
    http: str  # https://localhost:<port>
    grpc_target: str
    ca_pem: bytes
    client_ssl: ssl.SSLContext


@pytest.fixture(scope="module")
def secure_server(index_dirs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureServer]:  # noqa: ANN001
    """``searchrl serve retriever`` with ``--auth-token-file`` and a TLS certificate, on free loopback ports."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key, pem = _self_signed(tmp)
    token_file = tmp / "token"
    token_file.write_text(TOKEN + "\n")
    grpc_port, http_port = free_port(), free_port()
    log_path = Path(tempfile.mkstemp(prefix="searchrl-retriever-tls-", suffix=".log")[1])
    cmd = [
        sys.executable, "-m", "searchrl", "serve", "retriever", "--index-dir", str(index_dirs["flat"]),
        "--grpc-port", str(grpc_port), "--metrics-port", "-1", "--http-port", str(http_port),
        "--auth-token-file", str(token_file), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "READY retriever" not in log_path.read_text(errors="replace"):  # printed once gRPC and HTTP serve
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"retriever did not start (rc={proc.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        out = log_path.read_text()
        assert f"HTTP retriever https://127.0.0.1:{http_port}" in out and "bearer-token" in out, out
        assert TOKEN not in out  # the token never reaches the log
        ctx = ssl.create_default_context(cadata=pem.decode())
        yield SecureServer(f"https://localhost:{http_port}", f"localhost:{grpc_port}", pem, ctx)
    finally:
        proc.terminate()
        proc.wait(30)
        assert proc.returncode == 0, log_path.read_text()[-3000:]


ROUTES = [
    ("/retrieve", {"queries": [QUERY], "topk": 2}),
    ("/search", {"query": QUERY, "top_n": 2}),
    ("/batch_search", {"query": [QUERY], "top_n": 2}),
]


async def _post(server: SecureServer, path: str, body: object, headers: dict[str, str] | None = None):  # noqa: ANN202
    async with (
        aiohttp.ClientSession() as s,
        s.post(server.http + path, json=body, headers=headers or {}, ssl=server.client_ssl) as r,
    ):
        return r.status, dict(r.headers), await r.json(content_type=None)


@pytest.mark.parametrize("path,body", ROUTES)
@pytest.mark.parametrize(
    "auth",
    [None, "Bearer wrong-token", f"Bearer {TOKEN}x", f"bearer {TOKEN}", TOKEN, f"Basic {TOKEN}", f"Bearer  {TOKEN}"],
)
async def test_search_routes_need_the_bearer_token(secure_server: SecureServer, path, body, auth) -> None:  # noqa: ANN001
    status, headers, reply = await _post(secure_server, path, body, {"Authorization": auth} if auth else None)
    assert status == 401
    assert reply == {"detail": "missing or invalid bearer token (send 'Authorization: Bearer <token>')"}
    assert headers.get("WWW-Authenticate") == "Bearer"


@pytest.mark.parametrize("path,body", ROUTES)
async def test_search_routes_answer_with_the_token(secure_server: SecureServer, path, body) -> None:  # noqa: ANN001
    status, _, reply = await _post(secure_server, path, body, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200
    first = {"/retrieve": lambda r: r["result"][0][0], "/search": lambda r: r[0], "/batch_search": lambda r: r[0][0]}
    assert first[path](reply)["contents"].startswith('"Macau"\n')


async def test_health_stays_open_for_probes(secure_server: SecureServer) -> None:
    async with aiohttp.ClientSession() as s, s.get(secure_server.http + "/health", ssl=secure_server.client_ssl) as r:
        assert r.status == 200
        assert (await r.json())["status"] == "healthy"


async def test_the_http_port_speaks_only_tls(secure_server: SecureServer) -> None:
    plain = secure_server.http.replace("https://", "http://")
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(plain + "/health") as r:
                await r.read()
        # a client that does not trust the service CA is refused by certificate verification
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with s.get(secure_server.http + "/health", ssl=ssl.create_default_context()) as r:
                await r.read()


async def test_grpc_shares_the_token_and_certificate(secure_server: SecureServer) -> None:
    from searchrl.client import RetrievalClient
    from searchrl.client.base import ChannelOptions

    opts = ChannelOptions(tls=True, root_ca=secure_server.ca_pem, token=TOKEN)
    async with RetrievalClient(secure_server.grpc_target, opts) as client:
        docs = await client.search([QUERY], top_k=1, skip_cache=True)
    assert docs[0][0].title == "Macau"


def test_tls_settings_for_the_http_port(tmp_path: Path) -> None:
    from searchrl.retriever.http import server_ssl_context

    cert, key, _ = _self_signed(tmp_path)
    assert server_ssl_context("", "") is None
    with pytest.raises(ValueError, match="both --tls-cert-file and --tls-key-file"):
        server_ssl_context(str(cert), "")
    assert server_ssl_context(str(cert), str(key)).verify_mode == ssl.CERT_NONE
    # --tls-client-ca-file: client certificates are required, as on the gRPC port
    assert server_ssl_context(str(cert), str(key), str(cert)).verify_mode == ssl.CERT_REQUIRED
