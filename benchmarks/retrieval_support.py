"""Helpers of the retrieval benchmark and its tests: index memory per passage, and the CPU's native-bf16 check."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from searchrl.retriever.index.faiss_util import fit_training, load_faiss, make_index
from searchrl.retriever.index.params import IndexParams


def cpu_has_native_bf16() -> bool:
    """True when this CPU runs bfloat16 matmuls natively (AVX512-BF16 or AMX), as oneDNN reports it."""
    try:
        import torch

        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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
    """Builds ``index_type`` on all of ``vectors`` and on half of them and reports the serialized sizes
    (``faiss.serialize_index``, close to the RAM footprint).

    The marginal cost per vector comes from the two sizes, so fixed parts (IVF centroids, PQ codebooks) are not
    spread over the vectors; train-time parameters are the same for both builds.
    """
    n, d = vectors.shape
    p = (params or IndexParams()).resolved(n, d)
    sizes = []
    for m in (n // 2, n):
        idx = make_index(index_type, d, p)
        if index_type == "ivfpq":
            fit_training(idx, min(n, p.train_size), p)
            idx.train(vectors[: min(n, p.train_size)])
        idx.add(vectors[:m])
        sizes.append(int(load_faiss().serialize_index(idx).nbytes))
    per = (sizes[1] - sizes[0]) / (n - n // 2)
    return MemoryEstimate(index_type, n, d, sizes[1], per, sizes[1] - per * n)
