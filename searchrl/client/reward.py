"""Typed async client of ``searchrl.reward.v1.RewardService``."""

from __future__ import annotations

from collections.abc import Sequence

from searchrl.client.base import BaseClient, ChannelOptions
from searchrl.errors import InvalidRequest
from searchrl.reward.scoring import SCHEMES, ScoreResult
from searchrl.reward.v1 import reward_pb2, reward_pb2_grpc

_ENUM_BY_SCHEME = {
    "research": reward_pb2.REWARD_SCHEME_RESEARCH,
    "search_r1_em": reward_pb2.REWARD_SCHEME_SEARCH_R1_EM,
    "search_r1_structured": reward_pb2.REWARD_SCHEME_SEARCH_R1_STRUCTURED,
    "zerosearch_f1": reward_pb2.REWARD_SCHEME_ZEROSEARCH_F1,
}


class RewardClient(BaseClient):
    """Scores responses on a RewardService.

    Args:
        target: ``host:port`` (or ``dns:///name:port`` to spread calls over replicas).
        options: TLS, token, deadline and retry settings (:class:`searchrl.client.base.ChannelOptions`).

    Example:
        >>> async with RewardClient("127.0.0.1:50051") as rc:
        ...     [r] = await rc.score(["<think>.</think><answer>\\\\boxed{Paris}</answer>"], [["Paris"]])
    """

    service_name = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name

    def __init__(self, target: str, options: ChannelOptions | None = None) -> None:
        super().__init__(target, options)
        self.stub = reward_pb2_grpc.RewardServiceStub(self.channel)

    async def score(
        self,
        responses: Sequence[str],
        golden_answers: Sequence[str | Sequence[str]],
        scheme: str = "research",
        ended_with_eos: bool | Sequence[bool] | None = None,
        timeout_s: float | None = None,
    ) -> list[ScoreResult]:
        """Scores a batch in one call.

        Args:
            responses: N response texts.
            golden_answers: N entries, each one gold answer or a list of them.
            scheme: one of :data:`searchrl.reward.scoring.SCHEMES`.
            ended_with_eos: one flag for all, N flags, or ``None`` (all True).
            timeout_s: deadline of this call (default: the channel options' ``timeout_s``).

        Returns:
            N results in input order. Floats come back at the proto's float32 precision.

        Raises:
            InvalidRequest: unknown scheme or mismatched lengths (checked before any call).
            grpc.aio.AioRpcError: the server rejected the call (``INVALID_ARGUMENT`` with its message, ...).
        """
        if scheme not in _ENUM_BY_SCHEME:
            raise InvalidRequest(f"unknown reward scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
        n = len(responses)
        if len(golden_answers) != n:
            raise InvalidRequest(f"got {n} responses but {len(golden_answers)} gold-answer lists")
        if ended_with_eos is None or isinstance(ended_with_eos, bool):
            flags = [True if ended_with_eos is None else ended_with_eos] * n
        else:
            flags = list(ended_with_eos)
            if len(flags) != n:
                raise InvalidRequest(f"got {n} responses but {len(flags)} ended_with_eos flags")
        request = reward_pb2.ScoreRequest(scheme=_ENUM_BY_SCHEME[scheme])
        add = request.items.add
        for resp, golds, eos in zip(responses, golden_answers, flags, strict=True):
            add(response=resp, golden_answers=[golds] if isinstance(golds, str) else list(golds), ended_with_eos=eos)
        reply = await self.stub.Score(request, **self.call_kwargs(timeout_s))
        return [ScoreResult(r.reward, r.f1, r.em, r.format_ok, r.format_error, r.answer) for r in reply.results]
