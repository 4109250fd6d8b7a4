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
        fit_training(index, n_train, p)
        index.train(train)
    for arr in shards.iter_all():
        index.add(arr)
    return index


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
    p = (params or IndexParams()).resolved(store.size, encoder.dimension)
    index = build_from_shards(shards, index_type, p)
    faiss = load_faiss()
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
