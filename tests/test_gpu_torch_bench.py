"""benchmarks/gpu_torch_bench.py on CPU: every row of its table measured with tiny shapes, also as on a bare machine.

The benchmark is meant for a bare GPU machine (torch, transformers, tokenizers, sentence-transformers, and a few
carried wheels; no searchrl install, no Ray). Here it runs with ``--device cpu --tiny`` twice: once as installed, and
once with site-packages put on ``PYTHONPATH`` under ``python -S`` (so the editable searchrl finder is not loaded and
the script must map the source tree itself) with Ray left out (so verl's import needs the script's stand-in).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "gpu_torch_bench.py"
# section -> (models, settings) of the tiny run: every combination must be a row with a measured value
EXPECTED = {
    "rollout": ({"tiny-qwen2.5-0.5b", "tiny-qwen2.5-1.5b"}, {"batch 1", "batch 16"}),
    "grpo": ({"tiny-qwen2.5-0.5b", "tiny-qwen2.5-1.5b"}, {"2x2 episodes, micro 2"}),
    "encoder": ({"tiny-minilm-l6", "tiny-e5-base"}, {"batch 32", "batch 256"}),
}
TABLE_ROW = re.compile(r"^\| (rollout|grpo|encoder) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", re.M)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("verl") is None, reason="verl (trainer extra) not installed")


def bench(*args: str, env: dict[str, str] | None = None, python_flags: tuple[str, ...] = ()) -> tuple[Any, float]:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, *python_flags, str(BENCH), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=full,
        cwd=ROOT,
    )
    return res, time.monotonic() - t0


def check_every_row(stdout: str, rows: list[dict[str, Any]]) -> None:
    table = {
        (m.group(1), m.group(2).strip(), m.group(3).strip()): m.group(4).strip() for m in TABLE_ROW.finditer(stdout)
    }
    for section, (models, settings) in EXPECTED.items():
        for model in models:
            for setting in settings:
                cell = table.get((section, model, setting))
                assert cell is not None, f"no table row {section} / {model} / {setting}"
                assert re.match(r"^[\d,]+\.\d+ (tok/s|s|q/s)$", cell), f"{section} / {model} / {setting}: {cell}"
    assert len(rows) == sum(len(m) * len(s) for m, s in EXPECTED.values())
    for row in rows:
        assert not row["error"] and not row["skipped"], row
        assert row["value"] > 0 and row["seconds"] > 0
    assert {r["unit"] for r in rows if r["section"] == "rollout"} == {"tok/s"}
    grpo = [r for r in rows if r["section"] == "grpo"]
    assert all(r["extra"]["episodes"] == 4 and r["extra"]["loss"] == r["extra"]["loss"] for r in grpo)


@pytest.mark.slow
def test_tiny_cpu_run_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res, seconds = bench("--device", "cpu", "--tiny", "--json", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    check_every_row(res.stdout, data["rows"])
    env = data["environment"]
    assert env["device"] == "cpu" and env["torch"] and env["transformers"] and env["searchrl"] == "installed"
    assert "| section | model | setting | result | peak GPU memory | notes |" in res.stdout
    assert seconds < 180, f"the tiny CPU run took {seconds:.0f} s"


def _site_without_ray(folder: Path) -> Path:
    """This interpreter's site-packages as symlinks, minus Ray and minus the editable searchrl install."""
    site = Path(sysconfig.get_paths()["purelib"])
    folder.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name == "ray" or name.startswith(("ray-", "searchrl", "__editable__")) or name.endswith(".pth"):
            continue
        (folder / entry.name).symlink_to(entry)
    return folder


@pytest.mark.slow
def test_bare_machine_mode_maps_the_source_tree_and_stands_in_for_ray(tmp_path: Path) -> None:
    site = _site_without_ray(tmp_path / "site")
    out = tmp_path / "bench.json"
    res, _ = bench("--device", "cpu", "--tiny", "--json", str(out), env={"PYTHONPATH": str(site)}, python_flags=("-S",))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    check_every_row(res.stdout, data["rows"])
    assert data["environment"]["searchrl"] == f"source tree {ROOT}"
    assert data["environment"]["ray"] == "stand-in (not installed)"


def _load_module() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_torch_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_source_roots_hold_every_component() -> None:
    mod = _load_module()
    roots = mod.source_roots(ROOT)
    assert roots[0] == ROOT and ROOT / "retriever" in roots
    for component in ("agent", "client", "services", "retriever", "simulator", "trainer", "evaluator"):
        (init,) = [r / "searchrl" / component / "__init__.py" for r in roots if (r / "searchrl" / component).is_dir()]
        assert init.exists(), component


def test_ray_stand_in_rejects_every_use(tmp_path: Path) -> None:
    code = (
        f"import sys; sys.path.insert(0, {str(BENCH.parent)!r})\n"
        "import gpu_torch_bench as b\n"
        "assert b.ensure_ray_importable() == 'stand-in (not installed)'\n"
        "import ray\n"
        "assert isinstance(ray.ObjectRef, type)\n"
        "try:\n"
        "    ray.init()\n"
        "except AttributeError as e:\n"
        "    assert 'Ray is not installed' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('ray.init did not raise')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(_site_without_ray(tmp_path / "site"))}
    res = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0, res.stderr


def test_no_cuda_without_device_flag_skips_cleanly_and_explicit_cuda_fails() -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    res, _ = bench("--sections", "encoder")
    assert res.returncode == 0 and "sees no CUDA device; skipped" in res.stdout
    res, _ = bench("--device", "cuda", "--sections", "encoder")
    assert res.returncode == 1 and "cannot run" in res.stderr


def test_unknown_section_is_a_usage_error() -> None:
    res, _ = bench("--device", "cpu", "--sections", "rollout,warp")
    assert res.returncode == 2 and "unknown section" in res.stderr
