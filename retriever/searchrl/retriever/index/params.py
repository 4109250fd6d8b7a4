"""Index parameters and the manifest of an index directory.

An index directory holds::

    manifest.json      IndexManifest: embedding model, dimension, size, index type, corpus checksum, params, faiss
    index.faiss        the FAISS index (faiss.write_index)
    store/             the PassageStore (memory-mapped passages, see searchrl.retriever.corpus)
    model/             the query/passage encoder the index was built with (sentence-transformers ``save``); loading
                       uses it, offline, so a served index never needs the model hub or the build's model path
    embeddings/        shard_00000.npy ... (float32, unit-norm rows) + shards.json; a rerun skips finished shards
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from searchrl.errors import FailedPrecondition, InvalidRequest

INDEX_TYPES = ("flat", "hnsw", "ivfpq")
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
ENCODER_DIR = "model"  # <index-dir>/model: the encoder saved by build_index
MANIFEST_FORMAT = 1


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


def stored_encoder_dir(index_dir: str | Path, manifest: IndexManifest | None = None) -> Path | None:
    """``<index_dir>/model`` (or the manifest's ``encoder_dir``) when it holds a sentence-transformers model, else
    ``None`` (indexes built before the encoder was stored: the model is loaded by name)."""
    d = Path(index_dir) / ((manifest.encoder_dir if manifest else "") or ENCODER_DIR)
    return d if (d / "modules.json").is_file() else None
