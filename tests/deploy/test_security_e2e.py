"""Security end to end (#17): a real ``searchrl serve reward`` started with exactly the TLS, mTLS and token settings
the chart renders (``ci/gpu-values.yaml`` with ``global.tls.clientAuth=true``), its Secret files laid out as kubelet
projects them. Callers without a token, with a wrong token, in plain text, without a client certificate or with one
from another CA are refused with the right status; the rendered exec probe and the Prometheus port stay reachable as
the chart configures them; no token or key reaches the server's log, a refused caller's error or a metric.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from searchrl.client import ChannelOptions, RewardClient
from searchrl.testing import ServiceProcess

NAMES = ["*.searchrl.svc", "*.searchrl.svc.cluster.local", "localhost", "127.0.0.1"]
COMPLETION = "<think>t</think><answer>\\boxed{Paris}</answer>"


def _secret(name: str, data: dict[str, bytes]) -> dict[str, Any]:
    return {
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


@pytest.fixture(scope="module")
def stack(render, certs, projected, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """The reward pod of the chart (TLS, client certificates, bearer token) as a loopback process."""
    work = tmp_path_factory.mktemp("security")
    ca = certs()
    crt, key = ca.issue(NAMES)
    token = base64.urlsafe_b64encode(os.urandom(24)).decode()
    secrets = {
        "searchrl-tls": _secret("searchrl-tls", {"ca.crt": ca.pem, "tls.crt": crt, "tls.key": key}),
        "searchrl-auth": _secret("searchrl-auth", {"token": token.encode()}),
    }
    objs = render("gpu-values.yaml", global__tls__clientAuth=True)
    (dep,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "searchrl-reward"]
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    vols = {v["name"]: v for v in spec["volumes"]}
    mounts: dict[str, Path] = {}
    for m in c["volumeMounts"]:
        src = vols[m["name"]].get("secret")
        if src:
            mounts[m["mountPath"]] = projected(secrets[src["secretName"]], work / m["name"], src.get("items"))
    assert set(mounts) == {"/etc/searchrl/tls", "/etc/searchrl/auth"}, mounts

    def remap(value: str) -> str:
        for mount, folder in mounts.items():
            value = value.replace(mount, str(folder))
        return value

    env = {e["name"]: remap(str(e["value"])) for e in c["env"] if "value" in e}
    server_env = {k: v for k, v in env.items() if k.startswith(("SEARCHRL_TLS_", "SEARCHRL_AUTH_"))}
    assert {"SEARCHRL_TLS_CERT_FILE", "SEARCHRL_TLS_KEY_FILE", "SEARCHRL_TLS_CLIENT_CA_FILE",
            "SEARCHRL_AUTH_TOKEN_FILE"} <= set(server_env), server_env  # fmt: skip
    svc = ServiceProcess("reward", [], server_env, 120, root_ca=ca.pem, client_cert=(crt, key))
    assert svc.secrets, "the test must know the secrets it looks for"
    try:
        yield {"svc": svc, "ca": ca, "crt": crt, "key": key, "token": token, "env": env, "container": c}
    finally:
        svc.stop()


async def _score(target: str, **opts: Any) -> grpc.StatusCode:
    async with RewardClient(target, ChannelOptions(timeout_s=10, max_attempts=2, **opts)) as client:
        try:
            await client.score([COMPLETION], [["Paris"]])
        except grpc.aio.AioRpcError as exc:
            assert exc.code() != grpc.StatusCode.OK
            return exc.code()
    return grpc.StatusCode.OK


async def test_only_a_caller_with_the_token_and_a_certificate_of_the_ca_is_served(stack, certs) -> None:
    s = stack
    target = s["svc"].target
    mtls = {"tls": True, "root_ca": s["ca"].pem, "client_cert": s["crt"], "client_key": s["key"]}
    assert await _score(target, token=s["token"], **mtls) == grpc.StatusCode.OK
    assert await _score(target, **mtls) == grpc.StatusCode.UNAUTHENTICATED  # no token
    assert await _score(target, token=s["token"][:-2] + "xx", **mtls) == grpc.StatusCode.UNAUTHENTICATED
    # Plain text to the TLS port, and TLS without a client certificate: the handshake fails.
    assert await _score(target, token=s["token"]) == grpc.StatusCode.UNAVAILABLE
    assert await _score(target, token=s["token"], tls=True, root_ca=s["ca"].pem) == grpc.StatusCode.UNAVAILABLE
    # A client certificate for the same names from another CA.
    other_crt, other_key = certs("another CA").issue(NAMES)
    other = {**mtls, "client_cert": other_crt, "client_key": other_key}
    assert await _score(target, token=s["token"], **other) == grpc.StatusCode.UNAVAILABLE
    # The server is still up and serving the right caller after all of that.
    assert s["svc"].proc.poll() is None
    assert await _score(target, token=s["token"], **mtls) == grpc.StatusCode.OK


def test_probes_and_metrics_stay_reachable_as_the_chart_configures_them(stack, deploy_paths) -> None:
    """The rendered exec probe (it presents the pod's own certificate) passes; Prometheus scrapes /metrics over plain
    HTTP without a token (the ServiceMonitor's scheme), and the scrape shows neither the token nor the key."""
    s = stack
    svc = s["svc"]
    c = s["container"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = c[probe]["exec"]["command"]
        assert command[:2] == ["python", "/usr/local/bin/searchrl-healthcheck"], command
        args = [svc.target if a.startswith("127.0.0.1:") else a for a in command[2:]]
        proc = subprocess.run([sys.executable, str(deploy_paths["healthcheck"]), *args], env={**os.environ, **s["env"]},
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert proc.returncode == 0, (probe, proc.stdout, proc.stderr)
    with urllib.request.urlopen(f"http://127.0.0.1:{svc.metrics_port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    assert "searchrl_grpc_requests_total" in text
    assert not [x for x in svc.secrets if x in text]


async def test_no_secret_in_the_log_or_in_a_refused_callers_error(stack) -> None:
    s = stack
    mtls = {"tls": True, "root_ca": s["ca"].pem, "client_cert": s["crt"], "client_key": s["key"]}
    wrong = s["token"][:-2] + "xx"
    async with RewardClient(s["svc"].target, ChannelOptions(timeout_s=10, token=wrong, **mtls)) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.score([COMPLETION], [["Paris"]])
    details = err.value.details() or ""
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert s["token"] not in details and wrong not in details and s["token"][:8] not in details
    log = s["svc"].output()
    assert "starting reward" in log, log[-2000:]  # the start-up line that lists the settings was written
    assert s["svc"].leaked_secrets() == [], log[-2000:]
