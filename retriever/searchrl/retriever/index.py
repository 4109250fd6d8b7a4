"""FAISS index build and load: Flat, HNSW and IVF-PQ, resumable embedding shards, manifests, GPU placement.

An index directory holds::

    manifest.json      IndexManifest: embedding model, dimension, size, index type, corpus checksum, params, faiss
    index.faiss        the FAISS index (faiss.write_index)
    store/             the PassageStore (memory-mapped passages, see searchrl.retriever.corpus)
    model/             the query/passage encoder the index was built with (sentence-transformers ``save``); loading
                       uses it, offline, so a served index never needs the model hub or the build's model path
    embeddings/        shard_00000.npy ... (float32, unit-norm rows) + shards.json; a rerun skips finished shards

Index types (inner product on unit vectors = cosine):

* ``flat``: ``IndexFlatIP``, exact; ``4 d`` bytes per passage (Search-R1's ``e5_Flat.index``: 21M x 768 x 4 = 65 GB).
* ``hnsw``: ``IndexHNSWFlat`` (Malkov & Yashunin, arXiv 1603.09320) with ``METRIC_INNER_PRODUCT``; graph of ``M``
  neighbours per node; fast CPU search; the full vectors are kept, so memory is ``4 d + ~8 M`` bytes per passage.
* ``ivfpq``: ``IndexIVFPQ`` (Jegou et al., "Product quantization for nearest neighbor search", TPAMI 2011): a coarse
  k-means of ``nlist`` cells, residuals coded with ``m`` sub-quantizers of ``nbits`` bits; ``m nbits / 8 + 8`` bytes
  per passage (the 8 is the stored id), the option that fits 21M passages in a few GB.

GPU (faiss-gpu present and ``faiss.get_num_gpus() > 0``): flat and IVF-PQ are cloned to every GPU with
``index_cpu_to_all_gpus`` in float16 and sharded (``GpuMultipleClonerOptions.shard = True``), as Search-R1 does for
its flat index; HNSW has no GPU implementation and stays on CPU. Before cloning, IVF ``nprobe`` is clamped to
faiss-gpu's limit of 2048 (:data:`~searchrl.retriever.gpu.GPU_MAX_NPROBE`) and GPUs the installed faiss has no code
for are refused (:mod:`searchrl.retriever.gpu`). Each loaded index exports
``searchrl_index_device_info{index,device="gpu"|"cpu"} = 1`` and, for IVF, ``searchrl_index_nprobe{index}``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Gauge
from pydantic import BaseModel, ConfigDict

from searchrl.errors import FailedPrecondition, InvalidRequest
from searchrl.retriever import gpu as gpu_checks
from searchrl.retriever.corpus import PassageStore, iter_corpus, iter_jsonl
from searchrl.retriever.embed import Encoder, canonical_model_name, same_model

log = logging.getLogger("searchrl.retriever.index")

INDEX_TYPES = ("flat", "hnsw", "ivfpq")
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
ENCODER_DIR = "model"  # <index-dir>/model: the encoder saved by build_index
MANIFEST_FORMAT = 1
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


def _faiss() -> Any:
    import faiss

    return faiss


# --------------------------------------------------------------------------------------------------- parameters
@dataclass
class IndexParams:
    """Build and search parameters; 0 means "auto-size from the corpus" (see :meth:`resolved`).

    Attributes:
        hnsw_m: HNSW neighbours per node (``M``).
        ef_construction: HNSW candidate list size while building.
        ef_search: HNSW candidate list size while searching (recall/speed knob).
        nlist: IVF cells; auto: ``min(4 sqrt(n), n / 39)`` so k-means has >= 39 points per centroid.
        pq_m: PQ sub-quantizers (bytes per code at 8 bits); must divide ``d``; auto: the largest divisor of ``d`` up
            to ``min(d / 4, 96)`` (96 for MiniLM's 384 and e5-base's 768 dimensions).
        pq_nbits: bits per sub-quantizer code; auto: 8, fewer for corpora too small to train 256 centroids.
        nprobe: IVF cells visited per query; auto: ``max(8, nlist / 8)``, at most ``nlist``.
        train_size: vectors used to train IVF-PQ; auto: all up to 262,144.
    """

    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int = 0
    nprobe: int = 0
    train_size: int = 0

    def resolved(self, n: int, d: int) -> IndexParams:
        """A copy with every auto (0) field sized for ``n`` vectors of dimension ``d``."""
        p = IndexParams(**asdict(self))
        if p.nlist <= 0:
            p.nlist = max(1, min(65536, int(round(4 * math.sqrt(max(n, 1)))), n // 39))
        if p.pq_m <= 0:
            # d/4 sub-quantizers (4 dims each) keep recall@10 near 0.8 on MiniLM (d/8: 0.65, see retrieval_bench);
            # at most 96 bytes per code, the largest code FAISS's GPU IVF-PQ kernels take
            target = max(1, min(d // 4, 96))
            p.pq_m = max(m for m in range(1, target + 1) if d % m == 0)
        if d % p.pq_m:
            raise InvalidRequest(f"pq_m={p.pq_m} must divide the embedding dimension {d}")
        if p.pq_nbits <= 0:
            # 2**nbits centroids per sub-quantizer want >= 39 training points each (FAISS's k-means guideline)
            p.pq_nbits = int(min(8, max(4, math.floor(math.log2(max(n, 1) / 39)) if n >= 39 else 4)))
        if p.nprobe <= 0:
            p.nprobe = min(p.nlist, max(8, p.nlist // 8))
        if p.train_size <= 0:
            p.train_size = min(n, 262_144)
        return p


class IndexManifest(BaseModel):
    """``manifest.json`` of an index directory."""

    model_config = ConfigDict(extra="allow")

    format: int = MANIFEST_FORMAT
    embedding_model: str
    dimension: int
    size: int
    index_type: str
    corpus_checksum: str
    corpus: str = ""
    build_params: dict[str, Any] = {}
    faiss_version: str = ""
    created_at: str = ""
    index_file: str = INDEX_FILE
    build_seconds: float = 0.0
    encoder_dir: str = ""  # "model" when the encoder is stored in the index directory (empty: load by name)
    embedding_model_source: str = ""  # the --model the build was given (hub name or path)


def read_manifest(index_dir: str | Path) -> IndexManifest:
    """Reads ``index_dir/manifest.json``.

    Raises:
        FailedPrecondition: missing or unreadable manifest.
    """
    path = Path(index_dir) / MANIFEST_FILE
    if not path.exists():
        raise FailedPrecondition(
            f"no {MANIFEST_FILE} in {index_dir}: build one with 'searchrl index build', or serve a raw Search-R1 "
            "index with --index-path/--corpus-path/--embedding-model"
        )
    try:
        return IndexManifest.model_validate_json(path.read_text())
    except Exception as exc:  # noqa: BLE001 - pydantic/JSON errors: report as a precondition
        raise FailedPrecondition(f"{path} is not a valid manifest: {str(exc).splitlines()[0]}") from None


# --------------------------------------------------------------------------------------------------- faiss helpers
def make_index(index_type: str, d: int, params: IndexParams) -> Any:
    """An empty (untrained for IVF-PQ) FAISS index of ``index_type`` for ``d``-dimensional inner-product search.

    Raises:
        InvalidRequest: unknown index type.
    """
    faiss = _faiss()
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
    raise InvalidRequest(f"unknown index type {index_type!r}: expected one of {', '.join(INDEX_TYPES)}")


def _fit_training(index: Any, n_train: int, p: IndexParams) -> None:
    """Lets k-means run with fewer than 39 points per centroid on small corpora (instead of warning per centroid)."""
    index.cp.min_points_per_centroid = int(min(39, max(1, n_train // max(p.nlist, 1))))
    index.pq.cp.min_points_per_centroid = int(min(39, max(1, n_train // (1 << p.pq_nbits))))


def index_type_of(index: Any) -> str:
    """``"flat"``, ``"hnsw"``, ``"ivfpq"`` (or the FAISS class name, lower-cased) of a loaded CPU index."""
    faiss = _faiss()
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
        _faiss().omp_set_num_threads(n)


def set_blas_min_batch(min_batch: int, d: int) -> int:
    """Makes FAISS switch from its SIMD scan to BLAS ``sgemm`` for exact search from ``min_batch`` queries on.

    FAISS's ``distance_compute_blas_threshold`` is compared with the query count ``nx`` in older releases (default 20)
    and with ``nx * d`` in recent ones (default 128,000, i.e. 333 queries at ``d = 384``); the unit is detected from
    the default value. Returns the value set.
    """
    global _BLAS_DEFAULT
    cv = _faiss().cvar
    if _BLAS_DEFAULT is None:
        _BLAS_DEFAULT = int(cv.distance_compute_blas_threshold)
    value = int(min_batch) * (d if _BLAS_DEFAULT > 1000 else 1)
    cv.distance_compute_blas_threshold = value
    return value


def _set_search_param(index: Any, name: str, value: int, on_gpu: bool) -> None:
    faiss = _faiss()
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    with contextlib.suppress(RuntimeError):  # parameter does not apply to this index type
        space.set_index_parameter(index, name, value)


def _ivf_of(index: Any) -> Any | None:
    """The ``IndexIVF`` inside a CPU index (itself, or under an ``IndexPreTransform``), else ``None``."""
    faiss = _faiss()
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
    ivf = _ivf_of(index)
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

    HNSW indexes, and hosts without GPUs, keep the CPU index. Before cloning, :func:`prepare_for_gpu` clamps IVF
    ``nprobe`` to 2048. A clone that faiss rejects with an exception (e.g. IVF-PQ codes of other than 8 bits) keeps
    the CPU index, with its original ``nprobe``, and logs a warning.

    Raises:
        FailedPrecondition: a visible GPU has a compute capability the installed faiss has no code for
            (:func:`searchrl.retriever.gpu.check_faiss_gpu_code`); faiss would abort the process on its first
            kernel, so the load is refused instead.
    """
    faiss = _faiss()
    ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if ngpu <= 0:
        return index, False
    if isinstance(index, faiss.IndexHNSW):
        log.info("HNSW has no FAISS GPU implementation; keeping it on CPU")
        return index, False
    gpu_checks.check_faiss_gpu_code(gpu_checks.faiss_cuda_archs(), gpu_checks.cuda_devices())
    original_nprobe = prepare_for_gpu(index, name)
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = True  # float16 vectors (flat) / lookup tables (IVF-PQ): half the GPU memory
    co.shard = True  # split the vectors over the GPUs instead of replicating them
    try:
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=co)
    except RuntimeError as exc:  # e.g. IVF-PQ codes of other than 8 bits have no GPU kernel
        if original_nprobe is not None:
            _ivf_of(index).nprobe = original_nprobe  # the CPU index has no nprobe limit
        log.warning("could not clone the index to GPU (%s); serving it from CPU", str(exc).splitlines()[0])
        return index, False
    log.info("index cloned to %d GPU(s), float16, sharded", ngpu)
    return gpu_index, True


def serialized_bytes(index: Any) -> int:
    """Size in bytes of the index as ``faiss.serialize_index`` writes it (close to its RAM footprint)."""
    return int(_faiss().serialize_index(index).nbytes)


# --------------------------------------------------------------------------------------------------- embeddings
@dataclass
class ShardSet:
    """Embedding shards of one corpus under one model: ``shard_{i:05d}.npy``, rows ``[i s, (i+1) s)``."""

    folder: Path
    size: int
    shard_size: int
    dimension: int

    @property
    def num_shards(self) -> int:
        return (self.size + self.shard_size - 1) // self.shard_size

    def shard_path(self, i: int) -> Path:
        return self.folder / f"shard_{i:05d}.npy"

    def shard_rows(self, i: int) -> int:
        return min(self.shard_size, self.size - i * self.shard_size)

    def is_done(self, i: int) -> bool:
        p = self.shard_path(i)
        if not p.exists():
            return False
        try:
            arr = np.load(p, mmap_mode="r")
        except (ValueError, OSError):
            return False
        return arr.shape == (self.shard_rows(i), self.dimension) and arr.dtype == np.float32

    def load(self, i: int) -> np.ndarray:
        return np.load(self.shard_path(i))

    def iter_all(self) -> Iterator[np.ndarray]:
        for i in range(self.num_shards):
            yield self.load(i)

    def all(self) -> np.ndarray:
        """Every embedding, ``(size, dimension)`` float32."""
        if self.size == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return np.concatenate(list(self.iter_all()))


def _open_shards(
    folder: Path, model: str, checksum: str, size: int, shard_size: int, dimension: int, encoding: str = ""
) -> ShardSet:
    """Validates (or starts) a shard folder; shards of another model/corpus/shard size/encoding are discarded."""
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "shards.json"
    want = {
        "embedding_model": model,
        "corpus_checksum": checksum,
        "size": size,
        "shard_size": shard_size,
        "dimension": dimension,
        "encoding": encoding,
    }
    if meta_path.exists():
        try:
            have = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            have = {}
        if have != want:
            log.warning("embedding shards in %s belong to another corpus/model/shard size; recomputing", folder)
            for p in folder.glob("shard_*.npy"):
                p.unlink()
    meta_path.write_text(json.dumps(want, indent=2))
    return ShardSet(folder, size, shard_size, dimension)


def embed_store(
    store: PassageStore,
    encoder: Encoder,
    folder: Path,
    shard_size: int = 4096,
    batch_size: int = 64,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
) -> tuple[ShardSet, int, int]:
    """Embeds every passage of ``store`` into shard files, skipping shards already on disk.

    Each shard is written to a temporary file and renamed, so an interrupted run leaves only whole shards.

    Args:
        store: the passages.
        encoder: passage encoder.
        folder: shard folder.
        shard_size: passages per shard.
        batch_size: encoder batch size.
        progress: rich progress bar.
        on_shard: called with the shard number after each shard is written (hook for tests and progress).

    Returns:
        ``(shards, computed, skipped)``: the shard set and how many shards were computed / found finished.
    """
    encoding = f"prefix={encoder.prefixes.passage!r};max_seq_length={encoder.model.max_seq_length};text=title\\ntext"
    shards = _open_shards(folder, encoder.name, store.checksum, store.size, shard_size, encoder.dimension, encoding)
    todo = [i for i in range(shards.num_shards) if not shards.is_done(i)]
    skipped = shards.num_shards - len(todo)
    bar_ctx: Any = contextlib.nullcontext(None)
    if progress and todo:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar_ctx = Progress(
            TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=False
        )
    with bar_ctx as bar:
        task = (
            bar.add_task("embed", total=store.size, completed=store.size - sum(shards.shard_rows(i) for i in todo))
            if bar
            else None
        )
        for i in todo:
            start = i * shard_size
            rows = range(start, start + shards.shard_rows(i))
            texts = store.texts_for_embedding(rows)
            emb = np.zeros((0, encoder.dimension), dtype=np.float32)
            parts = []
            step = max(batch_size * 4, 256)
            for j in range(0, len(texts), step):
                parts.append(encoder.encode_passages(texts[j : j + step], batch_size=batch_size))
                if bar is not None:
                    bar.advance(task, len(parts[-1]))
            emb = np.concatenate(parts) if parts else emb
            tmp = shards.shard_path(i).with_suffix(".tmp.npy")
            np.save(tmp, emb.astype(np.float32, copy=False))
            os.replace(tmp, shards.shard_path(i))
            if on_shard is not None:
                on_shard(i)
    return shards, len(todo), skipped


def build_from_shards(shards: ShardSet, index_type: str, params: IndexParams, seed: int = 1234) -> Any:
    """A FAISS index over every vector of ``shards`` (IVF-PQ is trained on a random sample first)."""
    p = params.resolved(shards.size, shards.dimension)
    index = make_index(index_type, shards.dimension, p)
    if index_type == "ivfpq":
        rng = np.random.default_rng(seed)
        n_train = min(p.train_size, shards.size)
        pick = np.sort(rng.choice(shards.size, size=n_train, replace=False))
        train = np.empty((n_train, shards.dimension), dtype=np.float32)
        filled = 0
        for i in range(shards.num_shards):
            lo, hi = i * shards.shard_size, i * shards.shard_size + shards.shard_rows(i)
            sel = pick[(pick >= lo) & (pick < hi)] - lo
            if len(sel):
                train[filled : filled + len(sel)] = np.load(shards.shard_path(i), mmap_mode="r")[sel]
                filled += len(sel)
        _fit_training(index, n_train, p)
        index.train(train)
    for arr in shards.iter_all():
        index.add(arr)
    return index


# --------------------------------------------------------------------------------------------------- build
@dataclass
class BuildReport:
    """What :func:`build_index` did."""

    index_dir: Path
    manifest: IndexManifest
    shards_computed: int
    shards_skipped: int
    seconds: float
    index_bytes: int = 0
    notes: list[str] = field(default_factory=list)


def _store_matches(store_dir: Path, source: str, limit: int | None) -> bool:
    meta_path = store_dir / "store.json"
    if not meta_path.exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
        PassageStore.open(store_dir).close()
    except (ValueError, OSError, json.JSONDecodeError, KeyError):
        return False
    return meta.get("source") == source and meta.get("limit") == limit


def _write_store(store_dir: Path, corpus: str, limit: int | None, progress: bool) -> PassageStore:
    source = _source_id(corpus)
    if _store_matches(store_dir, source, limit):
        return PassageStore.open(store_dir)
    store = PassageStore.write(store_dir, iter_corpus(corpus, limit), progress=progress)
    meta = dict(store.meta, source=source, limit=limit)
    (store_dir / "store.json").write_text(json.dumps(meta, indent=2))
    store.meta = meta
    return store


def _source_id(corpus: str) -> str:
    """Identifies a corpus file version (path, size, mtime) so a changed file invalidates cached stores."""
    if corpus == "wiki":
        from searchrl.assets import wiki_summaries_path

        p = wiki_summaries_path()
        return f"wiki:{p.stat().st_size}"
    p = Path(corpus).resolve()
    if not p.is_file():
        raise InvalidRequest(f"corpus file not found: {corpus}")
    st = p.stat()
    return f"{p}:{st.st_size}:{int(st.st_mtime)}"


def build_index(
    corpus: str,
    out_dir: str | Path,
    model: str = "all-minilm-l6-v2",
    index_type: str = "flat",
    limit: int | None = None,
    params: IndexParams | None = None,
    shard_size: int = 4096,
    batch_size: int = 64,
    embeddings_dir: str | Path | None = None,
    encoder: Encoder | None = None,
    progress: bool = True,
    on_shard: Callable[[int], None] | None = None,
    torch_threads: int = 0,
    allow_download: bool = False,
) -> BuildReport:
    """Builds an index directory from a corpus; rerunning resumes (finished shards and the store are reused).

    The encoder is saved into ``out_dir/model`` (sentence-transformers ``save``, float32) and recorded in the
    manifest (``encoder_dir``), so that serving the directory needs neither the model hub nor ``model``'s path.

    Args:
        corpus: ``"wiki"``, a FlashRAG jsonl or a parquet path (see :func:`searchrl.retriever.corpus.iter_corpus`).
        out_dir: the index directory to write.
        model: embedding model name or path.
        index_type: ``flat``, ``hnsw`` or ``ivfpq``.
        limit: use only the first ``limit`` passages.
        params: index parameters (auto-sized when omitted).
        shard_size: passages per embedding shard.
        batch_size: encoder batch size.
        embeddings_dir: shard folder (default ``out_dir/embeddings``); several index types of one corpus can share it.
        encoder: an already loaded encoder (must be ``model``).
        progress: progress bars.
        on_shard: callback after each embedding shard (see :func:`embed_store`).
        torch_threads: torch intra-op threads (``<= 0``: torch's default).
        allow_download: let sentence-transformers download ``model`` from the Hugging Face Hub when it is not in the
            local cache (``--allow-download``); off: offline, as the services run.

    Returns:
        A :class:`BuildReport`.

    Raises:
        InvalidRequest: unknown index type or corpus, bad parameters, empty corpus.
        FailedPrecondition: the model cannot be loaded (offline and not cached: the message names
            ``--allow-download``).
    """
    if index_type not in INDEX_TYPES:
        raise InvalidRequest(f"unknown index type {index_type!r}: expected one of {', '.join(INDEX_TYPES)}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = _write_store(out / "store", corpus, limit, progress)
    if store.size == 0:
        raise InvalidRequest(f"corpus {corpus!r} has no passages")
    if encoder is None:
        encoder = Encoder(model, torch_threads=torch_threads, allow_download=allow_download)
    elif not same_model(encoder.name, model):
        raise InvalidRequest(f"encoder {encoder.name!r} is not the requested model {model!r}")
    emb_dir = Path(embeddings_dir) if embeddings_dir else out / "embeddings"
    shards, computed, skipped = embed_store(store, encoder, emb_dir, shard_size, batch_size, progress, on_shard)
    p = (params or IndexParams()).resolved(store.size, encoder.dimension)
    index = build_from_shards(shards, index_type, p)
    faiss = _faiss()
    tmp = out / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / INDEX_FILE)
    encoder.save(out / ENCODER_DIR)
    seconds = time.perf_counter() - t0
    manifest = IndexManifest(
        embedding_model=encoder.name,
        dimension=encoder.dimension,
        size=store.size,
        index_type=index_type,
        corpus_checksum=store.checksum,
        corpus=str(corpus) if corpus == "wiki" else str(Path(corpus).resolve()),
        build_params={
            **asdict(p),
            "limit": limit,
            "shard_size": shard_size,
            "query_prefix": encoder.prefixes.query,
            "passage_prefix": encoder.prefixes.passage,
        },
        faiss_version=faiss.__version__,
        created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        build_seconds=round(seconds, 2),
        encoder_dir=ENCODER_DIR,
        embedding_model_source=str(model),
    )
    (out / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    store.close()
    return BuildReport(out, manifest, computed, skipped, seconds, index_bytes=os.path.getsize(out / INDEX_FILE))


# --------------------------------------------------------------------------------------------------- load / search
class LoadedIndex:
    """A searchable index: FAISS index + passage store + query encoder.

    Build with :func:`load_index` or :func:`load_raw_index`. :meth:`search` is thread-safe for concurrent readers
    on CPU (FAISS search is const), but the service calls it from one worker thread anyway.

    Attributes:
        index: the FAISS index (a GPU clone when ``on_gpu``).
        store: the passages, row ``i`` = FAISS id ``i``.
        encoder: the query encoder.
        manifest: the manifest (synthesised for raw Search-R1 indexes).
        on_gpu: whether the index lives on GPU.
        name: the index's label in metrics and logs (the index directory's or raw index file's name).
        nlist: IVF cells (0 for other index types).
        nprobe: IVF cells visited per query, as searched (0 for other index types).
    """

    def __init__(
        self,
        index: Any,
        store: PassageStore,
        encoder: Encoder,
        manifest: IndexManifest,
        on_gpu: bool,
        params: IndexParams,
        name: str = "index",
        nlist: int = 0,
        nprobe: int = 0,
    ) -> None:
        self.index = index
        self.store = store
        self.encoder = encoder
        self.manifest = manifest
        self.on_gpu = on_gpu
        self.params = params
        self.name = name
        self.nlist = nlist
        self.nprobe = nprobe
        self.dimension = int(index.d)
        self.size = int(index.ntotal)

    @property
    def version(self) -> str:
        """Cache version: the corpus checksum, model and index type (a rebuilt index never serves stale entries)."""
        return f"{self.manifest.corpus_checksum[:16]}:{self.manifest.embedding_model}:{self.manifest.index_type}"

    def set_search_params(self, nprobe: int = 0, ef_search: int = 0) -> None:
        """Sets IVF ``nprobe`` / HNSW ``efSearch`` (0 keeps the current value).

        On a GPU index ``nprobe`` is clamped to 2048 and to ``nlist`` first
        (:func:`~searchrl.retriever.gpu.clamp_nprobe`, warning logged): faiss-gpu's ``GpuParameterSpace`` stores any
        value, and every later search would then throw in ``validateNProbe`` (or abort past ``nlist``).
        """
        if nprobe > 0:
            if self.on_gpu:
                nprobe = gpu_checks.clamp_nprobe(nprobe, self.nlist, self.name)
            _set_search_param(self.index, "nprobe", nprobe, self.on_gpu)
            if self.nlist > 0:
                self.nprobe = nprobe
                INDEX_NPROBE.labels(self.name).set(nprobe)
        if ef_search > 0:
            _set_search_param(self.index, "efSearch", ef_search, self.on_gpu)

    def search_vectors(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows for query vectors.

        Args:
            vectors: float32 ``(n, d)``.
            k: results per query (capped at the index size).

        Returns:
            ``(scores, rows)``, both ``(n, min(k, size))``; scores are inner products (higher is better); rows are
            ``-1`` where fewer than ``k`` results exist (approximate indexes).
        """
        k = max(1, min(int(k), self.size))
        scores, rows = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return scores, rows

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Encodes ``queries`` and returns :meth:`search_vectors` of them."""
        return self.search_vectors(self.encoder.encode_queries(queries), k)

    def close(self) -> None:
        """Releases the passage store mapping."""
        self.store.close()


def _read_faiss(path: Path, mmap: bool) -> Any:
    faiss = _faiss()
    if not path.exists():
        raise FailedPrecondition(f"index file {path} does not exist")
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        return faiss.read_index(str(path), flags)
    except RuntimeError as exc:
        first = next(
            (ln.strip() for ln in str(exc).splitlines() if ln.strip().startswith("Error")),
            str(exc).splitlines()[0] if str(exc) else "",
        )
        raise FailedPrecondition(
            f"index file {path} is not a readable FAISS index (corrupt or truncated): {first}"
        ) from None


def _check_dimension(index: Any, encoder: Encoder, where: str) -> None:
    if int(index.d) != encoder.dimension:
        raise FailedPrecondition(
            f"{where}: index dimension {index.d} does not match embedding model {encoder.name!r} (dimension {encoder.dimension})"
        )


def load_index(
    index_dir: str | Path,
    embedding_model: str = "",
    encoder: Encoder | None = None,
    use_gpu: bool | None = None,
    nprobe: int = 0,
    ef_search: int = 0,
    mmap: bool = False,
    torch_threads: int = 0,
    query_dtype: str = "auto",
    encode_workers: int = 1,
) -> LoadedIndex:
    """Loads an index directory written by :func:`build_index`, checking it against its manifest and the model.

    Args:
        index_dir: the directory.
        embedding_model: expected model (empty: the manifest's). A different name is an error, not a silent switch.
        encoder: an already loaded encoder to reuse.
        use_gpu: ``None`` = GPU when available, ``False`` = CPU.
        nprobe: IVF cells per query (0: the manifest's build-time value).
        ef_search: HNSW ``efSearch`` (0: the manifest's value).
        mmap: map the index file instead of reading it (flat/IVF; saves RAM when several processes share a host).
        torch_threads: torch intra-op threads for the encoder.
        query_dtype: query encoding dtype of a new encoder (:func:`~searchrl.retriever.embed.resolve_query_dtype`).
        encode_workers: threads a new encoder may split a query batch over (``<= 0``: one per core).

    Raises:
        FailedPrecondition: missing/invalid manifest, corrupt index file, model name differs from the manifest,
            dimension or size mismatch, corpus checksum mismatch.
    """
    d = Path(index_dir)
    manifest = read_manifest(d)
    if embedding_model and not same_model(embedding_model, manifest.embedding_model):
        raise FailedPrecondition(
            f"{d}: index was built with embedding model {manifest.embedding_model!r}, but {embedding_model!r} was requested"
        )
    try:
        store = PassageStore.open(d / "store")
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"{d}: passage store unusable: {exc}") from None
    if store.checksum != manifest.corpus_checksum:
        raise FailedPrecondition(
            f"{d}: passage store checksum {store.checksum[:12]} differs from the manifest's {manifest.corpus_checksum[:12]}"
        )
    index = _read_faiss(d / manifest.index_file, mmap)
    if int(index.d) != manifest.dimension:
        raise FailedPrecondition(f"{d}: index dimension {index.d} differs from the manifest's {manifest.dimension}")
    if int(index.ntotal) != store.size or store.size != manifest.size:
        raise FailedPrecondition(f"{d}: index has {index.ntotal} vectors, store {store.size}, manifest {manifest.size}")
    if encoder is None:
        stored = stored_encoder_dir(d, manifest)
        encoder = Encoder(
            manifest.embedding_model if stored else embedding_model or manifest.embedding_model,
            model_path=str(stored) if stored else None,
            torch_threads=torch_threads,
            query_dtype=query_dtype,
            encode_workers=encode_workers,
        )
    elif not same_model(encoder.name, manifest.embedding_model):
        raise FailedPrecondition(f"{d}: index was built with {manifest.embedding_model!r}, encoder is {encoder.name!r}")
    _check_dimension(index, encoder, str(d))
    params = IndexParams(**{k: v for k, v in manifest.build_params.items() if k in IndexParams.__dataclass_fields__})
    return _finish_load(
        index,
        store,
        encoder,
        manifest,
        use_gpu,
        nprobe or params.nprobe,
        ef_search or params.ef_search,
        params,
        name=d.resolve().name,
    )


def stored_encoder_dir(index_dir: str | Path, manifest: IndexManifest | None = None) -> Path | None:
    """``<index_dir>/model`` (or the manifest's ``encoder_dir``) when it holds a sentence-transformers model, else
    ``None`` (indexes built before the encoder was stored: the model is loaded by name)."""
    d = Path(index_dir) / ((manifest.encoder_dir if manifest else "") or ENCODER_DIR)
    return d if (d / "modules.json").is_file() else None


def _finish_load(
    index: Any,
    store: PassageStore,
    encoder: Encoder,
    manifest: IndexManifest,
    use_gpu: bool | None,
    nprobe: int,
    ef_search: int,
    params: IndexParams,
    name: str,
) -> LoadedIndex:
    cpu_index = index  # keeps the CPU index (and ``cpu_ivf``, a non-owning view of it) alive in this function
    cpu_ivf = _ivf_of(cpu_index)
    on_gpu = False
    if use_gpu is not False:
        index, on_gpu = to_gpu(cpu_index, name)  # clamps cpu_ivf.nprobe before cloning (restored if it stays on CPU)
    nlist = int(cpu_ivf.nlist) if cpu_ivf is not None else 0
    current = int(cpu_ivf.nprobe) if cpu_ivf is not None else 0
    loaded = LoadedIndex(index, store, encoder, manifest, on_gpu, params, name=name, nlist=nlist, nprobe=current)
    record_index_device(name, on_gpu)
    if nlist > 0:
        INDEX_NPROBE.labels(name).set(current)
    loaded.set_search_params(nprobe, ef_search)
    return loaded


def store_for_jsonl(corpus_path: str | Path, progress: bool = True) -> PassageStore:
    """A passage store for a FlashRAG/Search-R1 jsonl corpus, built once and cached under ``cache_dir()/stores``.

    The cache key is the file's path, size and mtime, so editing the corpus rebuilds the store.
    """
    import hashlib

    from searchrl.assets import cache_dir

    source = _source_id(str(corpus_path))
    key = hashlib.sha256(source.encode()).hexdigest()[:16]
    target = cache_dir() / "stores" / f"{Path(corpus_path).stem}-{key}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_suffix(".lock")):
        if _store_matches(target, source, None):
            return PassageStore.open(target)
        store = PassageStore.write(target, iter_jsonl(corpus_path), progress=progress)
        meta = dict(store.meta, source=source, limit=None)
        (target / "store.json").write_text(json.dumps(meta, indent=2))
        store.meta = meta
        return store


def load_raw_index(
    index_path: str | Path,
    corpus_path: str | Path,
    embedding_model: str,
    encoder: Encoder | None = None,
    use_gpu: bool | None = None,
    nprobe: int = 0,
    ef_search: int = 0,
    mmap: bool = False,
    torch_threads: int = 0,
    query_dtype: str = "auto",
    encode_workers: int = 1,
) -> LoadedIndex:
    """Loads an existing Search-R1/FlashRAG index unchanged: a raw FAISS file, its jsonl corpus and the model name.

    Row ``i`` of the corpus jsonl is FAISS id ``i`` (as in Search-R1's ``retrieval_server.py``). No manifest is needed;
    one is synthesised from the files.

    Raises:
        FailedPrecondition: unreadable index, corpus size differs from the index size, dimension mismatch.
    """
    if not embedding_model:
        raise FailedPrecondition(
            "a raw index needs --embedding-model (e.g. intfloat/e5-base-v2 for Search-R1's e5_Flat.index)"
        )
    index = _read_faiss(Path(index_path), mmap)
    if not Path(corpus_path).exists():
        raise FailedPrecondition(f"corpus file {corpus_path} does not exist")
    try:
        store = store_for_jsonl(corpus_path)
    except InvalidRequest as exc:
        raise FailedPrecondition(str(exc)) from None
    if int(index.ntotal) != store.size:
        raise FailedPrecondition(
            f"{index_path} holds {index.ntotal} vectors but {corpus_path} has {store.size} passages"
        )
    if encoder is None:
        encoder = Encoder(
            embedding_model, torch_threads=torch_threads, query_dtype=query_dtype, encode_workers=encode_workers
        )
    _check_dimension(index, encoder, str(index_path))
    manifest = IndexManifest(
        embedding_model=canonical_model_name(embedding_model),
        dimension=int(index.d),
        size=int(index.ntotal),
        index_type=index_type_of(index),
        corpus_checksum=store.checksum,
        corpus=str(Path(corpus_path).resolve()),
        faiss_version=_faiss().__version__,
        index_file=str(Path(index_path).resolve()),
    )
    return _finish_load(
        index, store, encoder, manifest, use_gpu, nprobe, ef_search, IndexParams(), name=Path(index_path).name
    )


# --------------------------------------------------------------------------------------------------- recall, memory
def recall_at_k(approx_rows: np.ndarray, exact_rows: np.ndarray, k: int) -> float:
    """Mean over queries of ``|approx top-k ∩ exact top-k| / k`` (rows ``(n, >= k)``)."""
    if len(exact_rows) == 0:
        return 0.0
    hits = 0
    for a, e in zip(approx_rows[:, :k], exact_rows[:, :k], strict=True):
        hits += len(set(a.tolist()) & set(e.tolist()) - {-1})
    return hits / (k * len(exact_rows))


@dataclass
class MemoryEstimate:
    """Index memory of one type, measured on ``n`` vectors and extrapolated.

    Attributes:
        index_type: ``flat``/``hnsw``/``ivfpq``.
        n: vectors measured.
        total_bytes: serialized size at ``n``.
        bytes_per_vector: marginal bytes per added vector (slope between ``n/2`` and ``n``).
        fixed_bytes: the size-independent part at ``n`` (IVF centroids, PQ codebooks).
    """

    index_type: str
    n: int
    dimension: int
    total_bytes: int
    bytes_per_vector: float
    fixed_bytes: float

    def bytes_at(self, n_total: int, params: IndexParams | None = None) -> float:
        """Extrapolated bytes for ``n_total`` vectors; IVF-PQ's centroids are re-sized to its auto ``nlist``."""
        fixed = self.fixed_bytes
        if self.index_type == "ivfpq":
            p = (params or IndexParams()).resolved(n_total, self.dimension)
            fixed = 4 * self.dimension * p.nlist + 4 * self.dimension * (1 << p.pq_nbits) + 8 * p.nlist
        return fixed + self.bytes_per_vector * n_total


def measure_index_memory(vectors: np.ndarray, index_type: str, params: IndexParams | None = None) -> MemoryEstimate:
    """Builds ``index_type`` on all of ``vectors`` and on half of them and reports the serialized sizes.

    The marginal cost per vector comes from the two sizes, so fixed parts (IVF centroids, PQ codebooks) are not
    spread over the vectors; train-time parameters are the same for both builds.
    """
    n, d = vectors.shape
    p = (params or IndexParams()).resolved(n, d)
    sizes = []
    for m in (n // 2, n):
        idx = make_index(index_type, d, p)
        if index_type == "ivfpq":
            _fit_training(idx, min(n, p.train_size), p)
            idx.train(vectors[: min(n, p.train_size)])
        idx.add(vectors[:m])
        sizes.append(serialized_bytes(idx))
    per = (sizes[1] - sizes[0]) / (n - n // 2)
    return MemoryEstimate(index_type, n, d, sizes[1], per, sizes[1] - per * n)


# --------------------------------------------------------------------------------------------------- cached wiki
@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def wiki_index_dir(index_type: str = "flat", model: str = "all-minilm-l6-v2") -> Path:
    """Where :func:`ensure_wiki_index` keeps the index: ``cache_dir()/indexes/wiki-<model>-<type>``."""
    from searchrl.assets import cache_dir

    return cache_dir() / "indexes" / f"wiki-{canonical_model_name(model).replace('/', '--')}-{index_type}"


def ensure_wiki_index(
    index_type: str = "flat", model: str = "all-minilm-l6-v2", progress: bool = True, encoder: Encoder | None = None
) -> Path:
    """The index of the 10,033 bundled Wikipedia summaries, built on first use and cached (process-safe lock).

    Index types share one set of embedding shards (``cache_dir()/indexes/wiki-<model>-embeddings``), so the second
    type costs only the FAISS build.

    Returns:
        The index directory (pass it to ``searchrl serve retriever --index-dir``).
    """
    target = wiki_index_dir(index_type, model)
    with _file_lock(target.with_suffix(".lock")):
        if (target / MANIFEST_FILE).exists() and (target / INDEX_FILE).exists():
            try:
                m = read_manifest(target)
                if m.index_type == index_type and same_model(m.embedding_model, model):
                    return target
            except FailedPrecondition:
                pass
        emb = target.parent / f"wiki-{canonical_model_name(model).replace('/', '--')}-embeddings"
        build_index(
            "wiki", target, model=model, index_type=index_type, embeddings_dir=emb, encoder=encoder, progress=progress
        )
    return target
