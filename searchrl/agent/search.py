"""Search backends of the agent loop (:class:`searchrl.agent.loop.SearchBackend`).

* :class:`RetrieverSearch` - the RetrievalService (real corpus, FAISS; ReSearch / Search-R1).
* :class:`SimulatorSearch` - the SimulatedSearchService (ZeroSearch, arXiv 2505.04588): sends the curriculum
  position (step, total steps) so the server draws useful/noisy documents with the scheduled noise probability, and
  during training the question and gold answers the simulator conditions on.
* :class:`MixedSearch` - a seeded per-query choice between two backends (e.g. 30% real retrieval, 70% simulated).
* :class:`InProcessSearch` - any Python callable (a local index, a fixture, the benchmark's instant lookup).
* :class:`NoSearch` - every search returns no documents (a no-search baseline).

The gRPC backends call the typed client SDK (:mod:`searchrl.client`): they take a ``host:port`` target (and open
their own client with the shared retry policy) or an open client. A failed call is reported in
:attr:`SearchOutcome.error` - never raised - so the episode gets an error observation and goes on.
:func:`build_search_backend` builds any of them from a :class:`SearchSpec`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import random
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import grpc
from pydantic import ConfigDict, Field, model_validator
from typing_extensions import Self

from searchrl.agent.loop import SearchBackend, SearchContext, SearchOutcome
from searchrl.agent.settings import Checked, episode_seed
from searchrl.client.base import ChannelOptions
from searchrl.client.retrieval import RetrievalClient
from searchrl.client.simulation import SimulatorClient
from searchrl.errors import InvalidRequest
from searchrl.rollout.v1 import rollout_pb2

C = TypeVar("C", RetrievalClient, SimulatorClient)


def _client(
    cls: type[C], client_or_target: C | str, timeout_s: float, token: str, options: ChannelOptions | None
) -> tuple[C, bool]:
    """The typed client of a ``host:port`` target (opened here, so owned) or the given client (not owned)."""
    if not isinstance(client_or_target, str):
        return client_or_target, False
    if options is None:
        opts = ChannelOptions(timeout_s=timeout_s, token=token)
    else:  # TLS / mTLS / token from the caller (e.g. ChannelOptions.from_env()), our deadline
        opts = dataclasses.replace(options, timeout_s=timeout_s, token=options.token or token)
    return cls(client_or_target, opts), True


def _rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details() or ''}".strip()


class RetrieverSearch:
    """Searches through the RetrievalService ``Search`` RPC (:class:`~searchrl.client.retrieval.RetrievalClient`).

    Args:
        client_or_target: ``host:port`` of the service, or a :class:`~searchrl.client.retrieval.RetrievalClient`.
        timeout_s: deadline of one RPC, in seconds.
        token: bearer token when the service requires auth (target form only).
        options: a :class:`searchrl.client.base.ChannelOptions` with TLS settings and token (target form only);
            ``timeout_s`` still sets the deadline.
    """

    name = "retriever"

    def __init__(
        self,
        client_or_target: RetrievalClient | str,
        *,
        timeout_s: float = 30.0,
        token: str = "",
        options: ChannelOptions | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.client, self._owned = _client(RetrievalClient, client_or_target, timeout_s, token, options)

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        """Top-k documents of ``query`` from the real corpus (``context`` is not used)."""
        try:
            results = await self.client.search_results([query], top_k, timeout_s=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            return SearchOutcome([], self.name, error=_rpc_error(exc))
        if not results:
            return SearchOutcome([], self.name, error="the retriever returned no result for the query")
        return SearchOutcome(list(results[0].documents), self.name, cache_hit=results[0].cache_hit)

    async def close(self) -> None:
        """Closes the channel when this backend opened it."""
        if self._owned:
            await self.client.close()


class SimulatorSearch:
    """Searches through the SimulatedSearchService ``Search`` RPC (ZeroSearch;
    :class:`~searchrl.client.simulation.SimulatorClient`).

    The quality of each query's documents comes from, in order of precedence: ``quality`` (fixed useful/noisy),
    ``noise_probability``, or the curriculum position ``(context.step, context.total_steps)`` when both are set;
    otherwise the server's default applies. With an episode seed, each (episode, query) gets its own replay seed, so
    the quality draw is reproducible and differs across queries.

    Args:
        client_or_target: ``host:port`` of the service, or a :class:`~searchrl.client.simulation.SimulatorClient`.
        training: send the question and gold answers (ZeroSearch's training-time conditioning); set ``False`` at
            evaluation so gold answers never reach the simulator.
        quality: ``"useful"`` or ``"noisy"`` for a fixed quality; empty for none.
        noise_probability: fixed probability of noisy documents in [0, 1]; ``None`` for none.
        timeout_s: deadline of one RPC, in seconds (LLM simulation is slow on CPU).
        token: bearer token when the service requires auth (target form only).
        options: a :class:`searchrl.client.base.ChannelOptions` with TLS settings and token (target form only).

    Raises:
        InvalidRequest: an unknown ``quality`` or a probability outside [0, 1].
    """

    name = "simulator"

    def __init__(
        self,
        client_or_target: SimulatorClient | str,
        *,
        training: bool = True,
        quality: str = "",
        noise_probability: float | None = None,
        timeout_s: float = 120.0,
        token: str = "",
        options: ChannelOptions | None = None,
    ) -> None:
        if quality not in ("", "useful", "noisy"):
            raise InvalidRequest(f"quality must be 'useful', 'noisy' or empty, got {quality!r}")
        if noise_probability is not None and not 0.0 <= noise_probability <= 1.0:
            raise InvalidRequest(f"noise_probability must be in [0, 1], got {noise_probability}")
        self.training = training
        self.quality = quality or None
        self.noise_probability = None if self.quality else noise_probability
        self.timeout_s = timeout_s
        self.client, self._owned = _client(SimulatorClient, client_or_target, timeout_s, token, options)

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        """Simulated documents for ``query``; the curriculum step and (training) question/answers come from ``context``."""
        fixed = self.quality is not None or self.noise_probability is not None
        curriculum = (context.step, context.total_steps) if context.step is not None and context.total_steps else None
        try:
            resp = await self.client.search(
                [query],
                top_k,
                quality=self.quality,
                noise_probability=self.noise_probability,
                curriculum=None if fixed else curriculum,
                question=context.question if self.training else "",
                golden_answers=context.golden_answers if self.training else (),
                seed=0 if context.seed is None else episode_seed(context.seed, query) or 1,
                timeout_s=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            return SearchOutcome([], self.name, error=_rpc_error(exc))
        if not resp.results:
            return SearchOutcome([], self.name, error="the simulator returned no result for the query")
        result = resp.results[0]
        return SearchOutcome(list(result.documents), self.name, cache_hit=result.cache_hit)

    async def close(self) -> None:
        """Closes the channel when this backend opened it."""
        if self._owned:
            await self.client.close()


class MixedSearch:
    """Sends each query to ``a`` with probability ``ratio``, else to ``b`` (a seeded, reproducible choice).

    The draw depends on ``seed``, the episode seed and the query text, so re-running an episode makes the same choices.

    Raises:
        InvalidRequest: ``ratio`` outside [0, 1].
    """

    name = "mixed"

    def __init__(self, a: Any, b: Any, ratio: float = 0.5, seed: int = 0) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise InvalidRequest(f"ratio must be in [0, 1], got {ratio}")
        self.a, self.b, self.ratio, self.seed = a, b, ratio, seed

    def pick(self, query: str, context: SearchContext) -> Any:
        """The backend that answers ``query`` in this episode."""
        rng = random.Random(f"{self.seed}\x00{context.seed}\x00{query}")
        return self.a if rng.random() < self.ratio else self.b

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        """Delegates to the picked backend; its outcome names the backend that answered."""
        outcome: SearchOutcome = await self.pick(query, context).search(query, top_k=top_k, context=context)
        return outcome

    async def close(self) -> None:
        """Closes both backends."""
        for backend in (self.a, self.b):
            closer = getattr(backend, "close", None)
            if closer is not None:
                await closer()


class InProcessSearch:
    """Wraps a Python function ``fn(query, top_k) -> documents`` (sync or async) as a search backend.

    Args:
        fn: returns ``rollout.v1.Document`` messages (or ``(title, text)`` tuples / dicts with title and text).
        name: backend label in records and metrics.
        in_thread: run a sync ``fn`` in a worker thread (for slow functions such as an in-process FAISS search).
    """

    def __init__(self, fn: Callable[[str, int], Any], name: str = "inprocess", in_thread: bool = False) -> None:
        self.fn = fn
        self.name = name
        self.in_thread = in_thread

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        """Calls ``fn``; an exception becomes :attr:`SearchOutcome.error`."""
        try:
            if self.in_thread and not inspect.iscoroutinefunction(self.fn):
                got = await asyncio.to_thread(self.fn, query, top_k)
            else:
                got = self.fn(query, top_k)
                if inspect.isawaitable(got):
                    got = await got
        except Exception as exc:  # reported, not raised: the episode continues
            return SearchOutcome([], self.name, error=f"{type(exc).__name__}: {exc}"[:500])
        return SearchOutcome([_as_document(d) for d in list(got)[:top_k]], self.name)


class NoSearch:
    """A backend that finds nothing (a no-search baseline; the policy sees ``No documents found.``)."""

    name = "none"

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        """Returns no documents."""
        return SearchOutcome([], self.name)


class DelayedSearch:
    """Another backend's answers, each after ``latency_s`` more seconds: the latency of a web search API (1-2 s) on a
    local index, to measure how training copes with slow search (``benchmarks/async_bench.py``).

    Args:
        inner: the backend that answers.
        latency_s: seconds added before each search, > 0.
    """

    def __init__(self, inner: SearchBackend, latency_s: float) -> None:
        if latency_s <= 0:
            raise InvalidRequest(f"added search latency must be > 0 s, got {latency_s}")
        self.inner, self.latency_s = inner, latency_s
        self.name = getattr(inner, "name", "search")

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        """Waits ``latency_s``, then asks ``inner``."""
        await asyncio.sleep(self.latency_s)
        return await self.inner.search(query, top_k=top_k, context=context)

    async def close(self) -> None:
        """Closes ``inner`` when it can be closed."""
        closer = getattr(self.inner, "close", None)
        if closer is not None:
            res = closer()
            if asyncio.iscoroutine(res):
                await res


def _as_document(d: Any) -> rollout_pb2.Document:
    if isinstance(d, rollout_pb2.Document):
        return d
    if isinstance(d, tuple):
        return rollout_pb2.Document(title=str(d[0]), text=str(d[1]))
    if isinstance(d, dict):
        return rollout_pb2.Document(
            id=str(d.get("id", "")),
            title=str(d.get("title", "")),
            text=str(d.get("text", d.get("contents", ""))),
            score=float(d.get("score", 0.0)),
        )
    raise TypeError(f"cannot turn {type(d).__name__} into a Document")


SEARCH_KINDS = ("retriever", "simulator", "mixed", "inprocess", "none")


class SearchSpec(Checked):
    """Which search backend to build (:func:`build_search_backend`).

    Attributes:
        kind: ``"retriever"``, ``"simulator"``, ``"mixed"`` (retriever share ``mix_ratio``), ``"inprocess"``
            (``inprocess``: an index in this process) or ``"none"``.
        retriever_target / simulator_target: ``host:port`` of each service, or an open typed client (shared, not
            closed by the backend).
        mix_ratio: with ``mixed``: share of searches sent to the retriever in [0, 1] (the rest: simulator).
        training: send the question and gold answers to the simulator (``False`` at evaluation).
        seed: seed of the mixed choice.
        timeout_s: deadline of one retriever RPC, in seconds; the simulator gets at least 60 s (an LLM answers in
            seconds).
        token: bearer token (plaintext channels); ``options`` (a :class:`~searchrl.client.base.ChannelOptions`, e.g.
            ``ChannelOptions.from_env()``) carries TLS and the token.
        inprocess: with ``inprocess``: a search backend, or a function ``fn(query, top_k) -> documents`` (run in a
            worker thread, named ``retriever``), e.g. over an index loaded by :mod:`searchrl.retriever`.
        added_latency_s: seconds added before every search (:class:`DelayedSearch`; 0: none).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    kind: str = "retriever"
    retriever_target: RetrievalClient | str = ""
    simulator_target: SimulatorClient | str = ""
    mix_ratio: Annotated[float, Field(ge=0, le=1)] = 0.5
    training: bool = True
    seed: int = 0
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    token: str = ""
    options: ChannelOptions | None = None
    inprocess: Any = None
    added_latency_s: Annotated[float, Field(ge=0)] = 0.0

    @model_validator(mode="after")
    def _targets(self) -> Self:
        if self.kind not in SEARCH_KINDS:
            raise ValueError(f"unknown search backend {self.kind!r}; expected one of {', '.join(SEARCH_KINDS)}")
        if self.kind in ("retriever", "mixed") and not self.retriever_target:
            raise ValueError(f"search backend {self.kind!r} needs a retriever target")
        if self.kind in ("simulator", "mixed") and not self.simulator_target:
            raise ValueError(f"search backend {self.kind!r} needs a simulator target")
        if self.kind == "inprocess" and self.inprocess is None:
            raise ValueError("search backend 'inprocess' needs an in-process search backend or function")
        return self


def build_search_backend(spec: SearchSpec) -> SearchBackend:
    """The search backend ``spec`` names (call it on the event loop that will use it: gRPC channels belong to it)."""
    backend = _build_backend(spec)
    return DelayedSearch(backend, spec.added_latency_s) if spec.added_latency_s else backend


def _build_backend(spec: SearchSpec) -> SearchBackend:
    if spec.kind == "none":
        return NoSearch()
    if spec.kind == "inprocess":
        if callable(getattr(spec.inprocess, "search", None)):
            backend: SearchBackend = spec.inprocess
            return backend
        return InProcessSearch(spec.inprocess, name="retriever", in_thread=True)
    auth: dict[str, Any] = {"token": spec.token, "options": spec.options}
    if spec.kind == "retriever":
        return RetrieverSearch(spec.retriever_target, timeout_s=spec.timeout_s, **auth)
    simulator = SimulatorSearch(
        spec.simulator_target, training=spec.training, timeout_s=max(spec.timeout_s, 60.0), **auth
    )
    if spec.kind == "simulator":
        return simulator
    retriever = RetrieverSearch(spec.retriever_target, timeout_s=spec.timeout_s, **auth)
    return MixedSearch(retriever, simulator, ratio=spec.mix_ratio, seed=spec.seed)
