"""Typed async client of ``searchrl.policy.v1.PolicyService``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from searchrl.client.base import BaseClient, ChannelOptions
from searchrl.errors import InvalidRequest
from searchrl.policy.v1 import policy_pb2, policy_pb2_grpc
from searchrl.rollout.v1 import rollout_pb2


class PolicyClient(BaseClient):
    """Generates, runs episodes and hot-swaps weights on a PolicyService.

    Args:
        target: ``host:port`` (or ``dns:///name:port`` to spread calls over replicas).
        options: TLS, token, deadline and retry settings (default deadline here: 600 s, episodes are long on CPU).

    Example:
        >>> async with PolicyClient("127.0.0.1:50054") as pc:
        ...     resp = await pc.generate(text="The capital of France is", max_new_tokens=8, temperature=0)
        ...     traj = await pc.rollout("Who wrote Dracula?", ["Bram Stoker"])
    """

    service_name = policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name

    def __init__(self, target: str, options: ChannelOptions | None = None) -> None:
        super().__init__(target, options or ChannelOptions(timeout_s=600.0))
        self.stub = policy_pb2_grpc.PolicyServiceStub(self.channel)

    @staticmethod
    def sampling(
        *,
        max_new_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> policy_pb2.SamplingParams:
        """A ``SamplingParams`` message (``None`` leaves a field unset so the server default applies)."""
        msg = policy_pb2.SamplingParams(max_new_tokens=max_new_tokens, top_k=top_k, stop=list(stop), seed=seed or 0)
        if temperature is not None:
            msg.temperature = temperature
        if top_p is not None:
            msg.top_p = top_p
        return msg

    async def generate(
        self,
        *,
        text: str | None = None,
        token_ids: Sequence[int] | None = None,
        max_new_tokens: int = 0,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int = 0,
        stop: Sequence[str] = (),
        seed: int | None = None,
        n: int = 1,
        timeout_s: float | None = None,
    ) -> policy_pb2.GenerateResponse:
        """Samples ``n`` completions of a prompt given as ``text`` or ``token_ids``.

        Raises:
            InvalidRequest: neither or both of ``text`` and ``token_ids``.
            grpc.aio.AioRpcError: the server's status (INVALID_ARGUMENT for bad input, UNAVAILABLE when down).
        """
        if (text is None) == (token_ids is None):
            raise InvalidRequest("give exactly one of text or token_ids")
        req = policy_pb2.GenerateRequest(
            sampling=self.sampling(
                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, stop=stop, seed=seed
            ),
            n=n,
        )
        if text is not None:
            req.text = text
        else:
            req.token_ids.ids.extend(token_ids or [])
        call: Any = self.stub.Generate(req, **self.call_kwargs(timeout_s))  # grpc.aio call (the .pyi stubs are sync)
        resp: policy_pb2.GenerateResponse = await call
        return resp

    def rollout_stream(
        self, request: policy_pb2.RolloutRequest, timeout_s: float | None = None
    ) -> AsyncIterator[policy_pb2.RolloutResponse]:
        """The raw ``Rollout`` stream: each ``Turn`` as it finishes, then the ``Trajectory``."""
        stream: AsyncIterator[policy_pb2.RolloutResponse] = self.stub.Rollout(request, **self.call_kwargs(timeout_s))  # type: ignore[assignment,unused-ignore]
        return stream

    async def rollout(
        self,
        question: str,
        golden_answers: Sequence[str] = (),
        *,
        template: str = "",
        search_backend: str = "",
        top_k: int = 0,
        max_turns: int = 0,
        max_response_tokens: int = 0,
        sampling: policy_pb2.SamplingParams | None = None,
        question_id: str = "",
        timeout_s: float | None = None,
    ) -> rollout_pb2.Trajectory:
        """Runs one episode and returns its trajectory (with the reward when ``golden_answers`` are given).

        Raises:
            grpc.aio.AioRpcError: the server's status.
            RuntimeError: the stream ended without a trajectory.
        """
        req = policy_pb2.RolloutRequest(
            question=question,
            golden_answers=list(golden_answers),
            template=template,
            search_backend=search_backend,
            top_k=top_k,
            max_turns=max_turns,
            max_response_tokens=max_response_tokens,
            question_id=question_id,
        )
        if sampling is not None:
            req.sampling.CopyFrom(sampling)
        async for event in self.rollout_stream(req, timeout_s):
            if event.WhichOneof("event") == "trajectory":
                return event.trajectory
        raise RuntimeError("the Rollout stream ended without a trajectory")

    async def model_info(self, timeout_s: float | None = None) -> policy_pb2.GetModelInfoResponse:
        """The loaded model's description (name, engine, version, vocabulary, context)."""
        call: Any = self.stub.GetModelInfo(policy_pb2.GetModelInfoRequest(), **self.call_kwargs(timeout_s))
        resp: policy_pb2.GetModelInfoResponse = await call
        return resp

    async def load_weights(
        self, path: str, policy_version: str = "", timeout_s: float | None = None
    ) -> policy_pb2.LoadWeightsResponse:
        """Hot-swaps the server's weights from a checkpoint directory readable by the server."""
        call: Any = self.stub.LoadWeights(
            policy_pb2.LoadWeightsRequest(path=path, policy_version=policy_version), **self.call_kwargs(timeout_s)
        )
        resp: policy_pb2.LoadWeightsResponse = await call
        return resp
