"""The PolicyService as a generation backend of the agent loop (:class:`RemotePolicyBackend`).

It lives here, not in :mod:`searchrl.client.policy`: it returns the agent loop's
:class:`~searchrl.agent.loop.GenerationOutput`, and the client layer sits below the agent layer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc

from searchrl.agent.loop import GenerationOutput
from searchrl.agent.settings import SamplingParams
from searchrl.client.policy import PolicyClient
from searchrl.errors import FailedPrecondition, error_for_status

log = logging.getLogger("searchrl.policy.remote")


class RemotePolicyBackend:
    """A :class:`~searchrl.agent.loop.GenerationBackend` over the PolicyService ``Generate`` RPC.

    Args:
        client: the PolicyService's client.
        tokenizer: the policy's tokenizer (the agent loop tokenises prompts and observations locally).

    Attributes:
        pinned: ``(policy_version, weights path)`` the server must serve, or None for any. Set by an owner of the
            weights (the sync trainer, after each ``LoadWeights``): a completion from another version (the
            PolicyService restarted and serves its start-up weights) makes the backend load ``pinned`` into the
            server again and repeat the call, so no episode is sampled from the wrong weights.
    """

    def __init__(self, client: PolicyClient, tokenizer: Any) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.pinned: tuple[str, str] | None = None
        self.reloads = 0
        self._reload_lock = asyncio.Lock()

    async def generate(
        self, prompt_ids: list[int], sampling: SamplingParams, *, stop: Sequence[str] = (), seed: int | None = None
    ) -> GenerationOutput:
        """Calls ``Generate`` with n=1 and returns its completion (from the :attr:`pinned` version when set).

        Raises:
            InvalidRequest: the server rejected the request (INVALID_ARGUMENT).
            Unavailable: the server is down (after the client's retries).
            FailedPrecondition: the server still serves another version after loading :attr:`pinned` twice.
            SearchRLError: any other status (:func:`searchrl.errors.error_for_status`).
        """
        for _attempt in range(3):
            try:
                resp = await self.client.generate(
                    token_ids=list(prompt_ids), **sampling.model_dump(), stop=list(stop), seed=seed, n=1
                )
            except grpc.aio.AioRpcError as exc:
                raise error_for_status(
                    exc.code().name, f"PolicyService {self.client.target} {exc.code().name}: {exc.details()}"
                ) from exc
            if self.pinned is None or resp.policy_version == self.pinned[0]:
                break
            await self.restore_pinned(resp.policy_version)
        else:
            raise FailedPrecondition(
                f"PolicyService {self.client.target} serves {resp.policy_version!r}, not {self.pinned[0]!r}, "
                "after loading it again twice"
            )
        c = resp.completions[0]
        return GenerationOutput(
            token_ids=list(c.token_ids),
            logprobs=list(c.logprobs),
            text=c.text,
            finish_reason=c.finish_reason,
            policy_version=resp.policy_version,
        )

    async def restore_pinned(self, served: str) -> bool:
        """Loads :attr:`pinned` into the server again unless it already serves it (once for all the calls that saw
        ``served`` at once). Also called by the async trainer when a group arrives from weights it never pushed.

        Args:
            served: the version a response or a rollout group reported (for the log line).

        Returns:
            Whether the weights were loaded (False: the server already serves :attr:`pinned`, or nothing is pinned).

        Raises:
            SearchRLError: ``GetModelInfo`` or ``LoadWeights`` failed (:func:`searchrl.errors.error_for_status`).
        """
        if self.pinned is None:
            return False
        version, path = self.pinned
        async with self._reload_lock:
            info = await self.client.model_info()
            if info.policy_version == version:
                return False  # another call reloaded it meanwhile, or ``served`` was an older group's version
            log.warning(
                "PolicyService %s serves %r instead of %r (restarted?): loading %s again", self.client.target,
                served, version, path,
            )  # fmt: skip
            await self.client.load_weights(path, policy_version=version, timeout_s=600)
            self.reloads += 1
            return True
