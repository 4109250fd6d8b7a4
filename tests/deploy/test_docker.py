"""The container images' Dockerfiles, build script and health probe.

No container engine runs here: the Dockerfiles are checked by hadolint (in deploy/check.sh) and by the structural rules
below; the health probe they use is exercised against a real ``searchrl serve reward`` process, plaintext and TLS.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from searchrl.testing import ServiceProcess, free_port, self_signed_certificate

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
PROBE = DOCKER / "healthcheck.py"
SERVICES = {"reward": 50051, "retriever": 50052, "simulator": 50053, "policy": 50054}


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _dockerfiles() -> list[Path]:
    return sorted(DOCKER.glob("*.Dockerfile"))


def test_every_service_has_cpu_and_gpu_images():
    names = {p.name for p in _dockerfiles()}
    for svc in ("reward", "retriever", "simulator", "policy", "trainer"):
        assert f"{svc}.Dockerfile" in names
    for svc in ("retriever", "simulator", "policy", "trainer"):
        assert f"{svc}.gpu.Dockerfile" in names


@pytest.mark.parametrize("path", _dockerfiles(), ids=lambda p: p.name)
def test_dockerfile_rules(path):
    ins = _instructions(path)
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder stage and a runtime stage"
    aliases: set[str] = set()
    for image in froms:
        words = image.split()
        ref = words[0]
        if not ref.startswith("${") and ref not in aliases:
            assert ":" in ref and not ref.endswith(":latest"), f"unpinned base image {ref}"
        if "AS" in words:
            aliases.add(words[words.index("AS") + 1])
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as root"
    # The image's runtime stage: the one named `runtime` (GPU images: the default target is `FROM runtime`), else
    # the last one.
    starts = [i for i, (w, r) in enumerate(ins) if w == "FROM"]
    named = [i for i in starts if ins[i][1].endswith(" AS runtime")]
    first = named[0] if named else starts[-1]
    runtime = ins[first : next((i for i in starts if i > first), len(ins))]
    assert any(w == "COPY" and "--from=builder" in r for w, r in runtime), "runtime copies the builder's environment"
    assert users[-1] == "10001:10001" and ("USER", "10001:10001") in runtime
    # Packages come only from the image's hash-locked set (tests/deploy/test_image_locks.py checks every install).
    stem = path.name.replace(".gpu.Dockerfile", "-gpu").replace(".Dockerfile", "")
    lock = f"/tmp/locks/{stem}.lock"
    assert ("RUN", f"uv pip sync --require-hashes --build-constraints {lock} --require-build-hashes {lock}") in ins
    if not path.name.startswith("trainer"):
        svc = path.name.split(".")[0]
        assert any(w == "HEALTHCHECK" and "searchrl-healthcheck" in r for w, r in runtime)
        assert ("ENTRYPOINT", f'["searchrl", "serve", "{svc}"]') in runtime
        assert f"SEARCHRL_GRPC_PORT={SERVICES[svc]}" in path.read_text()
    if ".gpu." in path.name:
        assert "nvidia/cuda:" in path.read_text()
        assert any(w == "FROM" and r == "runtime AS smoke" for w, r in ins), "GPU images have a `smoke` target"
        assert ins[starts[-1]] == ("FROM", "runtime"), "the default target is the runtime image, not smoke"


def test_constraints_pin_what_ci_tested():
    pins = dict(line.split("==", 1) for line in (DOCKER / "constraints.txt").read_text().splitlines() if "==" in line)
    assert pins["torch"].startswith("2.13.0")
    for pkg in ("grpcio", "faiss-cpu", "transformers", "redis", "prometheus_client"):
        assert pkg in pins or pkg.replace("_", "-") in pins, pkg


def test_requirements_for_gpu_images_drop_the_cpu_model_pins():
    cmd = [sys.executable, str(DOCKER / "requirements_for.py"), "--pyproject", str(ROOT / "pyproject.toml")]
    reqs = subprocess.run(
        [*cmd, "retriever", "--without", "models", "--exclude", "faiss-cpu"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert any(r.startswith("sentence-transformers") for r in reqs) and any(r.startswith("grpcio") for r in reqs)
    assert not any(r.startswith(("torch", "transformers", "faiss-cpu")) for r in reqs)
    bad = subprocess.run([*cmd, "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "no extra 'nope'" in bad.stderr


def test_build_script_names_match_the_chart_defaults():
    proc = subprocess.run(
        ["bash", str(DOCKER / "build.sh"), "--dry-run"], capture_output=True, text=True, cwd=ROOT, check=True
    )
    built = set(re.findall(r"^built (\S+)$", proc.stdout, re.M))
    assert "ghcr.io/searchrl/searchrl-reward:0.1.0" in built
    assert "ghcr.io/searchrl/searchrl-simulator:0.1.0-gpu" in built
    assert not any("reward" in b and b.endswith("-gpu") for b in built)
    assert len(built) == 9
    only = subprocess.run(
        ["bash", str(DOCKER / "build.sh"), "--dry-run", "--only", "policy", "--cpu-only"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert re.findall(r"^built (\S+)$", only.stdout, re.M) == ["ghcr.io/searchrl/searchrl-policy:0.1.0"]
    smoke = subprocess.run(
        ["bash", str(DOCKER / "build.sh"), "--dry-run", "--gpu", "--smoke", "--test"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    refs = re.findall(r"^built (\S+)$", smoke.stdout, re.M)
    assert len(refs) == 8 and sum(r.endswith("-gpu-smoke") for r in refs) == 4
    assert smoke.stdout.count("--target smoke") == 4
    # --test: the container test of every image, with the chart's read-only root and writable mounts.
    tests = [line for line in smoke.stdout.splitlines() if line.startswith("+ docker run")]
    assert len(tests) == 8 and all("--read-only --user 10001:10001 --tmpfs /tmp" in line for line in tests)
    assert any("searchrl-simulator:0.1.0-gpu " in line and "--compiler vllm" in line for line in tests)


def _probe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PROBE), *args], capture_output=True, text=True, timeout=30, env=env)


def test_health_probe_against_a_real_service():
    with ServiceProcess("reward") as svc:
        assert _probe("--addr", svc.target).returncode == 0
        # SEARCHRL_GRPC_PORT is what the images set; the probe follows it.
        env = {**os.environ, "SEARCHRL_GRPC_PORT": str(svc.port)}
        assert _probe(env=env).returncode == 0
        assert _probe("--addr", svc.target, "--service", "no.such.Service").returncode == 2
    down = _probe("--addr", svc.target, "--timeout", "1")
    assert down.returncode == 2 and "UNAVAILABLE" in down.stderr


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the name the chart's probe checks (``<service>.<namespace>.svc``)."""
    return self_signed_certificate(tmp, hosts=("searchrl-reward.searchrl.svc",))


def test_health_probe_speaks_tls_like_the_charts_exec_probe(tmp_path):
    cert, key = _self_signed(tmp_path)
    port = free_port()
    env = {
        **os.environ,
        "SEARCHRL_GRPC_PORT": str(port),
        "SEARCHRL_METRICS_PORT": "-1",
        "SEARCHRL_TLS_CERT_FILE": str(cert),
        "SEARCHRL_TLS_KEY_FILE": str(key),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "searchrl", "serve", "reward"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # The chart's exec probe: `searchrl-healthcheck --tls --addr 127.0.0.1:PORT` with the SEARCHRL_PROBE_* env.
        probe_env = {
            **env,
            "SEARCHRL_PROBE_CA_FILE": str(cert),
            "SEARCHRL_PROBE_SERVER_NAME": "searchrl-reward.searchrl.svc",
        }
        deadline = time.monotonic() + 60
        while _probe("--tls", "--addr", f"127.0.0.1:{port}", env=probe_env).returncode != 0:
            assert proc.poll() is None, "reward exited"
            assert time.monotonic() < deadline, "TLS probe never succeeded"
            time.sleep(0.5)
        # Plaintext against a TLS server, or TLS with no trust anchor at all (no CA file, and no self-signed server
        # certificate to fall back to), fails.
        assert _probe("--addr", f"127.0.0.1:{port}", "--timeout", "2").returncode == 2
        no_ca = {k: v for k, v in probe_env.items() if k not in ("SEARCHRL_PROBE_CA_FILE", "SEARCHRL_TLS_CERT_FILE")}
        assert _probe("--tls", "--addr", f"127.0.0.1:{port}", "--timeout", "2", env=no_ca).returncode == 2
        # Without ca.crt but with the pod's own self-signed certificate (the documented fallback), it passes.
        self_signed = {k: v for k, v in probe_env.items() if k != "SEARCHRL_PROBE_CA_FILE"}
        assert _probe("--tls", "--addr", f"127.0.0.1:{port}", "--timeout", "5", env=self_signed).returncode == 0
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize("path", _dockerfiles(), ids=lambda p: p.name)
def test_every_copy_source_is_in_the_build_context(path):
    """``docker build`` runs from the repository root: each ``COPY`` from the context names a file or folder that
    exists there, and what the wheel build needs (the pyproject's ``packages`` folders) is copied."""
    import tomllib

    copied: set[str] = set()
    for word, rest in _instructions(path):
        if word != "COPY" or "--from=" in rest:
            continue
        args = [a for a in rest.split() if not a.startswith("--")]
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"{path.name}: COPY {src}: not in the repository"
            copied.add(src.rstrip("/"))
    if any(w == "RUN" and "--no-build-isolation ." in r for w, r in _instructions(path)):
        wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]
        for package in wheel["packages"]:
            top = package.split("/")[0]
            assert top in copied or package in copied, f"{path.name}: the wheel needs {package}, not copied"
        assert "pyproject.toml" in copied and "README.md" in copied
