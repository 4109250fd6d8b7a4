"""RewardService: ``searchrl.reward.v1.RewardService/Score`` on the shared gRPC runtime (``searchrl serve reward``).

Scores batches with :mod:`searchrl.reward.scoring`. Bad input never reaches the scorer: an empty or
oversized batch, a response over ``max_response_chars``, an item without gold answers, an unspecified or unknown
scheme, and bytes protobuf cannot parse (e.g. a string that is not valid UTF-8) all get ``INVALID_ARGUMENT`` with a
message naming the item (or, for unparsable bytes, protobuf's parse error).

Metrics (besides the runtime's per-RPC ones): ``searchrl_reward_scored_total{scheme,format_ok}`` and the
``searchrl_reward_value{scheme}`` histogram.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate
from typing import Any

import grpc
from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from searchrl.errors import InvalidRequest
from searchrl.reward import scoring
from searchrl.reward.v1 import reward_pb2, reward_pb2_grpc
from searchrl.serving.config import field
from searchrl.serving.runtime import ServerConfig, ServiceSpec, run_service

log = logging.getLogger("searchrl.reward")

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name

#: proto enum value -> library scheme name
SCHEME_BY_ENUM: dict[int, str] = {
    reward_pb2.REWARD_SCHEME_RESEARCH: scoring.RESEARCH,
    reward_pb2.REWARD_SCHEME_SEARCH_R1_EM: scoring.SEARCH_R1_EM,
    reward_pb2.REWARD_SCHEME_SEARCH_R1_STRUCTURED: scoring.SEARCH_R1_STRUCTURED,
    reward_pb2.REWARD_SCHEME_ZEROSEARCH_F1: scoring.ZEROSEARCH_F1,
}
ENUM_BY_SCHEME: dict[str, int] = {v: k for k, v in SCHEME_BY_ENUM.items()}

REWARD_SCORED = Counter(
    "searchrl_reward_scored_total",
    "Responses scored, by reward scheme and whether the format held.",
    ["scheme", "format_ok"],
)


class BatchHistogram:
    """A labelled Prometheus histogram fed a whole batch at a time.

    ``prometheus_client.Histogram.observe`` takes a lock and walks the buckets for every value (several microseconds
    each, a large share of the per-response cost of the service); this collector bins a batch with ``bisect`` and
    merges it under one lock. It exposes the standard ``_bucket``/``_count``/``_sum`` samples.

    Args:
        name: metric name.
        documentation: help text.
        label: the one label name.
        buckets: upper bounds, increasing (``+Inf`` is added).
        registry: where to register (``None``: do not register).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        buckets: Sequence[float],
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self.bounds = sorted(float(b) for b in buckets)
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        if registry is not None:
            registry.register(self)

    def observe_many(self, label_value: str, values: Sequence[float]) -> None:
        """Adds ``values`` to the series ``label_value``."""
        bounds = self.bounds
        counts = [0] * (len(bounds) + 1)
        for v in values:
            counts[bisect_left(bounds, v)] += 1  # first bucket whose upper bound is >= v ("le" semantics)
        total = float(sum(values))
        with self._lock:
            series = self._counts.setdefault(label_value, [0] * (len(bounds) + 1))
            for i, c in enumerate(counts):
                series[i] += c
            self._sums[label_value] = self._sums.get(label_value, 0.0) + total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        """Prometheus collector protocol."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label])
        with self._lock:
            snapshot = [(k, list(v), self._sums[k]) for k, v in self._counts.items()]
        for label_value, counts, total in snapshot:
            cumulative = list(accumulate(counts))
            buckets = [(floatToGoString(b), float(c)) for b, c in zip(self.bounds, cumulative, strict=False)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([label_value], buckets, sum_value=total)
        yield family

    def describe(self) -> list[HistogramMetricFamily]:
        """Metric description for the registry's duplicate check (no samples)."""
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.label])]


REWARD_VALUE = BatchHistogram(
    "searchrl_reward_value",
    "Distribution of the rewards given, by scheme.",
    "scheme",
    buckets=(0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99, 1.0),
)


class RewardConfig(ServerConfig):
    """Settings of ``searchrl serve reward`` (``--max-batch-size`` ..., env ``SEARCHRL_REWARD_MAX_BATCH_SIZE`` ...)."""

    max_batch_size: int = field(8192, help="Most items one Score call may carry.")
    max_response_chars: int = field(65536, help="Longest response accepted, in characters.")
    search_r1_info_tag: str = field(
        scoring.DEFAULT_INFO_TAG, help="Document tag of the Search-R1 structured format ('information', or 'result')."
    )
    offload_min_batch: int = field(
        1024,
        help="Score batches of at least this many items in a worker thread so the event loop keeps answering health "
        "checks (an 8k batch scored inline blocks it for about a second); smaller batches are scored inline, which is "
        "faster under the GIL (benchmarks/reward_bench.py). 0: always inline.",
    )


class RewardServicer:
    """Implements ``RewardService/Score``.

    Args:
        config: the service config (limits, document tag, thread offload threshold).
    """

    def __init__(self, config: RewardConfig) -> None:
        self.config = config

    def _check_header(self, request: Any) -> str:
        """Batch-level checks (cheap, on the event loop); returns the scheme name."""
        n = len(request.items)
        if n == 0:
            raise InvalidRequest("empty batch: send at least one item")
        if n > self.config.max_batch_size:
            raise InvalidRequest(f"batch of {n} items is over the limit of {self.config.max_batch_size}; split it")
        scheme = SCHEME_BY_ENUM.get(request.scheme)
        if scheme is None:
            if request.scheme == reward_pb2.REWARD_SCHEME_UNSPECIFIED:
                raise InvalidRequest("scheme is unspecified: set ScoreRequest.scheme (e.g. REWARD_SCHEME_RESEARCH)")
            raise InvalidRequest(f"unknown reward scheme value {request.scheme}")
        return scheme

    def _score(self, request: reward_pb2.ScoreRequest, scheme: str) -> reward_pb2.ScoreResponse:
        """Item checks, scoring, metrics and the reply, in one pass over the items (each proto access costs)."""
        limit = self.config.max_response_chars
        responses: list[str] = []
        golds: list[list[str]] = []
        eos: list[bool] = []
        for i, item in enumerate(request.items):
            response = item.response
            if len(response) > limit:
                raise InvalidRequest(f"items[{i}].response has {len(response)} characters; the limit is {limit}")
            answers = list(item.golden_answers)
            if not any(g and not g.isspace() for g in answers):
                raise InvalidRequest(
                    f"items[{i}] has no gold answers: give at least one non-empty golden_answers entry"
                )
            responses.append(response)
            golds.append(answers)
            eos.append(item.ended_with_eos)
        results = scoring.score_batch(responses, golds, scheme, eos, info_tag=self.config.search_r1_info_tag)
        out = reward_pb2.ScoreResponse()
        add = out.results.add
        n_ok = 0
        for r in results:
            add(reward=r.reward, f1=r.f1, em=r.em, format_ok=r.format_ok, format_error=r.format_error, answer=r.answer)
            n_ok += r.format_ok
        REWARD_VALUE.observe_many(scheme, [r.reward for r in results])
        if n_ok:
            REWARD_SCORED.labels(scheme, "true").inc(n_ok)
        if len(results) - n_ok:
            REWARD_SCORED.labels(scheme, "false").inc(len(results) - n_ok)
        return out

    async def Score(  # noqa: N802
        self, request: reward_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> reward_pb2.ScoreResponse:
        """Scores a batch; see the module docstring for the validation rules.

        Raises:
            InvalidRequest: any bad input (mapped to INVALID_ARGUMENT by the runtime).
        """
        scheme = self._check_header(request)
        threshold = self.config.offload_min_batch
        if threshold and len(request.items) >= threshold:
            return await asyncio.to_thread(self._score, request, scheme)
        return self._score(request, scheme)


def specs(config: RewardConfig) -> list[ServiceSpec]:
    """The RewardService spec for a :class:`~searchrl.serving.runtime.GrpcServer`."""
    if config.max_batch_size < 1 or config.max_response_chars < 1:
        raise ValueError("--max-batch-size and --max-response-chars must be positive")
    scoring.search_r1_format_error("", config.search_r1_info_tag)  # validates the tag name at start-up
    return [ServiceSpec(SERVICE_NAME, RewardServicer(config), reward_pb2_grpc.add_RewardServiceServicer_to_server)]


async def build(config: RewardConfig) -> tuple[list[ServiceSpec], None]:
    """``run_service`` factory: the servicer needs no resources to clean up."""
    return specs(config), None


def main(argv: Sequence[str] | None = None) -> int:
    """``searchrl serve reward [flags]``; returns the exit code."""
    description = "Reward scoring service (ReSearch, Search-R1, ZeroSearch)."
    return int(run_service(RewardConfig, "reward", build, argv, description=description))


if __name__ == "__main__":
    raise SystemExit(main())
