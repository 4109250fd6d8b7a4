"""FAISS index build and load: Flat, HNSW and IVF-PQ, resumable embedding shards, manifests, GPU placement.

Modules: :mod:`~searchrl.retriever.index.params` (parameters, manifest), :mod:`~searchrl.retriever.index.faiss_util`
(FAISS helpers, GPU placement), :mod:`~searchrl.retriever.index.build`, :mod:`~searchrl.retriever.index.load`,
:mod:`~searchrl.retriever.index.wiki` (the cached Wikipedia index, ``wiki[:type]`` specs); their public names are
re-exported here.

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

from searchrl.retriever.index.build import BuildReport, ShardSet, build_from_shards, build_index
from searchrl.retriever.index.faiss_util import (
    index_type_of,
    prepare_for_gpu,
    recall_at_k,
    record_index_device,
    set_blas_min_batch,
    set_faiss_threads,
    to_gpu,
)
from searchrl.retriever.index.load import LoadedIndex, LoadOptions, load_index, load_raw_index
from searchrl.retriever.index.params import (
    INDEX_FILE,
    MANIFEST_FILE,
    IndexManifest,
    IndexParams,
    read_manifest,
    stored_encoder_dir,
)
from searchrl.retriever.index.wiki import ensure_wiki_index, resolve_index_dir

__all__ = [
    "INDEX_FILE",
    "MANIFEST_FILE",
    "BuildReport",
    "IndexManifest",
    "IndexParams",
    "LoadOptions",
    "LoadedIndex",
    "ShardSet",
    "build_from_shards",
    "build_index",
    "ensure_wiki_index",
    "index_type_of",
    "load_index",
    "load_raw_index",
    "prepare_for_gpu",
    "read_manifest",
    "recall_at_k",
    "record_index_device",
    "resolve_index_dir",
    "set_blas_min_batch",
    "set_faiss_threads",
    "stored_encoder_dir",
    "to_gpu",
]
