"""Search without a RetrievalService: a :class:`~searchrl.agent.loop.SearchBackend` over an in-process index.

:class:`InProcessRetriever` puts a :class:`~searchrl.retriever.engine.RetrievalEngine` (validation, micro-batching,
FAISS search in a worker thread) behind the agent loop's search interface, on CPU. The trainer (``rollout.search.backend:
inprocess``) and the evaluator (``--search retriever`` without ``--retriever-target``) use it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from searchrl.agent.loop import SearchContext, SearchOutcome
from searchrl.retriever.engine import RetrievalEngine
from searchrl.retriever.index.load import load_index
from searchrl.retriever.index.wiki import resolve_index_dir


class InProcessRetriever:
    """A search backend named ``retriever`` over a :class:`~searchrl.retriever.engine.RetrievalEngine`.

    The engine's micro-batcher starts on the first search, on the loop that runs it. A failed search (a query the
    engine rejects, ...) becomes :attr:`SearchOutcome.error`: the episode continues.

    Args:
        engine: the engine; :meth:`close` closes it and its index.
    """

    name = "retriever"

    def __init__(self, engine: RetrievalEngine) -> None:
        self.engine = engine
        self._started = False

    @classmethod
    def open(cls, spec: str | Path | None = "wiki", *, torch_threads: int = 0) -> InProcessRetriever:
        """Loads an index on CPU (blocking; see :func:`open_inprocess_retriever` for the async form).

        Args:
            spec: an index directory written by ``searchrl index build``, or ``wiki``/``wiki:<type>``/empty/``None``
                for the bundled Wikipedia summaries index, built and cached on first use
                (:func:`~searchrl.retriever.index.wiki.resolve_index_dir`).
            torch_threads: threads of the query encoder (0: torch's default).

        Raises:
            searchrl.errors.FailedPrecondition: the index is missing or does not match its model.
        """
        loaded = load_index(resolve_index_dir(spec), use_gpu=False, torch_threads=torch_threads)
        return cls(RetrievalEngine(loaded))

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        """Top-``top_k`` passages of ``query``, best first."""
        try:
            if not self._started:
                await self.engine.start()
                self._started = True
            (result,) = await self.engine.search([query], top_k=top_k, api="")
        except Exception as exc:  # reported, not raised: the episode continues
            return SearchOutcome([], self.name, error=f"{type(exc).__name__}: {exc}"[:500])
        return SearchOutcome(list(result.documents), self.name, cache_hit=bool(result.cache_hit))

    async def close(self) -> None:
        """Stops the engine and releases the index's passage store."""
        await self.engine.close()
        self.engine.index.close()


async def open_inprocess_retriever(spec: str | Path | None = "wiki", *, torch_threads: int = 0) -> InProcessRetriever:
    """:meth:`InProcessRetriever.open` in a worker thread (the index load and a first wiki build are slow)."""
    return await asyncio.to_thread(InProcessRetriever.open, spec, torch_threads=torch_threads)
