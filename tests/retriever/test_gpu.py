"""faiss-gpu placement (float16, sharded over all GPUs), the nprobe clamp and the compiled-code check on a real GPU;
runs only with ``-m gpu`` on a host with faiss-gpu (1.15.1) and a GPU (the retriever image's ``smoke`` target)."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", autouse=True)
def _needs_gpu() -> None:
    faiss = pytest.importorskip("faiss")
    if not hasattr(faiss, "get_num_gpus") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss-gpu with a visible GPU is required")


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_index_on_gpu_matches_cpu(index_dirs, flat_index, encoder, fanout_sample, kind) -> None:  # noqa: ANN001
    from searchrl.retriever.index.faiss_util import recall_at_k
    from searchrl.retriever.index.load import load_index

    _, vecs = fanout_sample
    cpu = load_index(index_dirs[kind], encoder=encoder, use_gpu=False)
    gpu = load_index(index_dirs[kind], encoder=encoder, use_gpu=None)
    if kind == "ivfpq" and cpu.params.pq_nbits != 8:
        assert not gpu.on_gpu  # no GPU kernel for these codes: served from CPU, not a crash
        return
    assert gpu.on_gpu
    _, cpu_rows = cpu.search_vectors(vecs, 10)
    scores, gpu_rows = gpu.search_vectors(vecs, 10)
    assert recall_at_k(gpu_rows, cpu_rows, 10) >= 0.95  # float16 storage reorders near-ties only
    assert np.all(np.diff(scores, axis=1) <= 1e-3)


def test_ivfpq_with_nprobe_over_2048_stays_on_gpu_and_searches() -> None:
    """The wiki-18 preset's nprobe (2292) used to make the clone fail and the index fall back to CPU."""
    import faiss
    from prometheus_client import REGISTRY

    from searchrl.retriever import gpu
    from searchrl.retriever.index.faiss_util import record_index_device, to_gpu
    from searchrl.retriever.index.load import LoadedIndex
    from searchrl.retriever.index.params import IndexParams

    d, nlist = 64, 2400  # nlist > 2292: the GPU limit, not nlist, is what binds
    x = np.random.default_rng(0).standard_normal((60_000, d)).astype("float32")
    faiss.normalize_L2(x)
    cpu = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, 32, 8, faiss.METRIC_INNER_PRODUCT)
    cpu.train(x)
    cpu.add(x)
    cpu.nprobe = 2292
    placed, on_gpu = to_gpu(cpu, "nprobe-2292")
    assert on_gpu, "nprobe > 2048 fell back to CPU"
    assert cpu.nprobe == gpu.GPU_MAX_NPROBE
    loaded = LoadedIndex(placed, None, None, None, True, IndexParams(), "nprobe-2292", nlist, 2048)  # type: ignore[arg-type]
    loaded.set_search_params(nprobe=4000)  # GpuParameterSpace would store 4000 and every search would throw
    assert loaded.nprobe == 2048
    _, rows = loaded.search_vectors(x[:256], 10)
    assert (rows == np.arange(256)[:, None]).any(axis=1).mean() > 0.95  # each vector finds itself
    record_index_device("nprobe-2292", on_gpu)
    assert REGISTRY.get_sample_value("searchrl_index_device_info", {"index": "nprobe-2292", "device": "gpu"}) == 1


def test_the_installed_faiss_has_code_for_every_visible_gpu() -> None:
    from searchrl.retriever import gpu

    devices = gpu.cuda_devices()
    archs = gpu.faiss_cuda_archs()
    assert devices, "the CUDA driver API lists no device although faiss sees one"
    assert archs is not None, f"no .nv_fatbin in {gpu.faiss_library_files()}"
    gpu.check_faiss_gpu_code(archs, devices)  # raises FailedPrecondition otherwise
    print({d.name: d.compute_capability for d in devices}, archs.describe())


def test_the_metric_reports_gpu_for_a_gpu_served_index(index_dirs, encoder) -> None:  # noqa: ANN001
    from prometheus_client import REGISTRY

    from searchrl.retriever.index.load import load_index

    loaded = load_index(index_dirs["flat"], encoder=encoder, use_gpu=None)
    assert loaded.on_gpu
    assert REGISTRY.get_sample_value("searchrl_index_device_info", {"index": loaded.name, "device": "gpu"}) == 1
    assert REGISTRY.get_sample_value("searchrl_index_device_info", {"index": loaded.name, "device": "cpu"}) is None


def test_hnsw_stays_on_cpu(index_dirs, encoder) -> None:  # noqa: ANN001
    from searchrl.retriever.index.load import load_index

    assert not load_index(index_dirs["hnsw"], encoder=encoder, use_gpu=None).on_gpu


def test_encoder_uses_fp16_on_gpu() -> None:
    import torch

    from searchrl.retriever.embed import Encoder

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    enc = Encoder("all-minilm-l6-v2", device="cuda")
    assert next(enc.model.parameters()).dtype == torch.float16
    v = enc.encode_queries(["fp16 on gpu"])
    assert v.dtype == np.float32 and abs(float(np.linalg.norm(v)) - 1) < 1e-2
