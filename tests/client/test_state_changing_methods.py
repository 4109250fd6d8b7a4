"""Methods that change a server's state (#17). The protos mark every other method ``idempotency_level =
NO_SIDE_EFFECTS``. The SDK retries only those (gRPC's retry policy: UNAVAILABLE and RESOURCE_EXHAUSTED, backoff with
jitter, within the caller's deadline), and with auth on only the admin token may call the others (LoadWeights). A
real PolicyService server on loopback answers with chosen statuses; the tests count the attempts that reach it."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import grpc
import pytest

from searchrl.client import ChannelOptions
from searchrl.client.policy import PolicyClient
from searchrl.client.retrieval import RetrievalClient
from searchrl.policy.v1 import policy_pb2, policy_pb2_grpc
from searchrl.serving.methods import changes_state, retryable_methods
from searchrl.serving.runtime import GrpcServer, ServerConfig, ServiceSpec


class Flaky(policy_pb2_grpc.PolicyServiceServicer):
    """Refuses the first ``failures`` calls of each method with ``code``, then answers."""

    def __init__(self, code: grpc.StatusCode, failures: int) -> None:
        self.code = code
        self.failures = failures
        self.calls: Counter[str] = Counter()

    async def _maybe_fail(self, method: str, context: Any) -> None:
        self.calls[method] += 1
        if self.calls[method] <= self.failures:
            await context.abort(self.code, f"{method} refused on purpose ({self.calls[method]})")

    async def GetModelInfo(self, request: Any, context: Any) -> policy_pb2.GetModelInfoResponse:  # noqa: N802
        await self._maybe_fail("GetModelInfo", context)
        return policy_pb2.GetModelInfoResponse(model="m", policy_version="v1")

    async def LoadWeights(self, request: Any, context: Any) -> policy_pb2.LoadWeightsResponse:  # noqa: N802
        await self._maybe_fail("LoadWeights", context)
        return policy_pb2.LoadWeightsResponse(policy_version="v2")


async def _serve(servicer: Flaky, **config: Any) -> GrpcServer:
    spec = ServiceSpec(
        policy_pb2.DESCRIPTOR.services_by_name["PolicyService"].full_name,
        servicer,
        policy_pb2_grpc.add_PolicyServiceServicer_to_server,
    )
    server = GrpcServer(ServerConfig(**{"grpc_port": 0, "metrics_port": -1, **config}), [spec], "retries")
    await server.start()
    return server


def test_the_proto_marks_every_method_but_load_weights_retryable() -> None:
    assert changes_state("/searchrl.policy.v1.PolicyService/LoadWeights")
    assert not changes_state("/searchrl.policy.v1.PolicyService/Generate")
    assert not changes_state("/no.such.Service/Method")
    assert retryable_methods("searchrl.policy.v1.PolicyService") == ["Generate", "Rollout", "GetModelInfo"]
    assert retryable_methods(RetrievalClient.service_name) == ["Search", "GetIndexInfo"]
    assert retryable_methods("no.such.Service") == []


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
async def test_idempotent_calls_are_retried_and_weight_loads_are_not(code: grpc.StatusCode) -> None:
    servicer = Flaky(code, failures=2)
    server = await _serve(servicer)
    client = PolicyClient(f"127.0.0.1:{server.port}", ChannelOptions(timeout_s=20))
    try:
        info = await client.model_info()  # two refusals, then an answer: three attempts reach the server
        assert info.policy_version == "v1" and servicer.calls["GetModelInfo"] == 3
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.load_weights("/ckpt")
        assert err.value.code() == code and servicer.calls["LoadWeights"] == 1, "LoadWeights must not be retried"
    finally:
        await client.close()
        await server.stop(0)


async def test_with_wait_for_ready_a_weight_load_waits_for_a_restarting_server_and_is_still_sent_once() -> None:
    """A trainer pushes weights while its PolicyService restarts: with ``wait_for_ready`` (the trainer's channels) the
    LoadWeights call waits, within its deadline, for the server to listen and is then sent once; without it the call
    fails at once with UNAVAILABLE. A refusal by a live server is still not retried."""
    import asyncio

    from searchrl.testing import free_port

    port = free_port()
    impatient = PolicyClient(f"127.0.0.1:{port}", ChannelOptions(timeout_s=20))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await impatient.load_weights("/ckpt", timeout_s=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    await impatient.close()

    client = PolicyClient(f"127.0.0.1:{port}", ChannelOptions(timeout_s=20, wait_for_ready=True))
    servicer = Flaky(grpc.StatusCode.OK, failures=0)
    pending = asyncio.create_task(client.load_weights("/ckpt", timeout_s=30))
    await asyncio.sleep(2.0)  # nothing listens yet: the call waits instead of failing
    assert not pending.done()
    server = await _serve(servicer, grpc_port=port)
    try:
        assert (await pending).policy_version == "v2" and servicer.calls["LoadWeights"] == 1
        servicer.code, servicer.failures = grpc.StatusCode.UNAVAILABLE, 10**6
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.load_weights("/ckpt", timeout_s=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and servicer.calls["LoadWeights"] == 2
    finally:
        await client.close()
        await server.stop(0)


async def test_retries_stop_at_the_callers_deadline() -> None:
    servicer = Flaky(grpc.StatusCode.RESOURCE_EXHAUSTED, failures=10**6)
    server = await _serve(servicer)
    client = PolicyClient(f"127.0.0.1:{server.port}", ChannelOptions(timeout_s=20))
    try:
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.model_info(timeout_s=0.3)
        took = time.monotonic() - t0
        assert err.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert took < 2.0, f"retries ran {took:.1f}s past a 0.3 s deadline"
        assert 1 <= servicer.calls["GetModelInfo"] <= 5
    finally:
        await client.close()
        await server.stop(0)


async def test_with_auth_on_only_the_admin_token_may_load_weights(tmp_path: Any) -> None:
    (tmp_path / "admin").write_text("admin-secret-1\n")
    servicer = Flaky(grpc.StatusCode.OK, failures=0)
    server = await _serve(servicer, auth_token="service-secret-1", admin_token_file=str(tmp_path / "admin"))
    target = f"127.0.0.1:{server.port}"
    user = PolicyClient(target, ChannelOptions(timeout_s=10, token="service-secret-1"))
    admin = PolicyClient(target, ChannelOptions(timeout_s=10, token="admin-secret-1"))
    try:
        assert (await user.model_info()).policy_version == "v1"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await user.load_weights("/ckpt")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs the admin token" in (err.value.details() or "")
        assert servicer.calls["LoadWeights"] == 0, "a refused call must not reach the servicer"
        assert (await admin.load_weights("/ckpt")).policy_version == "v2"
        assert (await admin.model_info()).policy_version == "v1"  # the admin token passes the auth check too
    finally:
        await user.close()
        await admin.close()
        await server.stop(0)


async def test_with_auth_on_and_no_admin_token_nobody_may_load_weights() -> None:
    servicer = Flaky(grpc.StatusCode.OK, failures=0)
    server = await _serve(servicer, auth_token="service-secret-1")
    user = PolicyClient(f"127.0.0.1:{server.port}", ChannelOptions(timeout_s=10, token="service-secret-1"))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await user.load_weights("/ckpt")
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "no admin token" in (err.value.details() or "")
        assert servicer.calls["LoadWeights"] == 0
    finally:
        await user.close()
        await server.stop(0)


def test_the_trainer_s_client_sends_the_admin_token_when_the_environment_has_one(tmp_path: Any) -> None:
    env = {"SEARCHRL_AUTH_TOKEN": "service-secret-1", "SEARCHRL_ADMIN_TOKEN": "admin-secret-1"}
    assert ChannelOptions.from_env(env).token == "service-secret-1"
    assert ChannelOptions.from_env(env, admin=True).token == "admin-secret-1"
    (tmp_path / "admin").write_text("admin-secret-2\n")
    assert ChannelOptions.from_env({**env, "SEARCHRL_ADMIN_TOKEN_FILE": str(tmp_path / "admin")}, admin=True).token == (
        "admin-secret-2"
    )
    assert ChannelOptions.from_env({"SEARCHRL_AUTH_TOKEN": "service-secret-1"}, admin=True).token == "service-secret-1"
    # The server side: an admin token file that is not there (the chart's optional key) means no admin token.
    cfg = ServerConfig(auth_token="service-secret-1", admin_token_file=str(tmp_path / "absent"))
    assert cfg.resolved_admin_token() == ""
