"""Every image installs exactly its hash-locked dependency set, and every lock still resolves to what is committed.

``deploy/docker/lock.py`` makes one lock per image (``deploy/docker/locks/<image>.lock``) with ``uv pip compile`` for
the image's Python and platform. Here each lock's inputs are resolved again with the project's uv against the package
index (in parallel threads; about half a minute), and the test fails when an input no longer resolves or the
result differs from the committed lock. The Dockerfiles are parsed to check that they install only from their lock
with ``--require-hashes`` (plus searchrl itself with ``--no-deps``), and the GPU images' cache directories are checked
against the mounts the rendered chart gives each service (read-only root filesystem).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
import re
import shlex
import sys
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
LOCKS = DOCKER / "locks"

_spec = importlib.util.spec_from_file_location("searchrl_image_lock", DOCKER / "lock.py")
assert _spec and _spec.loader
lock = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = lock  # dataclasses resolve the module's annotations through sys.modules
_spec.loader.exec_module(lock)

IMAGES: dict[str, Any] = {im.name: im for im in lock.IMAGES}
GPU = [im.name for im in lock.IMAGES if im.gpu]
# Directories the GPU images point libraries at; each must be writable where the image runs.
CACHE_VARS = ("TRITON_CACHE_DIR", "TRITON_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "CUDA_CACHE_PATH")
LOCK_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:==(?P<version>\S+)| @ (?P<url>\S+))(?P<rest>.*)$")


# ------------------------------------------------------------------------------------------------- helpers


def _instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of a Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _stages(path: Path) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """``(base, alias, instructions)`` per build stage."""
    stages: list[tuple[str, str, list[tuple[str, str]]]] = []
    for word, rest in _instructions(path):
        if word == "FROM":
            parts = rest.split()
            base = next(p for p in parts if not p.startswith("--"))
            alias = (
                parts[parts.index("AS") + 1]
                if "AS" in parts
                else (parts[parts.index("as") + 1] if "as" in parts else "")
            )
            stages.append((base, alias, []))
        elif stages:
            stages[-1][2].append((word, rest))
    return stages


def _runtime_env(path: Path) -> dict[str, str]:
    """The ENV of a GPU Dockerfile's ``runtime`` stage (what the image and its smoke target run with)."""
    return _env(next(ins for _, alias, ins in _stages(path) if alias == "runtime"))


def _env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions:
        if word == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                if sep:
                    env[key] = value
    return env


def _commands(run: str) -> list[list[str]]:
    """The simple commands of a RUN line (split at ``&&``, ``||``, ``;``, ``|``), each as shell words without its
    leading ``VAR=value`` assignments."""
    run = re.sub(r"^(--\S+\s+)+", "", run)  # RUN --mount=... flags
    lexer = shlex.shlex(run, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    out: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            out.append([])
        else:
            out[-1].append(token)
    cmds = []
    for cmd in out:
        while cmd and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[0]):
            cmd = cmd[1:]
        if cmd:
            cmds.append(cmd)
    return cmds


def _installs(path: Path) -> list[list[str]]:
    """Every package-installing command of a Dockerfile: ``pip install``, ``uv pip install|sync``, ``python -m pip``,
    ``uv add``/``uv tool install``, ``easy_install``, ``conda install`` (words after any leading ``VAR=value``)."""
    found = []
    for word, rest in _instructions(path):
        if word != "RUN":
            continue
        for cmd in _commands(rest):
            text = " ".join(cmd)
            if re.search(r"\b(pip3?|uv pip) (install|sync)\b|\bpython3? -m pip\b|\buv (add|tool install)\b", text) or (
                cmd and cmd[0] in ("easy_install", "conda", "mamba", "micromamba")
            ):
                found.append(cmd)
    return found


def _copied_locks(path: Path) -> dict[str, str]:
    """``{/tmp/locks/<file>: deploy/docker/locks/<file>}`` for every lock a Dockerfile copies into /tmp/locks/."""
    out = {}
    for word, rest in _instructions(path):
        if word == "COPY":
            parts = [p for p in rest.split() if not p.startswith("--")]
            *sources, dest = parts
            for src in sources:
                if src.startswith("deploy/docker/locks/") and dest.rstrip("/") == "/tmp/locks":
                    out[f"/tmp/locks/{Path(src).name}"] = src
    return out


def _lock_entries(text: str) -> list[tuple[str, str | None, str | None, list[str]]]:
    """``(name, version, url, sha256 hashes)`` of every requirement in a lock; raises AssertionError on any
    requirement line that is neither ``name==version`` nor ``name @ url``."""
    entries: list[tuple[str, str | None, str | None, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.lstrip().startswith("#"):
            i += 1
            continue
        m = LOCK_ENTRY.match(line)
        assert m and not line.startswith(" "), f"not a pinned requirement: {line!r}"
        block = [line]
        while block[-1].rstrip().endswith("\\"):
            i += 1
            block.append(lines[i])
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})\b", " ".join(block))
        entries.append((lock._norm(m["name"]), m["version"], m["url"], hashes))
        i += 1
    return entries


def _versions(name: str) -> dict[str, str]:
    return {n: v for n, v, _, _ in _lock_entries((LOCKS / f"{name}.lock").read_text()) if v}


# ------------------------------------------------------------------------------------------------- resolution


@pytest.fixture(scope="module")
def uv() -> str:
    """The project's uv (``.venv/bin/uv`` from the dev extra, else PATH) at ``lock.UV_VERSION``; missing fails."""
    try:
        return str(lock.find_uv())
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.fail(f"{exc}: the lock checks need uv (pip install uv=={lock.UV_VERSION}, or make setup)")


@pytest.fixture(scope="module")
def resolutions(uv: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every image re-resolved against the index and compared with its committed files, plus two resolutions that
    must fail: today's (old) trainer input ``verl[sglang,fsdp]==0.9.1``, and the reward lock with one constraint
    pin changed (a stale lock). All run at once in threads; uv's cache is shared between its processes."""
    old_trainer = dataclasses.replace(
        IMAGES["trainer-gpu"], name="trainer-gpu-old", engine=("verl[sglang,fsdp]==0.9.1", "ray[default]==2.60.0")
    )
    changed = tmp_path_factory.mktemp("changed-pin")
    (changed / "deploy" / "docker").mkdir(parents=True)
    (changed / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    constraints = (DOCKER / "constraints.txt").read_text()
    assert "\nrich==15.0.0\n" in constraints, "the changed-pin case below edits the rich pin"
    (changed / "deploy" / "docker" / "constraints.txt").write_text(
        constraints.replace("\nrich==15.0.0\n", "\nrich==14.0.0\n")
    )
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(lock.IMAGES) + 2) as pool:
        futures = {im.name: pool.submit(lock.check_image, uv, im) for im in lock.IMAGES}
        old = pool.submit(lock.resolve, uv, old_trainer)
        stale = pool.submit(lock.check_image, uv, IMAGES["reward"], changed)
        results = {name: f.result() for name, f in futures.items()}
        out = {"images": results, "old_trainer": old.result(), "stale_reward": stale.result()}
    out["seconds"] = time.monotonic() - start
    print(f"\nre-resolved {len(results)} image locks in {out['seconds']:.1f} s:")
    for res in results.values():
        print(f"  {res.image}: {res.seconds:.1f} s")
    return out


@pytest.mark.parametrize("image", [im.name for im in lock.IMAGES])
def test_lock_inputs_resolve_to_the_committed_lock(resolutions: dict[str, Any], image: str) -> None:
    res = resolutions["images"][image]
    assert res.error is None, f"the inputs of {image}.lock no longer resolve:\n{res.error}"
    assert not res.problems, "\n".join(res.problems) + "\n(regenerate: python3 deploy/docker/lock.py)"


def test_no_lock_file_that_no_image_makes(resolutions: dict[str, Any]) -> None:
    made = {f for res in resolutions["images"].values() for f in (res.files or {})}
    assert made, "no image resolved"
    assert sorted(p.name for p in LOCKS.iterdir()) == sorted(made)


def test_the_old_trainer_input_verl_sglang_does_not_resolve(resolutions: dict[str, Any]) -> None:
    """verl[sglang] pins transformers==5.9.0 and sglang==0.5.12, which requires transformers==5.6.0."""
    res = resolutions["old_trainer"]
    assert res.files is None, "verl[sglang,fsdp]==0.9.1 resolved: revisit the trainer image's engine choice"
    assert "No solution found" in res.error and "transformers" in res.error and "sglang" in res.error, res.error


def test_a_changed_input_pin_makes_the_lock_stale(resolutions: dict[str, Any]) -> None:
    problems = resolutions["stale_reward"].problems
    assert any(p.startswith("STALE deploy/docker/locks/reward.lock") and "rich==14.0.0" in p for p in problems), (
        problems
    )


# ------------------------------------------------------------------------------------------------- lock contents


@pytest.mark.parametrize("path", sorted(LOCKS.glob("*.lock")), ids=lambda p: p.name)
def test_every_lock_entry_is_pinned_with_hashes(path: Path) -> None:
    entries = _lock_entries(path.read_text())
    assert entries, f"{path.name} is empty"
    for name, version, url, hashes in entries:
        assert hashes, f"{path.name}: {name} has no --hash"
        assert version or (url and url.startswith("https://")), f"{path.name}: {name} is neither == pinned nor a URL"
    names = [e[0] for e in entries]
    assert len(names) == len(set(names)), f"{path.name}: a package appears twice"
    assert not re.search(r"^\s*(-e|--index-url|--extra-index-url|-i|--find-links|-f)\b", path.read_text(), re.M)


def test_cpu_locks_carry_the_pytorch_cpu_build_and_no_cuda() -> None:
    for im in lock.IMAGES:
        if im.gpu:
            continue
        entries = _lock_entries((LOCKS / f"{im.name}.lock").read_text())
        names = {n for n, *_ in entries}
        cuda = sorted(n for n in names if n.startswith(("nvidia-", "cuda-")) or n == "triton")
        assert not cuda, f"{im.name}.lock: CUDA packages in a CPU image: {cuda}"
        torch = [e for e in entries if e[0] == "torch"]
        if im.name == "reward":
            assert not torch
            continue
        assert torch == [("torch", None, lock.TORCH_CPU.url, [lock.TORCH_CPU.sha256])], torch
        assert im.python.startswith("3.11.") and "cp311" in lock.TORCH_CPU.url


def test_the_cpu_torch_pin_matches_the_wheel_on_disk() -> None:
    """When pip's find-links holds torch 2.13.0+cpu (this machine's developer venv came from it), its sha256 and its
    requirements are the ones the CPU locks pin and resolve."""
    name = lock.TORCH_CPU.url.rsplit("/", 1)[1].replace("%2B", "+")
    dirs = [d for d in re.split(r"[\s:]+", os.environ.get("PIP_FIND_LINKS", "")) if d] + ["/opt/wheels"]
    wheels = [p for d in dirs for p in glob.glob(os.path.join(d, name))]
    if not wheels:
        pytest.skip(f"{name} is not on this machine's disk (the pin is checked by the image build's hash check)")
    assert lock.sha256_of(Path(wheels[0])) == lock.TORCH_CPU.sha256
    with zipfile.ZipFile(wheels[0]) as zf:
        meta = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    requires = [r.split(":", 1)[1].strip() for r in meta.splitlines() if r.startswith("Requires-Dist:")]
    assert sorted(r for r in requires if "extra ==" not in r) == sorted(lock.TORCH_CPU.requires)


def test_trainer_gpu_lock_is_a_combination_verl_accepts() -> None:
    versions = _versions("trainer-gpu")
    assert versions["verl"] == "0.9.1" and "vllm" in versions and "sglang" not in versions
    assert "flash-attn" not in versions, "flash-attn is built from its sdist (trainer-gpu-flash-attn.lock)"
    # verl's own requirements, from its METADATA in the developer venv (the same verl==0.9.1).
    assert importlib.metadata.version("verl") == "0.9.1"
    extras = {"vllm", "fsdp", "verl-core", "flash-attn-cu130torch211", "cupy-cu130"}
    checked = 0
    for raw in importlib.metadata.requires("verl") or []:
        req = Requirement(raw)
        applies = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras)
        if not applies or req.name in ("verl",):
            continue
        name = lock._norm(req.name)
        if name == "flash-attn":
            fa = _lock_entries((LOCKS / "trainer-gpu-flash-attn.lock").read_text())
            assert fa[0][0] == "flash-attn" and req.specifier.contains(fa[0][1]), (raw, fa)
            continue
        assert name in versions, f"verl requires {raw}; the trainer-gpu lock lacks it"
        assert req.specifier.contains(Version(versions[name]), prereleases=True), (
            f"verl requires {raw}, lock has {versions[name]}"
        )
        checked += 1
    assert checked > 20
    assert versions["transformers"] == "5.9.0" and versions["vllm"] == "0.24.0" and versions["torch"] == "2.11.0"
    assert versions["ray"] == "2.60.0"


def test_engine_locks_hold_the_pinned_engines() -> None:
    retriever = _versions("retriever-gpu")
    assert retriever["faiss-gpu"] == "1.15.1"
    assert "faiss-gpu-cu12" not in retriever and "faiss-cpu" not in retriever
    assert retriever["faiss-gpu"] == _versions("retriever")["faiss-cpu"], "the GPU index reader matches the builder"
    assert retriever["torch"] == "2.13.0" and retriever["nvidia-cublas-cu12"].startswith("12.")
    assert _versions("simulator-gpu")["vllm"] == "0.33.0"
    assert _versions("policy-gpu")["sglang"] == "0.5.23"


# ------------------------------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("image", [im.name for im in lock.IMAGES])
def test_dockerfile_installs_only_from_its_lock(image: str) -> None:
    im = IMAGES[image]
    path = DOCKER / im.dockerfile
    copied = _copied_locks(path)
    installs = _installs(path)
    assert installs, f"{path.name} installs nothing"
    syncs = [c for c in installs if c[:3] == ["uv", "pip", "sync"]]
    own = f"/tmp/locks/{image}.lock"
    assert len(syncs) == 1, f"{path.name}: one `uv pip sync` of its lock expected, got {syncs}"
    sync = syncs[0]
    assert "--require-hashes" in sync and sync[-1] == own and copied.get(own) == f"deploy/docker/locks/{image}.lock"
    # A package built from its sdist during the sync builds with the lock's hashed setuptools/wheel.
    assert sync[sync.index("--build-constraints") + 1] == own and "--require-build-hashes" in sync
    for cmd in installs:
        text = " ".join(cmd)
        assert cmd[:3] in (["uv", "pip", "sync"], ["uv", "pip", "install"]), (
            f"{path.name}: not a uv pip install: {text}"
        )
        if cmd[2] == "sync":
            continue
        args = cmd[3:]
        positional = []
        i = 0
        while i < len(args):
            if args[i] in ("-r", "--requirement", "-c", "--constraint", "--python", "--target", "-t"):
                if args[i] in ("-r", "--requirement"):
                    assert args[i + 1] in copied, f"{path.name}: installs {args[i + 1]}, which is not a committed lock"
                i += 2
                continue
            if not args[i].startswith("-"):
                positional.append(args[i])
            i += 1
        if positional:
            # searchrl itself: the local project only, its dependencies already installed from the lock.
            assert positional == ["."] and "--no-deps" in args, f"{path.name}: installs {positional} outside a lock"
        else:
            assert "--require-hashes" in args and ("-r" in args or "--requirement" in args), f"{path.name}: {text}"


def test_every_committed_lock_is_installed_by_its_dockerfile() -> None:
    used = {src for im in lock.IMAGES for src in _copied_locks(DOCKER / im.dockerfile).values()}
    assert used == {f"deploy/docker/locks/{p.name}" for p in LOCKS.glob("*.lock")}


@pytest.mark.parametrize("image", [im.name for im in lock.IMAGES])
def test_dockerfile_python_platform_and_uv_match_the_lock(image: str) -> None:
    im = IMAGES[image]
    path = DOCKER / im.dockerfile
    text = path.read_text()
    stages = _stages(path)
    assert stages[0][0] == f"ghcr.io/astral-sh/uv:{lock.UV_VERSION}" and stages[0][1] == "uv"
    assert f'"uv=={lock.UV_VERSION}"' in (ROOT / "pyproject.toml").read_text(), "the dev extra pins the same uv"
    if im.gpu:
        assert f"uv python install {im.python} && uv venv --python {im.python} /opt/venv" in text
        base = re.search(r"^ARG CUDA_IMAGE=(\S+)$", text, re.M)
        # One CUDA release (the cu130 of PyPI's torch wheels) on Ubuntu 24.04, whose glibc 2.39 the lock targets.
        assert base and re.fullmatch(r"nvidia/cuda:13\.0\.2-(devel|runtime)-ubuntu24\.04", base[1]), base
        assert im.platform == "x86_64-manylinux_2_39"
        # Engines that JIT-compile kernels (Triton, FlashInfer; flash-attn's build) need the -devel base.
        assert ("-devel-" in base[1]) == (image != "retriever-gpu"), base[1]
        assert "driver >= 580" in text
    else:
        assert all(b == f"python:{im.python}-slim-bookworm" for b, _, _ in stages[1:] if b not in ("uv", "builder"))
        assert im.platform == "x86_64-manylinux_2_36"  # Debian bookworm: glibc 2.36


@pytest.mark.parametrize("image", GPU)
def test_gpu_dockerfile_has_a_smoke_target_on_the_runtime_image(image: str) -> None:
    path = DOCKER / IMAGES[image].dockerfile
    stages = _stages(path)
    by_alias = {alias: (base, ins) for base, alias, ins in stages}
    assert by_alias["smoke"][0] == "runtime" and stages[-1][0] == "runtime" and stages[-1][2] == []
    smoke = by_alias["smoke"][1]
    assert [r for w, r in smoke if w == "USER"][-1] == "10001:10001", "the smoke target runs as the service user"
    copies = " ".join(r for w, r in smoke if w == "COPY")
    for folder in ("tests", "scripts"):
        assert f"{folder} {folder}" in copies
    runs = [c for w, r in smoke if w == "RUN" for c in _commands(r) if c[:3] == ["uv", "pip", "install"]]
    assert runs and all("--require-hashes" in c and f"/tmp/locks/{image}-smoke.lock" in c for c in runs)
    smoke_lock = {n for n, *_ in _lock_entries((LOCKS / f"{image}-smoke.lock").read_text())}
    runtime_lock = {n for n, *_ in _lock_entries((LOCKS / f"{image}.lock").read_text())}
    for pkg in ("pytest", "pytest-asyncio", "pytest-timeout", "gguf", *lock.BUNDLED):
        assert pkg in smoke_lock | runtime_lock, f"the smoke target of {image} lacks {pkg}"
    assert not smoke_lock & runtime_lock, "the smoke lock only adds packages"


def test_trainer_gpu_builds_flash_attn_from_its_hashed_sdist() -> None:
    path = DOCKER / "trainer.gpu.Dockerfile"
    cmds = [c for c in _installs(path) if "/tmp/locks/trainer-gpu-flash-attn.lock" in c]
    assert len(cmds) == 1 and "--no-build-isolation" in cmds[0] and "--require-hashes" in cmds[0]
    run = next(r for w, r in _instructions(path) if w == "RUN" and "trainer-gpu-flash-attn.lock" in r)
    assert "FLASH_ATTENTION_FORCE_BUILD=TRUE" in run, "setup.py would download an unpinned prebuilt wheel"
    ((name, version, _, hashes),) = _lock_entries((LOCKS / "trainer-gpu-flash-attn.lock").read_text())
    assert (name, version, len(hashes)) == ("flash-attn", "2.8.3", 1)
    for tool in ("ninja", "packaging", "psutil", "setuptools", "wheel", "torch", "einops"):
        assert tool in _versions("trainer-gpu"), f"flash-attn's build/run needs {tool} in the trainer-gpu lock"


# ----------------------------------------------------------------------- GPU caches on a read-only root filesystem


def _writable_dirs(container: dict[str, Any], volumes: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for m in container.get("volumeMounts", []):
        vol = volumes.get(m["name"], {})
        if not m.get("readOnly") and ("emptyDir" in vol or "persistentVolumeClaim" in vol or "ephemeral" in vol):
            out.append(m["mountPath"].rstrip("/"))
    return out


def _check_caches(
    where: str, image_env: dict[str, str], container: dict[str, Any], volumes: dict[str, Any]
) -> list[str]:
    env = dict(image_env)
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    read_only = (container.get("securityContext") or {}).get("readOnlyRootFilesystem", False)
    writable = _writable_dirs(container, volumes)
    problems = []
    for var in CACHE_VARS:
        path = env.get(var)
        if not path:
            problems.append(f"{where}: {var} is not set (the library falls back to a directory under $HOME)")
        elif read_only and not any(path == d or path.startswith(d + "/") for d in writable):
            problems.append(f"{where}: {var}={path} is on the read-only root (writable: {writable})")
    return problems


def test_gpu_images_keep_their_caches_on_volumes_the_chart_mounts(render: Callable[..., list[dict[str, Any]]]) -> None:
    images = {
        f"searchrl-{IMAGES[n].dockerfile.split('.')[0]}": _runtime_env(DOCKER / IMAGES[n].dockerfile) for n in GPU
    }
    for name, env in images.items():
        assert env.get("TRITON_CACHE_DIR", "").startswith("/tmp/"), (
            f"{name}: TRITON_CACHE_DIR={env.get('TRITON_CACHE_DIR')}"
        )
    seen = set()
    problems: list[str] = []
    for obj in render("gpu-values.yaml"):
        spec = (obj.get("spec") or {}).get("template", {}).get("spec")
        if not spec:
            continue
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("containers", []):  # not the init containers (wait-for-index runs no GPU code)
            repo, _, tag = c["image"].rpartition(":")
            short = repo.rsplit("/", 1)[-1]
            if short in images and tag.endswith("-gpu"):
                seen.add(short)
                problems += _check_caches(
                    f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}", images[short], c, volumes
                )
    assert {"searchrl-retriever", "searchrl-simulator", "searchrl-policy"} <= seen, seen
    assert not problems, "\n".join(problems)


def test_rayjob_pods_can_write_the_trainer_images_caches(kustomize: Callable[[str], list[dict[str, Any]]]) -> None:
    env = _runtime_env(DOCKER / "trainer.gpu.Dockerfile")
    folders = [
        "research",
        "zerosearch",
        *(f"overlays/{p.name}" for p in (ROOT / "deploy/k8s/overlays").iterdir() if p.is_dir()),
    ]
    problems: list[str] = []
    checked = 0

    def walk(node: Any, where: str) -> None:
        nonlocal checked
        if isinstance(node, dict):
            if "containers" in node and isinstance(node["containers"], list):
                volumes = {v["name"]: v for v in node.get("volumes", [])}
                for c in node["containers"]:
                    if "searchrl-trainer" in c.get("image", "") and c["image"].endswith("-gpu"):
                        checked += 1
                        problems.extend(_check_caches(f"{where}/{c['name']}", env, c, volumes))
            for k, v in node.items():
                walk(v, f"{where}.{k}" if k in ("headGroupSpec", "workerGroupSpecs") else where)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)

    for folder in folders:
        for obj in kustomize(folder):
            walk(obj, f"{folder}:{obj['kind']}/{obj['metadata']['name']}")
    assert checked >= 4, checked
    assert not problems, "\n".join(problems)
