"""Index parameters and the manifest of an index directory.

An index directory holds::

    manifest.json      IndexManifest: embedding model, dimension, size, index type, corpus checksum, params, faiss
    index.faiss        the FAISS index (faiss.write_index); for ``ivfpq_refine`` its re-ranking vectors are
                       memory-mapped from this file when served (``IO_FLAG_MMAP_IFC``), not read into RAM
    trained-*.faiss    the trained, empty quantizer of an interrupted build (a rerun skips training)
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

INDEX_TYPES = ("flat", "hnsw", "ivfpq", "ivfpq_refine")
REFINE_TYPES = {"sq8": "SQ8", "fp16": "SQfp16", "flat": "Flat"}  # --refine -> FAISS factory name
COARSE_TYPES = ("auto", "flat", "hnsw")
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
        nprobe: IVF cells visited per query; auto: ``max(8, nlist / 8)`` (``ivfpq_refine``: ``max(32, nlist / 64)``),
            at most ``nlist``.
        train_size: vectors used to train IVF-PQ; auto: all up to 262,144.
        k_factor: ``ivfpq_refine``: the IVF-PQ stage returns ``k_factor * k`` candidates that are re-ranked with the
            re-ranking vectors (FAISS ``IndexRefine.k_factor``); auto: 16.
        refine: ``ivfpq_refine``: re-ranking vectors, ``sq8`` (8-bit scalar quantized, ``d`` bytes per passage),
            ``fp16`` (``2 d``) or ``flat`` (exact float32, ``4 d``); kept on disk and memory-mapped when served.
        coarse: IVF coarse quantizer: ``flat`` (exact assignment), ``hnsw`` (HNSW over the centroids, for the
            tens of thousands of cells a corpus of millions wants); auto: ``hnsw`` from 16,384 cells on.
        opq: rotate the vectors with OPQ (Ge et al., CVPR 2013) before product quantization (``ivfpq_refine``).
    """

    hnsw_m: int = 32
    ef_construction: int = 200
    ef_search: int = 128
    nlist: int = 0
    pq_m: int = 0
    pq_nbits: int = 0
    nprobe: int = 0
    train_size: int = 0
    k_factor: int = 0
    refine: str = "sq8"
    coarse: str = "auto"
    opq: bool = False

    def resolved(self, n: int, d: int, index_type: str = "") -> IndexParams:
        """A copy with every auto (0) field sized for ``n`` vectors of dimension ``d`` (and ``index_type``: an
        ``ivfpq_refine`` index, whose re-ranking cannot recover a neighbour in a cell it did not visit, probes
        ``max(32, nlist / 64)`` cells by default instead of ``max(8, nlist / 8)``; ``searchrl index eval --store``
        replaces either with a measured value)."""
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
            wide = index_type == "ivfpq_refine"
            p.nprobe = min(p.nlist, max(32, p.nlist // 64) if wide else max(8, p.nlist // 8))
        if p.train_size <= 0:
            p.train_size = min(n, 262_144)
        if p.k_factor <= 0:
            p.k_factor = 16
        if p.refine not in REFINE_TYPES:
            raise InvalidRequest(f"refine={p.refine!r}: expected one of {', '.join(REFINE_TYPES)}")
        if p.coarse not in COARSE_TYPES:
            raise InvalidRequest(f"coarse={p.coarse!r}: expected one of {', '.join(COARSE_TYPES)}")
        if p.coarse == "auto":
            p.coarse = "hnsw" if p.nlist >= 16_384 else "flat"
        return p

    def factory(self, index_type: str) -> str:
        """The FAISS ``index_factory`` string of an IVF index of these (resolved) parameters.

        ``ivfpq``: ``IVF{nlist}[_HNSW32],PQ{m}x{nbits}`` (what ``make_index`` builds with a flat coarse quantizer);
        ``ivfpq_refine``: ``[OPQ{m},]IVF...,PQ{m}x{nbits},Refine(SQ8)``
        (``IndexRefine``: IVF-PQ candidates re-ranked with the ``refine`` vectors).

        Raises:
            InvalidRequest: not an IVF index type.
        """
        if index_type not in ("ivfpq", "ivfpq_refine"):
            raise InvalidRequest(f"{index_type!r} has no IVF factory string")
        coarse = f"IVF{self.nlist}" + ("_HNSW32" if self.coarse == "hnsw" else "")
        body = f"{coarse},PQ{self.pq_m}x{self.pq_nbits}"
        if index_type == "ivfpq":
            return body
        return (f"OPQ{self.pq_m}," if self.opq else "") + body + f",Refine({REFINE_TYPES[self.refine]})"


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
