"""Search backends of the agent loop (:class:`searchrl.agent.loop.SearchBackend`).

* :class:`RetrieverSearch` - the RetrievalService (real corpus, FAISS; ReSearch / Search-R1).
* :class:`SimulatorSearch` - the SimulatedSearchService (ZeroSearch, arXiv 2505.04588): sends the curriculum
  position (step, total steps) so the server draws useful/noisy documents with the scheduled noise probability, and
  during training the question and gold answers the simulator conditions on.
* :class:`MixedSearch` - a seeded per-query choice between two backends (e.g. 30% real retrieval, 70% simulated).
* :class:`InProcessSearch` - any Python callable (a local index, a fixture, the benchmark's instant lookup).
* :class:`NoSearch` - every search returns no documents (a no-search baseline).

The gRPC backends take a ``host:port`` target (they open their own channel with the shared retry policy) or an
existing client object that has a ``channel`` (e.g. ``searchrl.client.retrieval.RetrievalClient``). A failed call is
reported in :attr:`SearchOutcome.error` - never raised - so the episode gets an error observation and goes on.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import random
from collections.abc import Callable
from typing import Any

import grpc

from searchrl.agent.loop import SearchContext, SearchOutcome
from searchrl.errors import InvalidRequest
from searchrl.retrieval.v1 import retrieval_pb2, retrieval_pb2_grpc
from searchrl.rollout.v1 import rollout_pb2
from searchrl.simulation.v1 import simulation_pb2, simulation_pb2_grpc


class _Channel:
    """A channel and call options from a target string or from an existing client (``.channel``, ``.call_kwargs``)."""

    def __init__(
        self, client_or_target: Any, service_name: str, timeout_s: float, token: str = "", options: Any = None
    ) -> None:
        self.timeout_s = timeout_s
        self._owned = isinstance(client_or_target, str)
        if self._owned:
            import dataclasses

            from searchrl.client.base import BaseClient, ChannelOptions

            class _Client(BaseClient):
                pass

            _Client.service_name = service_name
            if options is None:
                opts = ChannelOptions(timeout_s=timeout_s, token=token)
            else:  # TLS / mTLS / token from the caller (e.g. ChannelOptions.from_env()), our deadline
                opts = dataclasses.replace(options, timeout_s=timeout_s, token=options.token or token)
            self._client: Any = _Client(client_or_target, opts)
        else:
            if not hasattr(client_or_target, "channel"):
                raise InvalidRequest("expected a 'host:port' target or a client object with a .channel")
            self._client = client_or_target
        self.channel = self._client.channel

    def call_kwargs(self) -> dict[str, Any]:
        fn = getattr(self._client, "call_kwargs", None)
        return dict(fn(self.timeout_s)) if fn is not None else {"timeout": self.timeout_s}

    async def close(self) -> None:
        if self._owned:
            await self._client.close()


def _rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details() or ''}".strip()


class RetrieverSearch:
    """Searches through the RetrievalService ``Search`` RPC.

    Args:
        client_or_target: ``host:port`` of the service, or a client with a ``channel``.
        timeout_s: deadline of one RPC, in seconds.
        token: bearer token when the service requires auth (target form only).
        options: a :class:`searchrl.client.base.ChannelOptions` with TLS settings and token (target form only);
            ``timeout_s`` still sets the deadline.
    """

    name = "retriever"

    def __init__(self, client_or_target: Any, *, timeout_s: float = 30.0, token: str = "", options: Any = None) -> None:
        self._ch = _Channel(client_or_target, "searchrl.retrieval.v1.RetrievalService", timeout_s, token, options)
        self._stub = retrieval_pb2_grpc.RetrievalServiceStub(self._ch.channel)

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        """Top-k documents of ``query`` from the real corpus (``context`` is not used)."""
        try:
            resp = await self._stub.Search(
                retrieval_pb2.SearchRequest(queries=[query], top_k=top_k), **self._ch.call_kwargs()
            )
        except grpc.aio.AioRpcError as exc:
            return SearchOutcome([], self.name, error=_rpc_error(exc))
        if not resp.results:
            return SearchOutcome([], self.name, error="the retriever returned no result for the query")
        result = resp.results[0]
        return SearchOutcome(list(result.documents), self.name, cache_hit=result.cache_hit)

    async def close(self) -> None:
        """Closes the channel when this backend opened it."""
        await self._ch.close()


class SimulatorSearch:
    """Searches through the SimulatedSearchService ``Search`` RPC (ZeroSearch).

    The quality of each query's documents comes from, in order of precedence: ``quality`` (fixed useful/noisy),
    ``noise_probability``, or the curriculum position ``(context.step, context.total_steps)`` when both are set;
    otherwise the server's default applies.

    Args:
        client_or_target: ``host:port`` of the service, or a client with a ``channel``.
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
        client_or_target: Any,
        *,
        training: bool = True,
        quality: str = "",
        noise_probability: float | None = None,
        timeout_s: float = 120.0,
        token: str = "",
        options: Any = None,
    ) -> None:
        qualities = {
            "": None,
            "useful": rollout_pb2.DOCUMENT_QUALITY_USEFUL,
            "noisy": rollout_pb2.DOCUMENT_QUALITY_NOISY,
        }
        if quality not in qualities:
            raise InvalidRequest(f"quality must be 'useful', 'noisy' or empty, got {quality!r}")
        if noise_probability is not None and not 0.0 <= noise_probability <= 1.0:
            raise InvalidRequest(f"noise_probability must be in [0, 1], got {noise_probability}")
        self.training = training
        self.quality = qualities[quality]
        self.noise_probability = noise_probability
        self._ch = _Channel(
            client_or_target, "searchrl.simulation.v1.SimulatedSearchService", timeout_s, token, options
        )
        self._stub = simulation_pb2_grpc.SimulatedSearchServiceStub(self._ch.channel)

    def request(self, query: str, top_k: int, context: SearchContext) -> simulation_pb2.SearchRequest:
        """The ``SearchRequest`` sent for one query (exposed for tests and for the verl tool)."""
        req = simulation_pb2.SearchRequest(queries=[query], top_k=top_k)
        if self.quality is not None:
            req.quality = self.quality
        elif self.noise_probability is not None:
            req.noise_probability = self.noise_probability
        elif context.step is not None and context.total_steps:
            req.curriculum.step = context.step
            req.curriculum.total_steps = context.total_steps
        if self.training:
            req.question = context.question
            req.golden_answers.extend(context.golden_answers)
        if context.seed is not None:
            # One seed per (episode seed, query): the quality draw is reproducible and differs across queries.
            digest = hashlib.sha256(f"{context.seed}\x00{query}".encode()).digest()
            req.seed = int.from_bytes(digest[:8], "big") or 1
        return req

    async def search(self, query: str, *, top_k: int, context: SearchContext) -> SearchOutcome:
        """Simulated documents for ``query``; the curriculum step and (training) question/answers come from ``context``."""
        try:
            resp = await self._stub.Search(self.request(query, top_k, context), **self._ch.call_kwargs())
        except grpc.aio.AioRpcError as exc:
            return SearchOutcome([], self.name, error=_rpc_error(exc))
        if not resp.results:
            return SearchOutcome([], self.name, error="the simulator returned no result for the query")
        result = resp.results[0]
        return SearchOutcome(list(result.documents), self.name, cache_hit=result.cache_hit)

    async def close(self) -> None:
        """Closes the channel when this backend opened it."""
        await self._ch.close()


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


def build_search_backend(
    kind: str,
    *,
    retriever_target: str = "",
    simulator_target: str = "",
    mix_ratio: float = 0.5,
    training: bool = True,
    seed: int = 0,
    timeout_s: float = 30.0,
    token: str = "",
    options: Any = None,
) -> Any:
    """A backend by name: ``"retriever"``, ``"simulator"``, ``"mixed"`` (retriever share ``mix_ratio``) or ``"none"``.

    ``options`` (a :class:`searchrl.client.base.ChannelOptions`, e.g. ``ChannelOptions.from_env()``) carries TLS
    and the token for the channels; ``token`` alone gives plaintext with a bearer token.

    Raises:
        InvalidRequest: unknown kind, or the target it needs is empty.
    """
    if kind == "none":
        return NoSearch()
    if kind in ("retriever", "mixed") and not retriever_target:
        raise InvalidRequest(f"search backend {kind!r} needs a retriever target")
    if kind in ("simulator", "mixed") and not simulator_target:
        raise InvalidRequest(f"search backend {kind!r} needs a simulator target")
    if kind == "retriever":
        return RetrieverSearch(retriever_target, timeout_s=timeout_s, token=token, options=options)
    if kind == "simulator":
        return SimulatorSearch(
            simulator_target, training=training, timeout_s=max(timeout_s, 60.0), token=token, options=options
        )
    if kind == "mixed":
        return MixedSearch(
            RetrieverSearch(retriever_target, timeout_s=timeout_s, token=token, options=options),
            SimulatorSearch(
                simulator_target, training=training, timeout_s=max(timeout_s, 60.0), token=token, options=options
            ),
            ratio=mix_ratio,
            seed=seed,
        )
    raise InvalidRequest(f"unknown search backend {kind!r}; expected retriever, simulator, mixed or none")
