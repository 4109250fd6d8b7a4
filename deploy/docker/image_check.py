#!/usr/bin/env python3
"""Container test of a built image, run inside it the way the chart runs it (no GPU needed).

``deploy/docker/build.sh --test`` runs, for every image it builds::

    docker run --rm --read-only --user 10001:10001 --tmpfs /tmp --tmpfs /home/searchrl/.cache \\
        -v deploy/docker/image_check.py:/image_check.py:ro --entrypoint python IMAGE /image_check.py [--compiler] [MODULE...]

i.e. with a read-only root and only the chart's writable mounts (``/tmp`` and ``~/.cache`` are emptyDirs in
``templates/services.yaml``). It checks, and prints one line per check:

* every cache/config directory the image points a library at (``TRITON_CACHE_DIR``, ``TRITON_HOME``,
  ``XDG_CACHE_HOME``, ``XDG_CONFIG_HOME``, ``CUDA_CACHE_PATH``, ``FLASHINFER_WORKSPACE_BASE``, ``CUPY_CACHE_DIR``,
  ``HF_HOME``, ``SEARCHRL_CACHE_DIR``) can be created and written;
* when Triton is installed, Triton's own cache manager writes a file (its directory is what Triton really resolves);
* with ``--compiler``: a C compiler is on PATH (Triton compiles its CUDA launcher with it at first use) and nvcc;
* each MODULE imports (the engine: ``vllm``, ``sglang``, ``verl``, ``faiss``...), and ``searchrl`` does.

Exit code: 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import sys
import tempfile

CACHE_VARS = (
    "TRITON_CACHE_DIR",
    "TRITON_HOME",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "CUDA_CACHE_PATH",
    "FLASHINFER_WORKSPACE_BASE",
    "CUPY_CACHE_DIR",
    "HF_HOME",
    "SEARCHRL_CACHE_DIR",
)


def _writable(path: str) -> str | None:
    """None when ``path`` can be created and a file written in it, else the error."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compiler", action="store_true", help="require cc/gcc and nvcc (images that JIT kernels)")
    parser.add_argument("modules", nargs="*", help="modules that must import")
    args = parser.parse_args(argv)
    failures = 0

    def report(ok: bool, what: str, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}", flush=True)

    for var in CACHE_VARS:
        path = os.environ.get(var)
        if path:
            err = _writable(path)
            report(err is None, f"{var}={path} writable", err or "")
    try:
        from triton.runtime.cache import get_cache_manager
    except ImportError:
        pass
    else:
        try:
            manager = get_cache_manager("0" * 64)
            written = manager.put(b"probe", "image_check.txt")
            report(True, "Triton cache writable", str(written))
        except OSError as exc:
            report(False, "Triton cache writable", f"{type(exc).__name__}: {exc}")
    if args.compiler:
        cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        report(cc is not None, "C compiler for Triton", cc or "none of $CC, cc, gcc")
        nvcc = shutil.which("nvcc") or (
            "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
        )
        report(nvcc is not None, "nvcc for JIT-compiled kernels", nvcc or "not found")
    for module in ["searchrl", *args.modules]:
        try:
            importlib.import_module(module)
            report(True, f"import {module}")
        except Exception as exc:  # noqa: BLE001 - any import failure is the finding
            report(False, f"import {module}", f"{type(exc).__name__}: {exc}")
    print(f"image check: {'all passed' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
