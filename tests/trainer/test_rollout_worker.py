"""A rollout worker whose PolicyService is gone stops with UNAVAILABLE instead of polling for tasks it cannot run,
and leaves the task pending for another worker (real Redis, a real gRPC channel to a port nobody listens on)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from searchrl.client.base import ChannelOptions
from searchrl.client.policy import PolicyClient
from searchrl.errors import Unavailable
from searchrl.rollout.v1 import rollout_pb2
from searchrl.services.policy.engines.remote import RemotePolicyBackend
from searchrl.services.rollouts.queue import RolloutQueue
from searchrl.testing import free_port
from searchrl.trainer.config import load_config
from searchrl.trainer.rollout_worker import RolloutWorker


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    from searchrl.assets import policy_model_path

    return AutoTokenizer.from_pretrained(policy_model_path())


async def test_a_dead_policy_service_stops_the_worker_and_keeps_the_task(redis_url: str, tokenizer) -> None:  # type: ignore[no-untyped-def]
    prefix = f"test:{uuid.uuid4().hex[:8]}"
    cfg = load_config(None, [f"rollout.queue.redis_url={redis_url}", f"rollout.queue.prefix={prefix}",
                             "rollout.search.backend=none", "rollout.engine=remote"])  # fmt: skip
    queue = RolloutQueue(redis_url, prefix)
    await queue.ensure()
    await queue.submit([rollout_pb2.RolloutTask(task_id="run:0", question_id="q0", question="Capital of France?",
                                                golden_answers=["Paris"], group_size=2)])  # fmt: skip
    client = PolicyClient(f"127.0.0.1:{free_port()}", ChannelOptions(timeout_s=2.0, max_attempts=1))
    worker = RolloutWorker(queue, RemotePolicyBackend(client, tokenizer), None, cfg, name="w1")
    try:
        # Before the fix the failure was dropped and the worker polled on forever (this wait_for timed out).
        with pytest.raises(Unavailable):
            await asyncio.wait_for(worker.run(), timeout=60)
        stats = await queue.stats()
        assert (stats.tasks_waiting, stats.tasks_running, stats.groups_waiting) == (0, 1, 0)
    finally:
        await client.close()
        await queue.close()
