"""GPU placement decided on CPU: the nprobe clamp (faiss-gpu's 2048 limit), the device metric, the compiled-code check.

faiss-gpu does not run here, so the clamp is tested on real faiss-cpu IVF indexes (the preparation step ``to_gpu``
runs before cloning is its own function), and ``to_gpu``'s control flow against a stand-in for
``faiss.index_cpu_to_all_gpus`` that rejects exactly what faiss-gpu 1.15.1's cloner rejects for these indexes:
``validateNProbe`` (``0 < nprobe <= 2048``) in ``GpuIndexIVF::copyFrom``. ``tests/retriever/test_gpu.py`` repeats the
decisive cases on a real GPU.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from searchrl.errors import FailedPrecondition
from searchrl.retriever import gpu
from searchrl.retriever.index.faiss_util import prepare_for_gpu, record_index_device, to_gpu
from searchrl.retriever.index.load import LoadedIndex, load_index
from searchrl.retriever.index.params import IndexParams, read_manifest

# SASS / PTX architectures read with searchrl.retriever.gpu.fatbin_archs from the PyPI wheels' shared libraries
# (faiss-gpu 1.15.1: faiss/libfaiss.so; faiss-gpu-cu12 1.14.1.post1: faiss_gpu_cu12.libs/libfaiss-*.so); each
# library holds 182 fat binaries, every one with the same architectures.
FAISS_GPU_1_15_1 = gpu.CudaArchs(frozenset({70, 75, 80, 86, 89, 90}), frozenset({90}), ("libfaiss.so",))
FAISS_GPU_CU12_1_14_1 = gpu.CudaArchs(frozenset({70, 80}), frozenset(), ("libfaiss-6b43fd57.so",))
H200 = gpu.CudaDevice(0, "NVIDIA H200", 9, 0)
WIKI18_PASSAGES = 21_015_324  # DPR wiki-18 (psgs_w100), the ci/gpu-values.yaml preset's corpus


def _ivfpq(nlist: int, nprobe: int, n: int = 0, d: int = 8) -> Any:
    """A trained real faiss-cpu IVF-PQ index over random unit vectors."""
    import faiss

    n = n or max(2 * nlist, 512)  # PQ at 8 bits trains 256 centroids per sub-quantizer
    x = np.random.default_rng(0).standard_normal((n, d)).astype("float32")
    faiss.normalize_L2(x)
    idx = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, 2, 8, faiss.METRIC_INNER_PRODUCT)
    idx.cp.min_points_per_centroid = 1
    idx.pq.cp.min_points_per_centroid = 1
    idx.train(x)
    idx.add(x)
    idx.nprobe = nprobe
    return idx


@pytest.fixture(scope="module")
def big_ivf() -> Any:
    """IVF-PQ with nlist 2400 > 2292 (so the GPU limit, not nlist, is what binds) and the wiki-18 nprobe 2292."""
    return _ivfpq(2400, 2292)


class _ClonerOptions:
    """``faiss.GpuMultipleClonerOptions`` fields that ``to_gpu`` sets."""

    useFloat16 = False  # noqa: N815 - faiss's name
    shard = False


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One visible H200 with faiss-gpu 1.15.1's code; the cloner enforces validateNProbe and records each nprobe."""
    import faiss

    seen: list[int] = []

    def clone(index: Any, co: Any = None, ngpu: int = -1) -> Any:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            seen.append(int(ivf.nprobe))
            if not 0 < ivf.nprobe <= 2048:  # faiss/gpu/impl/IndexUtils.cu validateNProbe, via GpuIndexIVF::copyFrom
                raise RuntimeError(
                    "Error in void faiss::gpu::validateNProbe(size_t, bool) at faiss/gpu/impl/IndexUtils.cu:37: "
                    f"Error: 'nprobe > 0 && nprobe <= (size_t)getMaxKSelection(use_cuvs)' failed: GPU IVF index only "
                    f"supports nprobe selection up to 2048 (requested {ivf.nprobe})"
                )
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", _ClonerOptions, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", clone)
    monkeypatch.setattr(gpu, "cuda_devices", lambda: [H200])
    monkeypatch.setattr(gpu, "faiss_cuda_archs", lambda files=None: FAISS_GPU_1_15_1)
    return seen


def _device_samples(name: str) -> dict[str, float]:
    return {
        dev: v
        for dev in ("gpu", "cpu")
        if (v := REGISTRY.get_sample_value("searchrl_index_device_info", {"index": name, "device": dev})) is not None
    }


# ------------------------------------------------------------------------------------------------------ nprobe clamp
def test_the_wiki18_preset_computes_an_nprobe_over_the_gpu_limit() -> None:
    p = IndexParams().resolved(WIKI18_PASSAGES, 768)
    assert (p.nlist, p.nprobe) == (18337, 2292)
    assert p.nprobe > gpu.GPU_MAX_NPROBE == 2048


def test_clamp_nprobe_caps_at_2048_and_nlist_and_logs_the_original(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="searchrl.retriever.gpu"):
        assert gpu.clamp_nprobe(2048) == 2048 and gpu.clamp_nprobe(8, nlist=16) == 8
        assert not caplog.records
        assert gpu.clamp_nprobe(2292, nlist=18337, where="wiki-18") == 2048
        assert gpu.clamp_nprobe(300, nlist=256) == 256  # the GPU scan FAISS_ASSERTs nprobe <= nlist
    assert [r.getMessage() for r in caplog.records] == [
        "wiki-18: nprobe=2292 exceeds faiss-gpu's GPU_MAX_SELECTION_K=2048 on GPU; clamped to nprobe=2048",
        "nprobe=300 exceeds the index's nlist=256 on GPU; clamped to nprobe=256",
    ]


def test_prepare_for_gpu_clamps_a_real_ivf_index(big_ivf, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    big_ivf.nprobe = 2292
    with caplog.at_level(logging.WARNING, logger="searchrl.retriever.gpu"):
        assert prepare_for_gpu(big_ivf, "wiki-18-ivfpq") == 2292
    assert big_ivf.nprobe == 2048
    assert "nprobe=2292" in caplog.text and "clamped to nprobe=2048" in caplog.text
    big_ivf.nprobe = 2292


def test_prepare_for_gpu_leaves_what_faiss_gpu_accepts() -> None:
    import faiss

    small = _ivfpq(64, 8)
    assert prepare_for_gpu(small) is None and small.nprobe == 8
    flat = faiss.IndexFlatIP(8)
    assert prepare_for_gpu(flat) is None


def test_to_gpu_clamps_before_cloning_so_the_ivf_index_stays_on_gpu(big_ivf, fake_gpu: list[int]) -> None:  # noqa: ANN001
    big_ivf.nprobe = 2292
    placed, on_gpu = to_gpu(big_ivf, "wiki-18-ivfpq")
    assert on_gpu, "nprobe 2292 made the GPU clone fail"
    assert fake_gpu == [2048] and placed.nprobe == 2048
    big_ivf.nprobe = 2292


def test_a_clone_failure_keeps_the_cpu_index_with_its_nprobe_and_the_metric_says_cpu(
    index_dirs, encoder, fake_gpu: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    import faiss

    def no_kernel(index: Any, co: Any = None, ngpu: int = -1) -> Any:
        fake_gpu.append(int(faiss.try_extract_index_ivf(index).nprobe))
        # what faiss-gpu raises for IVF-PQ codes of other than 8 bits (GpuIndexIVFPQ::verifyPQSettings_)
        raise RuntimeError("Error in void faiss::gpu::GpuIndexIVFPQ::verifyPQSettings_() const: only 8 bits per code")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", no_kernel)
    name = Path(index_dirs["ivfpq"]).name
    m = read_manifest(index_dirs["ivfpq"])
    loaded = load_index(index_dirs["ivfpq"], encoder=encoder, use_gpu=None, nprobe=m.build_params["nlist"] + 5)
    assert not loaded.on_gpu and fake_gpu  # the clone was tried, then the index stayed on CPU
    assert _device_samples(name) == {"cpu": 1.0}
    # CPU search has no nprobe limit: the requested value is kept as asked
    assert loaded.nprobe == m.build_params["nlist"] + 5 == int(loaded.index.nprobe)
    assert REGISTRY.get_sample_value("searchrl_index_nprobe", {"index": name}) == loaded.nprobe


def test_a_fallback_restores_the_nprobe_the_clamp_changed(big_ivf, fake_gpu: list[int], monkeypatch) -> None:  # noqa: ANN001
    import faiss

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no")))
    big_ivf.nprobe = 2292
    placed, on_gpu = to_gpu(big_ivf, "x")
    assert not on_gpu and placed is big_ivf and big_ivf.nprobe == 2292


def test_set_search_params_on_a_gpu_index_clamps(big_ivf, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    import faiss

    # faiss-gpu's GpuParameterSpace stores any nprobe on a GpuIndexIVF (GpuAutoTune.cpp); each search then throws in
    # validateNProbe. ParameterSpace stores it the same way on this CPU IVF index.
    monkeypatch.setattr(faiss, "GpuParameterSpace", faiss.ParameterSpace, raising=False)
    # store/encoder/manifest are not used by set_search_params
    loaded = LoadedIndex(big_ivf, None, None, None, True, IndexParams(), "gpu-ivf", 2400, 2048)  # type: ignore[arg-type]
    loaded.set_search_params(nprobe=3000)
    assert loaded.nprobe == 2048 == big_ivf.nprobe
    assert REGISTRY.get_sample_value("searchrl_index_nprobe", {"index": "gpu-ivf"}) == 2048
    big_ivf.nprobe = 2292


# ------------------------------------------------------------------------------------------------------ device metric
def test_the_metric_reports_cpu_for_a_cpu_served_index(index_dirs, encoder) -> None:  # noqa: ANN001
    for kind in ("flat", "ivfpq"):
        loaded = load_index(index_dirs[kind], encoder=encoder, use_gpu=False)
        assert loaded.name == Path(index_dirs[kind]).resolve().name
        assert _device_samples(loaded.name) == {"cpu": 1.0}
    ivf = load_index(index_dirs["ivfpq"], encoder=encoder, use_gpu=False, nprobe=7)
    assert REGISTRY.get_sample_value("searchrl_index_nprobe", {"index": ivf.name}) == 7 == ivf.index.nprobe


def test_the_metric_follows_a_reload_onto_another_device() -> None:
    record_index_device("reloaded", True)
    assert _device_samples("reloaded") == {"gpu": 1.0}
    record_index_device("reloaded", False)
    assert _device_samples("reloaded") == {"cpu": 1.0}


# ------------------------------------------------------------------------------------------------------ compiled code
@pytest.mark.parametrize(
    "archs,cc,ok",
    [
        (FAISS_GPU_CU12_1_14_1, (9, 0), False),  # H100/H200: no sm_90 SASS, no PTX -> error 209, FAISS_ASSERT abort
        (FAISS_GPU_CU12_1_14_1, (8, 6), True),  # sm_80 SASS runs on 8.x, x >= 0
        (FAISS_GPU_CU12_1_14_1, (7, 5), True),
        (FAISS_GPU_CU12_1_14_1, (6, 1), False),
        (FAISS_GPU_1_15_1, (9, 0), True),
        (FAISS_GPU_1_15_1, (8, 9), True),
        (FAISS_GPU_1_15_1, (10, 0), True),  # compute_90 PTX, JIT-compiled by the driver
        (FAISS_GPU_1_15_1, (6, 0), False),
    ],
)
def test_which_gpus_a_faiss_build_has_code_for(archs: gpu.CudaArchs, cc: tuple[int, int], ok: bool) -> None:
    assert archs.runs_on(*cc) is ok


def test_a_gpu_without_faiss_code_is_refused_with_the_fix() -> None:
    with pytest.raises(FailedPrecondition) as info:
        gpu.check_faiss_gpu_code(FAISS_GPU_CU12_1_14_1, [H200])
    msg = str(info.value)
    for part in ("GPU 0 NVIDIA H200 (compute capability 9.0)", "sm_70, sm_80", "faiss-gpu==1.15.1", "--use-gpu=false"):
        assert part in msg
    gpu.check_faiss_gpu_code(FAISS_GPU_1_15_1, [H200])
    gpu.check_faiss_gpu_code(None, [H200])  # unknown build: not checked
    gpu.check_faiss_gpu_code(FAISS_GPU_1_15_1, None)


def test_to_gpu_refuses_before_any_clone(big_ivf, fake_gpu: list[int], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(gpu, "faiss_cuda_archs", lambda files=None: FAISS_GPU_CU12_1_14_1)
    with pytest.raises(FailedPrecondition, match="no GPU code for GPU 0 NVIDIA H200"):
        to_gpu(big_ivf, "x")
    assert fake_gpu == []  # nothing was cloned: no kernel ran


def _elf_with_fatbin(entries: list[tuple[int, int]]) -> bytes:
    """A little-endian ELF64 file whose ``.nv_fatbin`` section holds one fat binary with ``(kind, arch)`` entries,
    laid out as nvcc writes them (16-byte container header; 64-byte entry headers; payload)."""
    payload = b"\0" * 16
    body = b"".join(
        struct.pack("<HHIQIIHHI", kind, 0x101, 64, len(payload), 0, 0, 1, 7, arch).ljust(64, b"\0") + payload
        for kind, arch in entries
    )
    fatbin = struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body
    fatbin += b"\0" * 8  # padding between fat binaries
    fatbin += struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body
    names = b"\0.shstrtab\0.nv_fatbin\0"
    data_off = 64
    names_off = data_off + len(fatbin)
    sh_off = names_off + len(names)
    sh_off += -sh_off % 8

    def shdr(name: int, typ: int, off: int, size: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, typ, 0, 0, off, size, 0, 0, 1, 0)

    sections = shdr(0, 0, 0, 0) + shdr(1, 3, names_off, len(names)) + shdr(11, 1, data_off, len(fatbin))
    header = b"\x7fELF" + bytes([2, 1, 1]) + b"\0" * 9
    header += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 0, sh_off, 0, 64, 0, 0, 64, 3, 1)
    blob = header + fatbin + names
    return blob.ljust(sh_off, b"\0") + sections


def test_fatbin_reader(tmp_path: Path) -> None:
    lib = tmp_path / "libfake.so"
    lib.write_bytes(_elf_with_fatbin([(2, 70), (2, 80), (1, 90)]))
    assert gpu.fatbin_archs(lib) == ({70, 80}, {90})
    archs = gpu.faiss_cuda_archs([lib, tmp_path / "missing.so"])
    assert archs is not None and archs.describe() == "sm_70, sm_80, compute_90" and archs.files == (str(lib),)
    (tmp_path / "not-elf.so").write_bytes(b"hello")
    assert gpu.fatbin_archs(tmp_path / "not-elf.so") is None


def test_faiss_cpu_libraries_hold_no_gpu_code() -> None:
    files = gpu.faiss_library_files()
    assert any(p.name.startswith(("libfaiss", "_swigfaiss")) for p in files)
    import faiss

    if "GPU" not in faiss.get_compile_options():
        assert all(gpu.fatbin_archs(p) is None for p in files)  # real ELF libraries without a .nv_fatbin section
        assert gpu.faiss_cuda_archs() is None
