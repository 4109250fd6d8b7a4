"""PolicyService searches reach a retriever that requires a bearer token and TLS (deploy review #10).

A real ``searchrl serve retriever`` child process with ``--auth-token-file`` and a TLS certificate (signed by a test
CA made with ``cryptography``) over a small flat index; a real PolicyService (SmolLM2) in-process whose Rollout searches
it. The policy dials with :meth:`ChannelOptions.from_env` (``SEARCHRL_TLS``, ``SEARCHRL_TLS_CA_FILE``,
``SEARCHRL_AUTH_TOKEN_FILE``), its token falling back to the policy server's own.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from searchrl.client.base import ChannelOptions
from searchrl.client.policy import PolicyClient
from searchrl.policy.v1 import policy_pb2_grpc
from searchrl.services.policy.engines.transformers import TransformersEngine
from searchrl.services.policy.server import SERVICE_NAME, PolicyConfig, PolicyServicer, build_searches
from searchrl.serving.runtime import GrpcServer, ServiceSpec
from searchrl.testing import free_port

pytestmark = pytest.mark.slow  # a retriever child process over a freshly built index, and SmolLM2 rollouts

FORCED = "<think> I should look this up. </think>\n<search> Eiffel Tower </search>"
TOKEN = "policy-search-token-0b7e"


def make_tls(root: Path) -> dict[str, Path]:
    """A CA and a server certificate for 127.0.0.1/localhost signed by it (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "searchrl test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "retriever")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    files = {"ca": root / "ca.crt", "cert": root / "tls.crt", "key": root / "tls.key", "token": root / "token"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    files["token"].write_text(TOKEN + "\n")
    return files


@pytest.fixture(scope="module")
def secured_retriever(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path]]]:
    """``searchrl serve retriever`` with a bearer token and TLS; yields (target, PEM/token files)."""
    from searchrl.retriever.corpus import iter_wiki
    from searchrl.retriever.index.build import build_index

    root = tmp_path_factory.mktemp("secured-retriever")
    files = make_tls(root)
    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        for i, p in enumerate(iter_wiki()):
            if p.title in {"Eiffel Tower", "Paris", "Dracula", "France"} or i % 100 == 0:
                fh.write(json.dumps({"id": p.id, "contents": p.contents}) + "\n")
    build_index(str(corpus), root / "flat", index_type="flat", shard_size=256, progress=False)
    port = free_port()
    log_path = root / "retriever.log"
    cmd = [sys.executable, "-m", "searchrl", "serve", "retriever", "--index-dir", str(root / "flat")]
    cmd += ["--grpc-port", str(port), "--metrics-port", "-1", "--http-port", "-1"]
    cmd += ["--auth-token-file", str(files["token"]), "--tls-cert-file", str(files["cert"])]
    cmd += ["--tls-key-file", str(files["key"])]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "READY retriever" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"retriever did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", files
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def engine(policy_path: str) -> Iterator[TransformersEngine]:
    eng = TransformersEngine(policy_path, max_batch_size=4, batch_wait_ms=2, torch_threads=1)
    yield eng
    eng.shutdown()


async def rollout_via_policy(engine: TransformersEngine, cfg: PolicyConfig, client_options: ChannelOptions) -> object:
    """One Rollout through an in-process PolicyService; returns the first turn's search record."""
    searches = build_searches(cfg)
    server = GrpcServer(
        cfg,
        [
            ServiceSpec(
                SERVICE_NAME, PolicyServicer(engine, cfg, searches), policy_pb2_grpc.add_PolicyServiceServicer_to_server
            )
        ],
        "policy",
    )
    await server.start()
    try:
        async with PolicyClient(f"127.0.0.1:{server.port}", client_options) as pc:
            traj = await pc.rollout(
                "In which city is the Eiffel Tower?", search_backend="retriever", sampling=pc.sampling(seed=3)
            )
    finally:
        await server.stop(0)
        for backend in searches.values():
            if hasattr(backend, "close"):
                await backend.close()
        for client in getattr(searches, "clients", ()):  # the shared channels
            await client.close()
    return traj.turns[0].search


def policy_config(target: str, **overrides: object) -> PolicyConfig:
    return PolicyConfig(
        grpc_port=0,
        metrics_port=-1,
        retriever_target=target,
        response_prefix=FORCED,
        max_turns=2,
        max_new_tokens_per_turn=8,
        max_response_tokens=300,
        top_k=2,
        search_timeout_s=20.0,
        **overrides,  # type: ignore[arg-type]
    )


async def test_policy_search_with_tls_and_token_from_env(
    secured_retriever: tuple[str, dict[str, Path]], engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, files = secured_retriever
    monkeypatch.setenv("SEARCHRL_TLS", "true")
    monkeypatch.setenv("SEARCHRL_TLS_CA_FILE", str(files["ca"]))
    monkeypatch.setenv("SEARCHRL_AUTH_TOKEN_FILE", str(files["token"]))
    search = await rollout_via_policy(engine, policy_config(target), ChannelOptions())
    assert search.query == "Eiffel Tower" and not search.error, search.error
    assert len(search.documents) == 2 and any("Eiffel" in d.title for d in search.documents)


async def test_policy_search_token_falls_back_to_the_servers_own(
    secured_retriever: tuple[str, dict[str, Path]], engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The env names only the CA; the policy's own --auth-token-file (the chart's shared token) is sent."""
    target, files = secured_retriever
    monkeypatch.setenv("SEARCHRL_TLS", "true")
    monkeypatch.setenv("SEARCHRL_TLS_CA_FILE", str(files["ca"]))
    for var in ("SEARCHRL_AUTH_TOKEN_FILE", "SEARCHRL_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    cfg = policy_config(target, auth_token_file=str(files["token"]))
    search = await rollout_via_policy(engine, cfg, ChannelOptions(token=TOKEN, timeout_s=600))
    assert not search.error, search.error
    assert len(search.documents) == 2
    # Control: without TLS settings the same search fails, and the failure is an error observation.
    monkeypatch.delenv("SEARCHRL_TLS")
    search = await rollout_via_policy(engine, cfg, ChannelOptions(token=TOKEN, timeout_s=600))
    assert search.error and not search.documents
