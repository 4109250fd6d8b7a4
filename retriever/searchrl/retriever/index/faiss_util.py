"""FAISS helpers: index construction, thread and BLAS settings, GPU placement, device metrics, recall.

Index types (inner product on unit vectors = cosine):

* ``flat``: ``IndexFlatIP``, exact; ``4 d`` bytes per passage (Search-R1's ``e5_Flat.index``: 21M x 768 x 4 = 65 GB).
* ``hnsw``: ``IndexHNSWFlat`` (Malkov & Yashunin, arXiv 1603.09320) with ``METRIC_INNER_PRODUCT``; graph of ``M``
  neighbours per node; fast CPU search; the full vectors are kept, so memory is ``4 d + ~8 M`` bytes per passage.
* ``ivfpq``: ``IndexIVFPQ`` (Jegou et al., "Product quantization for nearest neighbor search", TPAMI 2011): a coarse
  k-means of ``nlist`` cells, residuals coded with ``m`` sub-quantizers of ``nbits`` bits; ``m nbits / 8 + 8`` bytes
  per passage (the 8 is the stored id), the option that fits 21M passages in a few GB.
* ``ivfpq_refine``: ``IndexRefine`` (FAISS's two-stage search): an IVF-PQ (optionally OPQ-rotated, with an HNSW
  coarse quantizer for tens of thousands of cells) proposes ``k_factor * k`` candidates, which are re-ranked with
  8-bit scalar-quantized (or float16 / float32) vectors. The re-ranking vectors stay in the index file and are
  memory-mapped when served (``IO_FLAG_MMAP_IFC``), so resident memory is the PQ codes (``m + 8`` bytes per passage)
  plus the centroids, while recall comes back to that of the re-ranking vectors (near exact for SQ8).

GPU (faiss-gpu present and ``faiss.get_num_gpus() > 0``): flat and IVF-PQ (also the IVF-PQ stage of
``ivfpq_refine``, whose re-ranking stays on the host's memory map: faiss-gpu has no ``IndexRefine``) are cloned to every GPU with
``index_cpu_to_all_gpus`` in float16 and sharded (``GpuMultipleClonerOptions.shard = True``), as Search-R1 does for
its flat index; HNSW has no GPU implementation and stays on CPU. Before cloning, IVF ``nprobe`` is clamped to
faiss-gpu's limit of 2048 (:data:`~searchrl.retriever.gpu.GPU_MAX_NPROBE`) and GPUs the installed faiss has no code
for are refused (:mod:`searchrl.retriever.gpu`). Each loaded index exports
``searchrl_index_device_info{index,device="gpu"|"cpu"} = 1`` and, for IVF, ``searchrl_index_nprobe{index}``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
from prometheus_client import Gauge

from searchrl.errors import InvalidRequest
from searchrl.retriever import gpu as gpu_checks
from searchrl.retriever.index.params import INDEX_TYPES, IndexParams

log = logging.getLogger("searchrl.retriever.index")

_BLAS_DEFAULT: int | None = None  # faiss's distance_compute_blas_threshold before we first changed it

INDEX_DEVICE = Gauge(
    "searchrl_index_device_info",
    "1 for the device each loaded index is served from: device=gpu (faiss-gpu clone) or cpu (no GPU, HNSW, "
    "--use-gpu=false, or a GPU clone that failed and fell back).",
    ["index", "device"],
)
INDEX_NPROBE = Gauge(
    "searchrl_index_nprobe",
    "IVF cells visited per query by each loaded IVF index, as searched (after the GPU clamp to 2048).",
    ["index"],
)


def record_index_device(name: str, on_gpu: bool) -> None:
    """Sets ``searchrl_index_device_info{index=name}``: 1 for the serving device, the other device's series removed."""
    device, other = ("gpu", "cpu") if on_gpu else ("cpu", "gpu")
    with contextlib.suppress(KeyError):
        INDEX_DEVICE.remove(name, other)
    INDEX_DEVICE.labels(name, device).set(1)


def load_faiss() -> Any:
    """The ``faiss`` module, imported on first use."""
    import faiss

    return faiss


def make_index(index_type: str, d: int, params: IndexParams) -> Any:
    """An empty (untrained for IVF-PQ) FAISS index of ``index_type`` for ``d``-dimensional inner-product search.

    Raises:
        InvalidRequest: unknown index type.
    """
    faiss = load_faiss()
    if index_type == "flat":
        return faiss.IndexFlatIP(d)
    if index_type == "hnsw":
        idx = faiss.IndexHNSWFlat(d, params.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = params.ef_construction
        idx.hnsw.efSearch = params.ef_search
        return idx
    if index_type == "ivfpq":
        quantizer = faiss.IndexFlatIP(d)
        idx = faiss.IndexIVFPQ(quantizer, d, params.nlist, params.pq_m, params.pq_nbits, faiss.METRIC_INNER_PRODUCT)
        idx.nprobe = params.nprobe  # faiss's Python layer keeps ``quantizer`` referenced by ``idx``
        return idx
    if index_type == "ivfpq_refine":
        idx = faiss.index_factory(d, params.factory(index_type), faiss.METRIC_INNER_PRODUCT)
        faiss.extract_index_ivf(idx).nprobe = params.nprobe
        idx.k_factor = float(params.k_factor)
        return idx
    raise InvalidRequest(f"unknown index type {index_type!r}: expected one of {', '.join(INDEX_TYPES)}")


def fit_training(index: Any, n_train: int, p: IndexParams) -> None:
    """Lets k-means run with fewer than 39 points per centroid on small corpora (instead of warning per centroid).

    ``index`` is an ``IndexIVFPQ`` or an index holding one (``IndexRefine``, ``IndexPreTransform``).
    """
    faiss = load_faiss()
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.cp.min_points_per_centroid = int(min(39, max(1, n_train // max(p.nlist, 1))))
    ivf.pq.cp.min_points_per_centroid = int(min(39, max(1, n_train // (1 << p.pq_nbits))))


def index_type_of(index: Any) -> str:
    """``"flat"``, ``"hnsw"``, ``"ivfpq"``, ``"ivfpq_refine"`` (or the FAISS class name, lower-cased) of a loaded CPU
    index."""
    faiss = load_faiss()
    if isinstance(index, faiss.IndexRefine):
        return "ivfpq_refine"
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    return type(index).__name__.lower()


def set_faiss_threads(n: int) -> None:
    """Sets FAISS's OpenMP thread count for the calling thread (``n <= 0``: leave the default, one per core).

    ``omp_set_num_threads`` changes the calling thread's setting only: call this in every thread that searches (the
    service does it in its search worker). On 2 cores, one OpenMP thread per search worker avoids OpenMP spin-waits competing with the encoder's torch
    threads; ``benchmarks/retrieval_bench.py`` measures 1 vs 2 on the machine at hand.
    """
    if n > 0:
        load_faiss().omp_set_num_threads(n)


def set_blas_min_batch(min_batch: int, d: int) -> int:
    """Makes FAISS switch from its SIMD scan to BLAS ``sgemm`` for exact search from ``min_batch`` queries on.

    FAISS's ``distance_compute_blas_threshold`` is compared with the query count ``nx`` in older releases (default 20)
    and with ``nx * d`` in recent ones (default 128,000, i.e. 333 queries at ``d = 384``); the unit is detected from
    the default value. Returns the value set.
    """
    global _BLAS_DEFAULT
    cv = load_faiss().cvar
    if _BLAS_DEFAULT is None:
        _BLAS_DEFAULT = int(cv.distance_compute_blas_threshold)
    value = int(min_batch) * (d if _BLAS_DEFAULT > 1000 else 1)
    cv.distance_compute_blas_threshold = value
    return value


def set_search_param(index: Any, name: str, value: int, on_gpu: bool) -> None:
    """Sets a FAISS search parameter (``nprobe``, ``efSearch``, ``k_factor``) where it applies to the index type.

    On an ``IndexRefine``, ``k_factor`` is its own and the others go to its first stage (which may be a GPU clone).
    """
    faiss = load_faiss()
    if isinstance(index, faiss.IndexRefine):
        if name == "k_factor":
            index.k_factor = float(value)
        else:
            set_search_param(faiss.downcast_index(index.base_index), name, value, on_gpu)
        return
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    with contextlib.suppress(RuntimeError):  # parameter does not apply to this index type
        space.set_index_parameter(index, name, value)


def ivf_of(index: Any) -> Any | None:
    """The ``IndexIVF`` inside a CPU index (itself, or under an ``IndexPreTransform``), else ``None``."""
    faiss = load_faiss()
    try:
        return faiss.try_extract_index_ivf(index)
    except (RuntimeError, TypeError):  # not a CPU index (a GPU clone)
        return None


def prepare_for_gpu(index: Any, name: str = "") -> int | None:
    """Makes a CPU index acceptable to faiss-gpu's cloner, in place; the step :func:`to_gpu` runs before cloning.

    An IVF index's ``nprobe`` above faiss-gpu's limit (``GPU_MAX_SELECTION_K`` = 2048, checked by ``validateNProbe``
    in ``GpuIndexIVF::copyFrom``) or above its ``nlist`` is clamped (:func:`~searchrl.retriever.gpu.clamp_nprobe`,
    which logs a warning with the original value).

    Returns:
        The original ``nprobe`` when it was changed (to restore it if the index stays on CPU), else ``None``.
    """
    ivf = ivf_of(index)
    if ivf is None:
        return None
    original = int(ivf.nprobe)
    clamped = gpu_checks.clamp_nprobe(original, int(ivf.nlist), name or "index")
    if clamped == original:
        return None
    ivf.nprobe = clamped
    return original


def to_gpu(index: Any, name: str = "") -> tuple[Any, bool]:
    """Clones ``index`` to all GPUs (float16, sharded) when faiss-gpu sees a GPU; returns ``(index, on_gpu)``.

    HNSW indexes, and hosts without GPUs, keep the CPU index. Of an ``IndexRefine`` only the first stage is cloned
    and a host-side ``IndexRefine`` over the clone and the (memory-mapped) re-ranking vectors is returned. Before cloning, :func:`prepare_for_gpu` clamps IVF
    ``nprobe`` to 2048. A clone that faiss rejects with an exception (e.g. IVF-PQ codes of other than 8 bits) keeps
    the CPU index, with its original ``nprobe``, and logs a warning.

    Raises:
        FailedPrecondition: a visible GPU has a compute capability the installed faiss has no code for
            (:func:`searchrl.retriever.gpu.check_faiss_gpu_code`); faiss would abort the process on its first
            kernel, so the load is refused instead.
    """
    faiss = load_faiss()
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if ngpu <= 0:
        return index, False
    if isinstance(index, faiss.IndexHNSW):
        log.info("HNSW has no FAISS GPU implementation; keeping it on CPU")
        return index, False
    if isinstance(index, faiss.IndexRefine):
        base, on_gpu = to_gpu(faiss.downcast_index(index.base_index), name)
        if not on_gpu:
            return index, False
        refined = faiss.IndexRefine(base, index.refine_index)
        refined.k_factor = index.k_factor
        refined.referenced_objects = [base, index]  # the wrapper owns neither; keep both alive with it
        return refined, True
    gpu_checks.check_faiss_gpu_code(gpu_checks.faiss_cuda_archs(), gpu_checks.cuda_devices())
    original_nprobe = prepare_for_gpu(index, name)
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = True  # float16 vectors (flat) / lookup tables (IVF-PQ): half the GPU memory
    co.shard = True  # split the vectors over the GPUs instead of replicating them
    if hasattr(co, "allowCpuCoarseQuantizer"):
        co.allowCpuCoarseQuantizer = True  # an HNSW coarse quantizer has no GPU clone: it assigns on the host
    try:
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=co)
    except RuntimeError as exc:  # e.g. IVF-PQ codes of other than 8 bits have no GPU kernel
        if original_nprobe is not None:
            ivf_of(index).nprobe = original_nprobe  # the CPU index has no nprobe limit
        log.warning("could not clone the index to GPU (%s); serving it from CPU", str(exc).splitlines()[0])
        return index, False
    log.info("index cloned to %d GPU(s), float16, sharded", ngpu)
    return gpu_index, True


def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray, k: int) -> float:
    """Mean over queries of ``|approx top-k ∩ exact top-k| / k`` (rows ``(n, >= k)``)."""
    if len(exact_rows) == 0:
        return 0.0
    hits = 0
    for a, e in zip(approx_rows[:, :k], exact_rows[:, :k], strict=True):
        hits += len(set(a.tolist()) & set(e.tolist()) - {-1})
    return hits / (k * len(exact_rows))
