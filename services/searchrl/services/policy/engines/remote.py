"""The PolicyService as a generation backend of the agent loop (:class:`RemotePolicyBackend`).

It lives here, not in :mod:`searchrl.client.policy`: it returns the agent loop's
:class:`~searchrl.agent.loop.GenerationOutput`, and the client layer sits below the agent layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from searchrl.agent.loop import GenerationOutput
from searchrl.agent.settings import SamplingParams
from searchrl.client.policy import PolicyClient
from searchrl.errors import error_for_status


class RemotePolicyBackend:
    """A :class:`~searchrl.agent.loop.GenerationBackend` over the PolicyService ``Generate`` RPC.

    Args:
        client: the PolicyService's client.
        tokenizer: the policy's tokenizer (the agent loop tokenises prompts and observations locally).
    """

    def __init__(self, client: PolicyClient, tokenizer: Any) -> None:
        self.client = client
        self.tokenizer = tokenizer

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, *, stop: Sequence[str] = (), seed: int | None = None
    ) -> GenerationOutput:
        """Calls ``Generate`` with n=1 and returns its completion.

        Raises:
            InvalidRequest: the server rejected the request (INVALID_ARGUMENT).
            Unavailable: the server is down (after the client's retries).
            SearchRLError: any other status (:func:`searchrl.errors.error_for_status`).
        """
        try:
            resp = await self.client.generate(
                token_ids=list(prompt_ids), **sampling.model_dump(), stop=list(stop), seed=seed, n=1
            )
        except grpc.aio.AioRpcError as exc:
            raise error_for_status(
                exc.code().name, f"PolicyService {self.client.target} {exc.code().name}: {exc.details()}"
            ) from exc
        c = resp.completions[0]
        return GenerationOutput(
            token_ids=list(c.token_ids),
            logprobs=list(c.logprobs),
            text=c.text,
            finish_reason=c.finish_reason,
            policy_version=resp.policy_version,
        )
