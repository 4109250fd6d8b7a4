"""Loading an index for search: an index directory (manifest checked) or a raw Search-R1/FlashRAG FAISS file."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from searchrl.errors import FailedPrecondition, InvalidRequest
from searchrl.retriever import gpu as gpu_checks
from searchrl.retriever.corpus import PassageStore
from searchrl.retriever.embed import Encoder, canonical_model_name, same_model
from searchrl.retriever.index.build import store_for_jsonl
from searchrl.retriever.index.faiss_util import (
    INDEX_NPROBE,
    index_type_of,
    ivf_of,
    load_faiss,
    record_index_device,
    set_search_param,
    to_gpu,
)
from searchrl.retriever.index.params import IndexManifest, IndexParams, read_manifest, stored_encoder_dir


@dataclass(frozen=True)
class LoadOptions:
    """How :func:`load_index` and :func:`load_raw_index` load an index for serving.

    Attributes:
        encoder: an already loaded query encoder to reuse (``None``: load one).
        use_gpu: ``None`` = GPU when available, ``False`` = CPU.
        nprobe: IVF cells per query (0: the manifest's build-time value; FAISS's stored value for a raw index).
        ef_search: HNSW ``efSearch`` (0: the manifest's value; FAISS's stored value for a raw index).
        k_factor: ``ivfpq_refine`` candidates re-ranked per result (0: the manifest's value).
        mmap: map the index file instead of reading it (flat/IVF; saves RAM when several processes share a host).
        torch_threads: torch intra-op threads of a new encoder.
        query_dtype: query encoding dtype of a new encoder (:func:`~searchrl.retriever.embed.resolve_query_dtype`).
        encode_workers: threads a new encoder may split a query batch over (``<= 0``: one per core).
    """

    encoder: Encoder | None = None
    use_gpu: bool | None = None
    nprobe: int = 0
    ef_search: int = 0
    k_factor: int = 0
    mmap: bool = False
    torch_threads: int = 0
    query_dtype: str = "auto"
    encode_workers: int = 1

    def make_encoder(self, model: str, model_path: str | None = None) -> Encoder:
        """:attr:`encoder`, or a new :class:`~searchrl.retriever.embed.Encoder` of ``model`` with these options."""
        if self.encoder is not None:
            return self.encoder
        return Encoder(
            model,
            model_path=model_path,
            torch_threads=self.torch_threads,
            query_dtype=self.query_dtype,
            encode_workers=self.encode_workers,
        )


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

    def set_search_params(self, nprobe: int = 0, ef_search: int = 0, k_factor: int = 0) -> None:
        """Sets IVF ``nprobe`` / HNSW ``efSearch`` / ``IndexRefine`` ``k_factor`` (0 keeps the current value).

        On a GPU index ``nprobe`` is clamped to 2048 and to ``nlist`` first
        (:func:`~searchrl.retriever.gpu.clamp_nprobe`, warning logged): faiss-gpu's ``GpuParameterSpace`` stores any
        value, and every later search would then throw in ``validateNProbe`` (or abort past ``nlist``).
        """
        if nprobe > 0:
            if self.on_gpu:
                nprobe = gpu_checks.clamp_nprobe(nprobe, self.nlist, self.name)
            set_search_param(self.index, "nprobe", nprobe, self.on_gpu)
            if self.nlist > 0:
                self.nprobe = nprobe
                INDEX_NPROBE.labels(self.name).set(nprobe)
        if ef_search > 0:
            set_search_param(self.index, "efSearch", ef_search, self.on_gpu)
        if k_factor > 0:
            set_search_param(self.index, "k_factor", k_factor, self.on_gpu)

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


def _read_faiss(path: Path, mmap: bool, mmap_codes: bool = False) -> Any:
    """Reads a FAISS index file; ``mmap`` maps IVF inverted lists, ``mmap_codes`` maps flat/SQ code arrays
    (``IO_FLAG_MMAP_IFC``: the re-ranking vectors of an ``IndexRefine`` stay on disk, paged in on use)."""
    faiss = load_faiss()
    if not path.exists():
        raise FailedPrecondition(f"index file {path} does not exist")
    try:
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        if mmap_codes:
            flags |= faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY
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
    index_dir: str | Path, embedding_model: str = "", options: LoadOptions | None = None, **overrides: Any
) -> LoadedIndex:
    """Loads an index directory written by :func:`build_index`, checking it against its manifest and the model.

    Args:
        index_dir: the directory.
        embedding_model: expected model (empty: the manifest's). A different name is an error, not a silent switch.
        options: how to load it (default :class:`LoadOptions`).
        overrides: :class:`LoadOptions` fields that replace those of ``options`` (``use_gpu=False`` ...).

    Raises:
        FailedPrecondition: missing/invalid manifest, corrupt index file, model name differs from the manifest,
            dimension or size mismatch, corpus checksum mismatch.
    """
    opts = dataclasses.replace(options or LoadOptions(), **overrides)
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
    index = _read_faiss(d / manifest.index_file, opts.mmap, mmap_codes=manifest.index_type == "ivfpq_refine")
    if int(index.d) != manifest.dimension:
        raise FailedPrecondition(f"{d}: index dimension {index.d} differs from the manifest's {manifest.dimension}")
    if int(index.ntotal) != store.size or store.size != manifest.size:
        raise FailedPrecondition(f"{d}: index has {index.ntotal} vectors, store {store.size}, manifest {manifest.size}")
    if opts.encoder is not None and not same_model(opts.encoder.name, manifest.embedding_model):
        raise FailedPrecondition(
            f"{d}: index was built with {manifest.embedding_model!r}, encoder is {opts.encoder.name!r}"
        )
    stored = stored_encoder_dir(d, manifest)
    encoder = opts.make_encoder(
        manifest.embedding_model if stored else embedding_model or manifest.embedding_model,
        model_path=str(stored) if stored else None,
    )
    _check_dimension(index, encoder, str(d))
    params = IndexParams(**{k: v for k, v in manifest.build_params.items() if k in IndexParams.__dataclass_fields__})
    opts = dataclasses.replace(
        opts,
        nprobe=opts.nprobe or params.nprobe,
        ef_search=opts.ef_search or params.ef_search,
        k_factor=opts.k_factor or params.k_factor,
    )
    return _finish_load(index, store, encoder, manifest, opts, params, name=d.resolve().name)


def _finish_load(
    index: Any,
    store: PassageStore,
    encoder: Encoder,
    manifest: IndexManifest,
    opts: LoadOptions,
    params: IndexParams,
    name: str,
) -> LoadedIndex:
    cpu_index = index  # keeps the CPU index (and ``cpu_ivf``, a non-owning view of it) alive in this function
    cpu_ivf = ivf_of(cpu_index)
    on_gpu = False
    if opts.use_gpu is not False:
        index, on_gpu = to_gpu(cpu_index, name)  # clamps cpu_ivf.nprobe before cloning (restored if it stays on CPU)
    nlist = int(cpu_ivf.nlist) if cpu_ivf is not None else 0
    current = int(cpu_ivf.nprobe) if cpu_ivf is not None else 0
    loaded = LoadedIndex(index, store, encoder, manifest, on_gpu, params, name=name, nlist=nlist, nprobe=current)
    record_index_device(name, on_gpu)
    if nlist > 0:
        INDEX_NPROBE.labels(name).set(current)
    loaded.set_search_params(opts.nprobe, opts.ef_search, opts.k_factor)
    return loaded


def load_raw_index(
    index_path: str | Path,
    corpus_path: str | Path,
    embedding_model: str,
    options: LoadOptions | None = None,
    **overrides: Any,
) -> LoadedIndex:
    """Loads an existing Search-R1/FlashRAG index unchanged: a raw FAISS file, its jsonl corpus and the model name.

    Row ``i`` of the corpus jsonl is FAISS id ``i`` (as in Search-R1's ``retrieval_server.py``). No manifest is needed;
    one is synthesised from the files. ``options`` and ``overrides`` are those of :func:`load_index`.

    Raises:
        FailedPrecondition: unreadable index, corpus size differs from the index size, dimension mismatch.
    """
    opts = dataclasses.replace(options or LoadOptions(), **overrides)
    if not embedding_model:
        raise FailedPrecondition(
            "a raw index needs --embedding-model (e.g. intfloat/e5-base-v2 for Search-R1's e5_Flat.index)"
        )
    index = _read_faiss(Path(index_path), opts.mmap)
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
    encoder = opts.make_encoder(embedding_model)
    _check_dimension(index, encoder, str(index_path))
    manifest = IndexManifest(
        embedding_model=canonical_model_name(embedding_model),
        dimension=int(index.d),
        size=int(index.ntotal),
        index_type=index_type_of(index),
        corpus_checksum=store.checksum,
        corpus=str(Path(corpus_path).resolve()),
        faiss_version=load_faiss().__version__,
        index_file=str(Path(index_path).resolve()),
    )
    return _finish_load(index, store, encoder, manifest, opts, IndexParams(), name=Path(index_path).name)
