"""scripts/gpu_smoke.sh on a CPU machine: usage, stage selection, the failure/skip/timeout paths, the verl config.

The GPU stages themselves run only inside the GPU images (``make test-gpu``). Here the script's own logic runs for
real: ``bash -n`` / shellcheck, ``--help``, usage errors, the ``env`` stage without a driver, and, with a stand-in
``nvidia-smi`` that prints what the real one prints for ``--query-gpu=name,driver_version,compute_cap
--format=csv,noheader`` and ``-L``, the driver-version check, the torch check, the per-stage timeout and the pytest
stage's rule that a skipped GPU test fails the stage. ``--verl-config-check`` composes the verl stage's exact
overrides through the RayJob entrypoint's ``--check-only`` (verl's schema and ``validate_config``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_smoke.sh"
STAGES = ("env", "faiss", "vllm", "sglang", "verl")
RESULT = re.compile(r"^(PASS|FAIL|SKIP) (\w[\w-]*) (\d+)s(?: - (.*))?$", re.M)


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=full, cwd=ROOT
    )


def results(out: str) -> dict[str, tuple[str, str]]:
    """``{stage: (status, reason)}`` from the result lines (the summary repeats them; the last wins)."""
    return {m.group(2): (m.group(1), m.group(4) or "") for m in RESULT.finditer(out)}


def fake_nvidia_smi(folder: Path, driver: str = "580.95.05", hang: bool = False) -> Path:
    """A stand-in ``nvidia-smi`` on PATH: the real CSV for one H100, or a hang that records its pid."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    pidfile = folder / "nvidia-smi.pid"
    body = f"echo $$ > {pidfile}\nexec sleep 600\n" if hang else ""
    tool.write_text(
        "#!/usr/bin/env bash\n"
        + body
        + 'case "$*" in\n'
        + '  *-L*) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;\n'
        + f'  *--query-gpu=name,driver_version,compute_cap*) echo "NVIDIA H100 80GB HBM3, {driver}, 9.0" ;;\n'
        + '  *) echo "nvidia-smi stand-in: unsupported arguments $*" >&2; exit 2 ;;\n'
        + "esac\n"
    )
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    return folder


def path_with(folder: Path) -> str:
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_syntax_and_shellcheck() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_help_documents_every_stage() -> None:
    res = run("--help")
    assert res.returncode == 0, res.stderr
    text = res.stdout
    assert "first run on your cluster" in text and "--target smoke" in text
    for stage in STAGES:
        assert re.search(rf"^  {stage}\s+\S", text, re.M), f"stage {stage} is not documented"
    for image in ("retriever image", "simulator image", "policy image", "trainer image", "every GPU image"):
        assert image in text
    # each stage's time budget and what it proves
    assert text.count(" s / ") + text.count("min / ") >= len(STAGES)
    for finding in ("#4", "#6", "#5", "#1", "#2", "#3", "#14"):
        assert finding in text
    assert "critic/score/mean" in text and "nprobe 2292" in text and "T=0.7" in text


@pytest.mark.parametrize("args", [("bogus",), ("env", "nope"), ("--no-such-option",)])
def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    res = run(*args)
    assert res.returncode == 2
    assert "usage:" in res.stderr and ("unknown stage" in res.stderr or "unknown option" in res.stderr)
    assert not RESULT.search(res.stdout)  # nothing ran


def test_env_stage_without_a_driver_fails_fast() -> None:
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    t0 = time.monotonic()
    res = run("env")
    assert time.monotonic() - t0 < 30
    assert res.returncode == 1
    status, reason = results(res.stdout)["env"]
    assert status == "FAIL" and "nvidia-smi not found" in reason
    assert "0 passed, 1 failed, 0 skipped" in res.stdout


def test_stages_whose_library_is_missing_skip_with_the_image_or_fail_when_strict() -> None:
    pytest.importorskip("torch")
    missing = [s for s, mod in (("vllm", "vllm"), ("sglang", "sglang")) if _absent(mod)]
    if not missing:
        pytest.skip("vLLM and SGLang are both installed here")
    res = run(*missing)
    assert res.returncode == 0, res.stdout  # only skips: nothing failed
    got = results(res.stdout)
    for stage in missing:
        assert got[stage][0] == "SKIP" and "image's smoke target" in got[stage][1] and stage in got[stage][1]
    strict = run("--strict", *missing)
    assert strict.returncode == 1 and all(results(strict.stdout)[s][0] == "FAIL" for s in missing)


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_env_stage_rejects_a_driver_older_than_580(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.version.cuda and torch.version.cuda.startswith("12."):
        pytest.skip("a CUDA 12 torch accepts drivers from 525")
    bin_dir = fake_nvidia_smi(tmp_path / "bin", driver="570.86.15")
    res = run("env", env={"PATH": path_with(bin_dir)})
    assert res.returncode == 1
    status, reason = results(res.stdout)["env"]
    assert status == "FAIL" and "driver 570.86.15 is older than 580" in reason
    ok = run("env", env={"PATH": path_with(bin_dir), "SEARCHRL_SMOKE_MIN_DRIVER": "550"})
    assert "driver(s) 570.86.15 >= 550" in ok.stdout


def test_env_stage_fails_when_torch_sees_no_gpu(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here")
    bin_dir = fake_nvidia_smi(tmp_path / "bin")
    res = run("env", env={"PATH": path_with(bin_dir)})
    assert res.returncode == 1
    assert "NVIDIA H100 80GB HBM3, 580.95.05, 9.0" in res.stdout
    status, reason = results(res.stdout)["env"]
    assert status == "FAIL" and "sees no GPU although nvidia-smi does" in reason


def test_a_hanging_stage_is_killed_at_its_budget(tmp_path: Path) -> None:
    bin_dir = fake_nvidia_smi(tmp_path / "bin", hang=True)
    t0 = time.monotonic()
    res = run("env", env={"PATH": path_with(bin_dir), "SEARCHRL_SMOKE_TIMEOUT_ENV": "3"}, timeout=60)
    assert time.monotonic() - t0 < 40
    status, reason = results(res.stdout)["env"]
    assert res.returncode == 1 and status == "FAIL" and reason == "timed out after 3s"
    pid = int((bin_dir / "nvidia-smi.pid").read_text())
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the stage's whole process group was ended
        os.kill(pid, 0)


GPU_TEST = """
import pytest

pytestmark = pytest.mark.gpu


def test_on_gpu():
    {body}
"""


@pytest.fixture
def sglang_sandbox(tmp_path: Path) -> dict[str, str]:
    """The sglang stage over a stand-in tests folder: a fake GPU, an importable ``sglang`` package, our test file."""
    pytest.importorskip("pytest_asyncio")
    if not _absent("sglang"):
        pytest.skip("the real SGLang is installed here")
    bin_dir = fake_nvidia_smi(tmp_path / "bin")
    (tmp_path / "site" / "sglang").mkdir(parents=True)
    (tmp_path / "site" / "sglang" / "__init__.py").write_text("")
    (tmp_path / "tree" / "tests" / "services").mkdir(parents=True)
    return {
        "PATH": path_with(bin_dir),
        "PYTHONPATH": str(tmp_path / "site"),
        "SEARCHRL_SMOKE_TESTS_DIR": str(tmp_path / "tree" / "tests"),
    }


def _sglang_stage(env: dict[str, str], body: str | None) -> tuple[int, str, str]:
    test_file = Path(env["SEARCHRL_SMOKE_TESTS_DIR"]) / "services" / "test_policy_sglang.py"
    test_file.write_text(GPU_TEST.format(body=body) if body else "def test_not_marked():\n    pass\n")
    res = run("sglang", env=env)
    status, reason = results(res.stdout)["sglang"]
    return res.returncode, status, reason


def test_pytest_stage_fails_when_a_gpu_test_skips(sglang_sandbox: dict[str, str]) -> None:
    rc, status, reason = _sglang_stage(sglang_sandbox, 'pytest.skip("no CUDA device")')
    assert rc == 1 and status == "FAIL" and "1 GPU test(s) skipped" in reason


def test_pytest_stage_passes_only_when_its_gpu_tests_pass(sglang_sandbox: dict[str, str]) -> None:
    assert _sglang_stage(sglang_sandbox, "assert True")[:2] == (0, "PASS")
    rc, status, reason = _sglang_stage(sglang_sandbox, "assert 1 == 2")
    assert rc == 1 and status == "FAIL" and "exited 1" in reason
    rc, status, reason = _sglang_stage(sglang_sandbox, None)
    assert rc == 1 and status == "FAIL" and "no GPU test was collected" in reason


@pytest.mark.slow
def test_verl_stage_config_passes_the_rayjob_entrypoint_check() -> None:
    pytest.importorskip("verl")
    if _absent("fanoutqa"):  # a data-only package (installed --no-deps): its files, not its import, are needed
        pytest.skip("the fanoutqa package (bundled FanOutQA questions) is not installed")
    res = run("--verl-config-check", timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "All configuration checks passed" in res.stdout + res.stderr
    assert results(res.stdout)["verl-config-check"][0] == "PASS"


def test_make_test_gpu_runs_the_smoke_script() -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # A clean make environment: under `make test` MAKEFLAGS/MAKELEVEL would make it print "Entering directory".
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    res = subprocess.run(
        ["make", "--no-print-directory", "-n", "test-gpu"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert res.returncode == 0, res.stderr
    commands = [line for line in res.stdout.splitlines() if line.strip()]
    assert commands == ["bash scripts/gpu_smoke.sh "] or commands == ["bash scripts/gpu_smoke.sh"]
    assert "pytest" not in res.stdout


def test_interrupt_ends_the_running_stage(tmp_path: Path) -> None:
    """SIGTERM to the script ends the stage it runs (its whole process group) and removes the work folder."""
    bin_dir = fake_nvidia_smi(tmp_path / "bin", hang=True)
    env = {**os.environ, "PYTHON": sys.executable, "PATH": path_with(bin_dir), "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(["bash", str(SCRIPT), "env"], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    pidfile = bin_dir / "nvidia-smi.pid"
    deadline = time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pidfile.exists(), "the stage did not start"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pidfile.read_text()), 0)
    assert not list(tmp_path.glob("searchrl-gpu-smoke.*"))


@pytest.mark.slow
def test_verl_stage_retriever_starts_serves_and_counts_searches(tmp_path: Path, tiny_index: Path) -> None:
    """The verl stage's own retriever (over the session's small index through SEARCHRL_SMOKE_INDEX_DIR: the default,
    the whole bundled Wikipedia, takes minutes to embed on 2 cores): started on free ports, READY parsed, its query
    counter read, stopped. A driver that overruns is killed with its process group, retriever included."""
    pytest.importorskip("faiss")
    pytest.importorskip("sentence_transformers")
    search = (
        "import asyncio, sys\n"
        "from searchrl.client.retrieval import RetrievalClient\n"
        "async def main():\n"
        "    client = RetrievalClient(sys.argv[1])\n"
        "    found = await client.search(['Who wrote Dracula?', 'capital of France'], top_k=3)\n"
        "    assert [len(docs) for docs in found] == [3, 3], found\n"
        "    await client.close()\n"
        "asyncio.run(main())\n"
    )
    (tmp_path / "search.py").write_text(search)
    driver = tmp_path / "driver.sh"
    driver.write_text(
        "set -uo pipefail\n"
        f"source {SCRIPT}\n"
        f"STAGE_DIR={tmp_path} REASON_FILE={tmp_path}/reason\n"
        "export STAGE_DIR REASON_FILE\n"
        "trap stop_retriever EXIT\n"
        "SEARCHRL_SMOKE_RETRIEVER_WAIT=300 start_retriever\n"
        'echo "pid=$RETRIEVER_PID target=$RETRIEVER_TARGET"\n'
        'echo "before=$(retriever_queries "$RETRIEVER_METRICS_PORT")"\n'
        f'"$PY" {tmp_path / "search.py"} "$RETRIEVER_TARGET" || exit 1\n'
        'echo "after=$(retriever_queries "$RETRIEVER_METRICS_PORT")"\n'
    )
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "SEARCHRL_SMOKE_INDEX_DIR": str(tiny_index)}
    proc = subprocess.Popen(["bash", str(driver)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=tmp_path, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the retriever it started
        stdout, stderr = proc.communicate()
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert res.returncode == 0, res.stdout + res.stderr + (tmp_path / "retriever.log").read_text()
    assert re.search(r"target=dns:///127\.0\.0\.1:\d+", res.stdout)
    assert "before=0" in res.stdout and "after=2" in res.stdout
    pid = int(re.search(r"pid=(\d+)", res.stdout).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):  # stopped on exit
        os.kill(pid, 0)
