"""Typed async client of ``searchrl.simulation.v1.SimulatedSearchService`` (ZeroSearch simulated search)."""

from __future__ import annotations

from collections.abc import Sequence

from searchrl.client.base import BaseClient, ChannelOptions
from searchrl.errors import InvalidRequest
from searchrl.rollout.v1 import rollout_pb2
from searchrl.simulation.v1 import simulation_pb2, simulation_pb2_grpc

_QUALITY = {
    "useful": rollout_pb2.DOCUMENT_QUALITY_USEFUL,
    "noisy": rollout_pb2.DOCUMENT_QUALITY_NOISY,
}


class SimulatorClient(BaseClient):
    """Asks a SimulatedSearchService for simulated documents.

    Args:
        target: ``host:port`` (or ``dns:///name:port`` to spread calls over replicas).
        options: TLS, token, deadline and retry settings (:class:`searchrl.client.base.ChannelOptions`); LLM
            simulation is slow on CPU, so give it a generous ``timeout_s``.

    Example:
        >>> async with SimulatorClient("127.0.0.1:50053") as sc:
        ...     resp = await sc.search(["capital of France"], top_k=5, curriculum=(120, 200), seed=7)
        ...     [r.quality for r in resp.results]
    """

    service_name = simulation_pb2.DESCRIPTOR.services_by_name["SimulatedSearchService"].full_name

    def __init__(self, target: str, options: ChannelOptions | None = None) -> None:
        super().__init__(target, options)
        self.stub = simulation_pb2_grpc.SimulatedSearchServiceStub(self.channel)

    @staticmethod
    def build_request(
        queries: Sequence[str],
        top_k: int = 0,
        *,
        quality: str | int | None = None,
        noise_probability: float | None = None,
        curriculum: tuple[int, int] | None = None,
        question: str = "",
        golden_answers: Sequence[str] = (),
        seed: int = 0,
        skip_cache: bool = False,
    ) -> simulation_pb2.SearchRequest:
        """The ``SearchRequest`` for :meth:`search` (at most one quality source).

        Raises:
            InvalidRequest: more than one of ``quality``/``noise_probability``/``curriculum``, or an unknown quality name.
        """
        given = [x is not None for x in (quality, noise_probability, curriculum)]
        if sum(given) > 1:
            raise InvalidRequest("give at most one of quality, noise_probability and curriculum")
        req = simulation_pb2.SearchRequest(
            queries=list(queries),
            top_k=top_k,
            question=question,
            golden_answers=list(golden_answers),
            seed=seed,
            skip_cache=skip_cache,
        )
        if quality is not None:
            if isinstance(quality, str):
                if quality.lower() not in _QUALITY:
                    raise InvalidRequest(f"quality must be 'useful' or 'noisy', got {quality!r}")
                req.quality = _QUALITY[quality.lower()]
            else:
                req.quality = int(quality)  # type: ignore[assignment]
        elif noise_probability is not None:
            req.noise_probability = float(noise_probability)
        elif curriculum is not None:
            req.curriculum.step, req.curriculum.total_steps = int(curriculum[0]), int(curriculum[1])
        return req

    async def search(
        self,
        queries: Sequence[str],
        top_k: int = 0,
        *,
        quality: str | int | None = None,
        noise_probability: float | None = None,
        curriculum: tuple[int, int] | None = None,
        question: str = "",
        golden_answers: Sequence[str] = (),
        seed: int = 0,
        skip_cache: bool = False,
        timeout_s: float | None = None,
    ) -> simulation_pb2.SearchResponse:
        """Simulated documents for ``queries``.

        Args:
            queries: 1 to the server's max batch of non-empty queries.
            top_k: documents per query (1-20; 0 is the server default, 5).
            quality: ``"useful"``/``"noisy"`` (or the proto enum value) for every query.
            noise_probability: probability in [0, 1] that a query gets noisy documents, drawn per query.
            curriculum: ``(step, total_steps)``: the server's curriculum computes the noise probability.
            question: the original question (training-time conditioning; leave empty at evaluation).
            golden_answers: its gold answers (training-time conditioning).
            seed: replay seed of the per-query quality draw (0: unseeded).
            skip_cache: neither read nor write the server's search cache.
            timeout_s: deadline of this call (default: the channel options' ``timeout_s``).

        Returns:
            The response: one ``QueryResult`` (query, quality used, ``top_k`` documents, cache_hit) per query, and the
            noise probability used (-1 for a fixed quality).

        Raises:
            InvalidRequest: conflicting quality sources (checked before any call).
            grpc.aio.AioRpcError: ``INVALID_ARGUMENT`` (bad input), ``UNAVAILABLE`` (engine down),
                ``DEADLINE_EXCEEDED`` (engine or call too slow).
        """
        req = self.build_request(
            queries,
            top_k,
            quality=quality,
            noise_probability=noise_probability,
            curriculum=curriculum,
            question=question,
            golden_answers=golden_answers,
            seed=seed,
            skip_cache=skip_cache,
        )
        return await self.stub.Search(req, **self.call_kwargs(timeout_s))

    async def info(self, timeout_s: float | None = None) -> simulation_pb2.GetSimulatorInfoResponse:
        """Engine, model and curriculum parameters of the server."""
        return await self.stub.GetSimulatorInfo(simulation_pb2.GetSimulatorInfoRequest(), **self.call_kwargs(timeout_s))
