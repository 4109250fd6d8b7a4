"""The cached index of the bundled Wikipedia summaries, and the ``wiki[:type]`` index spec."""

from __future__ import annotations

from pathlib import Path

from searchrl.errors import FailedPrecondition
from searchrl.retriever.embed import Encoder, canonical_model_name, same_model
from searchrl.retriever.index.build import build_index, file_lock
from searchrl.retriever.index.params import INDEX_FILE, MANIFEST_FILE, read_manifest


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
    with file_lock(target.with_suffix(".lock")):
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


def resolve_index_dir(spec: str | Path | None, *, model: str = "", progress: bool = False) -> Path:
    """The index directory an ``--index-dir`` value names.

    Args:
        spec: ``"wiki"`` or ``"wiki:<type>"`` (``flat``, ``hnsw``, ``ivfpq``): the bundled Wikipedia summaries index
            (:func:`ensure_wiki_index`, built on first use); empty or ``None``: ``"wiki"``; anything else: a directory
            written by ``searchrl index build``, returned as is (the loader checks it).
        model: embedding model of the wiki index (empty: all-MiniLM-L6-v2).
        progress: progress bars while the wiki index is built.

    Raises:
        InvalidRequest: an unknown wiki index type.
    """
    spec = str(spec or "wiki")
    if spec != "wiki" and not spec.startswith("wiki:"):
        return Path(spec)
    kind = spec.partition(":")[2] or "flat"
    return ensure_wiki_index(kind, model=model or "all-minilm-l6-v2", progress=progress)
