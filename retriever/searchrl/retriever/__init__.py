"""Dense retrieval over a real corpus: ingestion, embedding, FAISS indexes and the RetrievalService.

The pieces, from the bottom up:

* :mod:`searchrl.retriever.corpus` reads FlashRAG/Search-R1 jsonl, parquet and the bundled Wikipedia summaries, and
  writes a memory-mapped :class:`~searchrl.retriever.corpus.PassageStore` that every worker shares through the page
  cache.
* :mod:`searchrl.retriever.embed` wraps sentence-transformers with the query/passage prefixes each model family expects.
* :mod:`searchrl.retriever.index` builds (resumably) and loads Flat, HNSW and IVF-PQ indexes, and Search-R1's raw
  ``e5_Flat.index`` files unchanged; an index directory carries its encoder in ``model/``.
* :mod:`searchrl.retriever.gpu` checks what faiss-gpu accepts before an index is cloned to a GPU (nprobe <= 2048, GPU
  code compiled for the device's compute capability).
* :mod:`searchrl.retriever.batcher` micro-batches concurrent requests; :mod:`searchrl.retriever.engine` puts the cache,
  validation and filters around it; :mod:`searchrl.retriever.server` serves it over gRPC and the Search-R1/FlashRAG
  HTTP API (:mod:`searchrl.retriever.http`).

Heavy dependencies (torch, faiss, sentence-transformers) are imported by the submodules, not here.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ensure_wiki_index", "load_index", "build_index"]


def __getattr__(name: str) -> Any:  # lazy: keep ``import searchrl.retriever`` cheap
    if name in __all__:
        from searchrl.retriever.index import build, load, wiki

        return getattr({"build_index": build, "load_index": load, "ensure_wiki_index": wiki}[name], name)
    raise AttributeError(name)
