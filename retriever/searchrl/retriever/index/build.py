"""Index builds: the passage store, resumable embedding shards, the FAISS index and its manifest."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from searchrl.errors import InvalidRequest
from searchrl.retriever.corpus import Passage, PassageStore, iter_corpus, iter_jsonl
from searchrl.retriever.embed import Encoder, same_model
from searchrl.retriever.index.faiss_util import fit_training, load_faiss, make_index
from searchrl.retriever.index.params import (
    ENCODER_DIR,
    INDEX_FILE,
    INDEX_TYPES,
    MANIFEST_FILE,
    IndexManifest,
    IndexParams,
)

log = logging.getLogger("searchrl.retriever.index")


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
    return shards, len(todo), skipped


class FlatIndexVectors:
    """The vectors of a flat FAISS index file (Search-R1's ``e5_Flat.index``), read in chunks from a memory map.

    The file is opened with ``IO_FLAG_MMAP_IFC``, so a 65 GB index is never loaded: :meth:`iter_chunks` and
    :meth:`take` read only the rows asked for (``reconstruct_n`` / ``reconstruct_batch``).

    Raises:
        FailedPrecondition: the file is missing, unreadable, or not a flat (``IndexFlat``) index.
    """

    def __init__(self, path: str | Path, chunk_size: int = 65_536) -> None:
        from searchrl.errors import FailedPrecondition

        faiss = load_faiss()
        self.path = Path(path)
        if not self.path.is_file():
            raise FailedPrecondition(f"flat index file {path} does not exist")
        try:
            index = faiss.read_index(str(self.path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as exc:
            raise FailedPrecondition(f"{path} is not a readable FAISS index: {str(exc).splitlines()[0]}") from None
        if not isinstance(index, faiss.IndexFlat):
            raise FailedPrecondition(f"{path} is a {type(index).__name__}, not a flat index (IndexFlatIP/IndexFlatL2)")
        self.index = index
        self.size = int(index.ntotal)
        self.dimension = int(index.d)
        self.chunk_size = chunk_size
        self.metric_type = int(index.metric_type)

    def iter_chunks(self) -> Iterator[np.ndarray]:
        """Consecutive ``(<= chunk_size, d)`` float32 blocks, in row order."""
        for lo in range(0, self.size, self.chunk_size):
            yield self.index.reconstruct_n(lo, min(self.chunk_size, self.size - lo))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (int64), ``(len(rows), d)`` float32."""
        return self.index.reconstruct_batch(np.ascontiguousarray(rows, dtype=np.int64))


def _sample(vectors: ShardSet | FlatIndexVectors, n_train: int, seed: int) -> np.ndarray:
    """``n_train`` distinct rows of ``vectors``, drawn uniformly with ``seed``, ``(n_train, d)`` float32."""
    pick = np.sort(np.random.default_rng(seed).choice(vectors.size, size=n_train, replace=False))
    if isinstance(vectors, FlatIndexVectors):
        return vectors.take(pick)
    train = np.empty((n_train, vectors.dimension), dtype=np.float32)
    filled = 0
    for i in range(vectors.num_shards):
        lo, hi = i * vectors.shard_size, i * vectors.shard_size + vectors.shard_rows(i)
        sel = pick[(pick >= lo) & (pick < hi)] - lo
        if len(sel):
            train[filled : filled + len(sel)] = np.load(vectors.shard_path(i), mmap_mode="r")[sel]
            filled += len(sel)
    return train


def _chunks(vectors: ShardSet | FlatIndexVectors) -> Iterator[np.ndarray]:
    return vectors.iter_chunks() if isinstance(vectors, FlatIndexVectors) else vectors.iter_all()


def build_from_shards(
    shards: ShardSet | FlatIndexVectors,
    index_type: str,
    params: IndexParams,
    seed: int = 1234,
    trained_cache: Path | None = None,
    progress: bool = False,
) -> Any:
    """A FAISS index over every vector of ``shards``, added one shard (or chunk) at a time.

    IVF indexes are trained on a uniform sample of ``params.train_size`` vectors first. With ``trained_cache`` (a
    file path), the trained, still empty index is written there before vectors are added and read back by a rerun
    with the same parameters and vectors, so a build killed while adding does not train again.

    Args:
        shards: embedding shards, or the vectors of a flat index file (:class:`FlatIndexVectors`).
        index_type: one of ``INDEX_TYPES``.
        params: index parameters (auto fields are resolved here).
        seed: training sample seed.
        trained_cache: where to keep the trained empty index (IVF types only).
        progress: a rich progress bar with rate and ETA while adding.

    Returns:
        The populated FAISS index.
    """
    faiss = load_faiss()
    p = params.resolved(shards.size, shards.dimension, index_type)
    index = make_index(index_type, shards.dimension, p)
    if index_type in ("ivfpq", "ivfpq_refine"):
        n_train = min(p.train_size, shards.size)
        cached = None
        if trained_cache is not None and trained_cache.exists():
            with contextlib.suppress(RuntimeError):
                cached = faiss.read_index(str(trained_cache))
        if cached is not None and cached.is_trained and cached.ntotal == 0 and cached.d == shards.dimension:
            log.info("reusing the trained quantizer in %s", trained_cache)
            index = cached
        else:
            t0 = time.perf_counter()
            fit_training(index, n_train, p)
            index.train(_sample(shards, n_train, seed))
            log.info("trained %s on %d vectors in %.1fs", index_type, n_train, time.perf_counter() - t0)
            if trained_cache is not None:
                tmp = trained_cache.with_suffix(".tmp")
                faiss.write_index(index, str(tmp))
                os.replace(tmp, trained_cache)
    bar_ctx: Any = contextlib.nullcontext(None)
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar_ctx = Progress(TextColumn("adding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with bar_ctx as bar:
        task = bar.add_task("add", total=shards.size) if bar else None
        for arr in _chunks(shards):
            index.add(arr)
            if bar is not None:
                bar.advance(task, len(arr))
    return index


def trained_cache_path(out: Path, index_type: str, p: IndexParams, vectors_id: str, seed: int = 1234) -> Path:
    """``out/trained-<key>.faiss``: the key hashes the factory, training size, seed and the vectors' identity."""
    import hashlib

    key = json.dumps([index_type, asdict(p), vectors_id, seed], sort_keys=True)
    return out / f"trained-{hashlib.sha256(key.encode()).hexdigest()[:16]}.faiss"


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


def _cached_store(
    store_dir: Path, source: str, limit: int | None, passages: Callable[[], Iterable[Passage]], progress: bool
) -> PassageStore:
    """The store in ``store_dir`` when it was written from ``source`` and ``limit``, else a new one of ``passages()``."""
    if _store_matches(store_dir, source, limit):
        return PassageStore.open(store_dir)
    store = PassageStore.write(store_dir, passages(), progress=progress)
    store.meta = dict(store.meta, source=source, limit=limit)
    (store_dir / "store.json").write_text(json.dumps(store.meta, indent=2))
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
    store = _cached_store(out / "store", _source_id(corpus), limit, lambda: iter_corpus(corpus, limit), progress)
    if store.size == 0:
        raise InvalidRequest(f"corpus {corpus!r} has no passages")
    if encoder is None:
        encoder = Encoder(model, torch_threads=torch_threads, allow_download=allow_download)
    elif not same_model(encoder.name, model):
        raise InvalidRequest(f"encoder {encoder.name!r} is not the requested model {model!r}")
    emb_dir = Path(embeddings_dir) if embeddings_dir else out / "embeddings"
    shards, computed, skipped = embed_store(store, encoder, emb_dir, shard_size, batch_size, progress)
    p = (params or IndexParams()).resolved(store.size, encoder.dimension, index_type)
    return _finish_build(
        out,
        shards,
        index_type,
        p,
        store,
        encoder,
        model,
        t0,
        progress,
        corpus=str(corpus) if corpus == "wiki" else str(Path(corpus).resolve()),
        vectors_id=f"shards:{encoder.name}:{store.checksum}",
        extra={"limit": limit, "shard_size": shard_size},
        counts=(computed, skipped),
    )


def _finish_build(
    out: Path,
    vectors: ShardSet | FlatIndexVectors,
    index_type: str,
    p: IndexParams,
    store: PassageStore,
    encoder: Encoder,
    model: str,
    t0: float,
    progress: bool,
    corpus: str,
    vectors_id: str,
    extra: dict[str, Any],
    counts: tuple[int, int] = (0, 0),
) -> BuildReport:
    """Builds the FAISS index of ``vectors`` and writes it, the encoder and the manifest into ``out`` (atomically)."""
    cache = trained_cache_path(out, index_type, p, vectors_id) if index_type in ("ivfpq", "ivfpq_refine") else None
    index = build_from_shards(vectors, index_type, p, trained_cache=cache, progress=progress)
    faiss = load_faiss()
    tmp = out / (INDEX_FILE + ".tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / INDEX_FILE)
    for stale in out.glob("trained-*.faiss"):
        stale.unlink()
    encoder.save(out / ENCODER_DIR)
    seconds = time.perf_counter() - t0
    build_params = {**asdict(p), **extra}
    if index_type == "ivfpq_refine":
        build_params["factory"] = p.factory(index_type)
    manifest = IndexManifest(
        embedding_model=encoder.name,
        dimension=encoder.dimension,
        size=store.size,
        index_type=index_type,
        corpus_checksum=store.checksum,
        corpus=corpus,
        build_params={
            **build_params,
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
    return BuildReport(out, manifest, counts[0], counts[1], seconds, index_bytes=os.path.getsize(out / INDEX_FILE))


def convert_flat_index(
    flat_index: str | Path,
    corpus: str | Path,
    out_dir: str | Path,
    model: str,
    index_type: str = "ivfpq_refine",
    params: IndexParams | None = None,
    encoder: Encoder | None = None,
    chunk_size: int = 65_536,
    progress: bool = True,
    allow_download: bool = False,
) -> BuildReport:
    """Builds an index directory from an existing flat FAISS index and its corpus, without embedding anything.

    For a Search-R1 user: ``e5_Flat.index`` + ``wiki-18.jsonl`` + ``intfloat/e5-base-v2`` become an ``ivfpq_refine``
    (or any other type) directory that ``searchrl serve retriever --index-dir`` serves, Search-R1 HTTP API included.
    Row ``i`` of the corpus is vector ``i`` of the flat index (as Search-R1's server assumes). The vectors are read in
    ``chunk_size`` blocks from a memory map of the flat file; a rerun after a crash reuses the passage store and the
    trained quantizer.

    Raises:
        InvalidRequest: unknown index type, corpus not a file.
        FailedPrecondition: unreadable or non-flat index, an L2 index, corpus size or model dimension that differs
            from the index's.
    """
    from searchrl.errors import FailedPrecondition

    if index_type not in INDEX_TYPES:
        raise InvalidRequest(f"unknown index type {index_type!r}: expected one of {', '.join(INDEX_TYPES)}")
    t0 = time.perf_counter()
    vectors = FlatIndexVectors(flat_index, chunk_size)
    faiss = load_faiss()
    if vectors.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise FailedPrecondition(f"{flat_index} is an L2 index; searchrl's indexes are inner product (cosine)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = _cached_store(out / "store", _source_id(str(corpus)), None, lambda: iter_jsonl(corpus), progress)
    if store.size != vectors.size:
        raise FailedPrecondition(f"{flat_index} holds {vectors.size} vectors but {corpus} has {store.size} passages")
    if encoder is None:
        encoder = Encoder(model, allow_download=allow_download)
    if encoder.dimension != vectors.dimension:
        raise FailedPrecondition(
            f"{flat_index} has dimension {vectors.dimension}; model {model!r} embeds in {encoder.dimension}"
        )
    p = (params or IndexParams()).resolved(vectors.size, vectors.dimension, index_type)
    src = vectors.path.resolve()
    return _finish_build(
        out,
        vectors,
        index_type,
        p,
        store,
        encoder,
        model,
        t0,
        progress,
        corpus=str(Path(corpus).resolve()),
        vectors_id=f"flat:{src}:{src.stat().st_size}:{int(src.stat().st_mtime)}",
        extra={"converted_from": str(src), "chunk_size": chunk_size},
    )


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
    with file_lock(target.with_suffix(".lock")):
        return _cached_store(target, source, None, lambda: iter_jsonl(corpus_path), progress)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (created, with its parents) for the ``with`` block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
