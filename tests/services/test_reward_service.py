"""RewardService end to end: a real ``searchrl serve reward`` process and in-process ``GrpcServer``s, over loopback.

Covers the SDK, a reflection-driven dynamic call (grpcurl-style), health NOT_SERVING on SIGTERM, Prometheus metrics,
every bad input (INVALID_ARGUMENT, server keeps serving), bearer-token auth and TLS.
"""

from __future__ import annotations

import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from searchrl.client.base import ChannelOptions
from searchrl.client.reward import RewardClient
from searchrl.errors import InvalidRequest
from searchrl.reward import scoring
from searchrl.reward.v1 import reward_pb2, reward_pb2_grpc
from searchrl.services.reward.server import SERVICE_NAME, RewardConfig, main, specs
from searchrl.serving.runtime import GrpcServer
from searchrl.testing import ServiceProcess, self_signed_certificate

GOOD = "<think> Zola. </think> <search> Germinal author </search> <result> Zola wrote it. </result> <think> ok </think> <answer> \\boxed{Émile Zola} </answer>"
WRONG = "<think> guess </think> <answer> \\boxed{Victor Hugo} </answer>"
SR1 = "<think> a </think> <answer> Paris </answer>"
SCORE_METHOD = f"/{SERVICE_NAME}/Score"


@pytest.fixture(scope="module")
def server() -> Iterator[ServiceProcess]:
    with ServiceProcess("reward", ["--max-batch-size", "8192"], timeout_s=120) as proc:
        yield proc


def scrape(metrics_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the /metrics page, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


# ------------------------------------------------------------------------------------------------------ happy path


async def test_score_through_the_sdk_matches_the_library(server: ServiceProcess) -> None:
    responses = [GOOD, WRONG, GOOD, SR1]
    golds = [["Emile Zola", "Émile Zola"], ["Émile Zola"], ["Zola"], ["Paris"]]
    eos = [True, True, False, True]
    async with RewardClient(server.target) as client:
        got = await client.score(responses, golds, "research", ended_with_eos=eos)
        structured = await client.score([SR1, SR1 + " tail"], ["Paris", "Paris"], "search_r1_structured")
    expected = scoring.score_batch(responses, golds, "research", eos)
    assert len(got) == 4
    for g, e in zip(got, expected, strict=True):
        assert (g.format_ok, g.format_error, g.answer, g.em) == (e.format_ok, e.format_error, e.answer, e.em)
        assert g.reward == pytest.approx(e.reward, abs=1e-6) and g.f1 == pytest.approx(e.f1, abs=1e-6)
    assert [round(r.reward, 6) for r in got] == [1.0, 0.1, 0.0, 0.0]  # SR1 has no think/boxed for ReSearch
    assert [round(r.reward, 6) for r in structured] == [1.0, 0.8]


def test_reflection_lists_the_service_and_calls_score_dynamically(server: ServiceProcess) -> None:
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = db.get_services()
        assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
        pool = descriptor_pool.DescriptorPool(db)
        method = pool.FindServiceByName(SERVICE_NAME).FindMethodByName("Score")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        assert request_cls is not reward_pb2.ScoreRequest  # built from reflection, not from our generated code
        scheme = (
            method.input_type.fields_by_name["scheme"].enum_type.values_by_name["REWARD_SCHEME_ZEROSEARCH_F1"].number
        )
        request = request_cls(scheme=scheme)
        request.items.add(response="<answer> Paris France </answer>", golden_answers=["Paris"], ended_with_eos=True)
        call = channel.unary_unary(
            f"/{SERVICE_NAME}/{method.name}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        reply = call(request, timeout=10)
    assert len(reply.results) == 1
    assert reply.results[0].reward == pytest.approx(2 / 3, abs=1e-6)
    assert reply.results[0].answer == "Paris France"


async def test_metrics_count_the_calls(server: ServiceProcess) -> None:
    before = scrape(server.metrics_port)
    async with RewardClient(server.target) as client:
        await client.score([GOOD, WRONG, "no format"], [["Émile Zola"]] * 3, "research")
        await client.score([SR1, SR1], [["Paris"], ["Lyon"]], "search_r1_em")
        with pytest.raises(grpc.aio.AioRpcError):
            await client.score([GOOD], [[""]], "research")
    after = scrape(server.metrics_port)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("searchrl_reward_scored_total", scheme="research", format_ok="true") == 2
    assert delta("searchrl_reward_scored_total", scheme="research", format_ok="false") == 1
    assert delta("searchrl_reward_scored_total", scheme="search_r1_em", format_ok="true") == 2
    assert delta("searchrl_reward_value_count", scheme="research") == 3
    assert delta("searchrl_reward_value_sum", scheme="research") == pytest.approx(1.1)
    assert delta("searchrl_reward_value_bucket", scheme="research", le="0.0") == 1  # the badly formatted one
    assert delta("searchrl_grpc_requests_total", service="reward", method="Score", code="OK") == 2
    assert delta("searchrl_grpc_requests_total", service="reward", method="Score", code="INVALID_ARGUMENT") == 1


# ----------------------------------------------------------------------------------------------------- bad input


def _raw_call(target: str, payload: bytes) -> grpc.RpcError | bytes:
    """Sends hand-encoded bytes to Score through a generic channel call (no client-side serialization)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(SCORE_METHOD, request_serializer=None, response_deserializer=None)
        try:
            return call(payload, timeout=20)
        except grpc.RpcError as exc:
            return exc


def _request(n: int = 1, scheme: int = reward_pb2.REWARD_SCHEME_RESEARCH, **item: object) -> reward_pb2.ScoreRequest:
    req = reward_pb2.ScoreRequest(scheme=scheme)
    for _ in range(n):
        req.items.add(**{"response": GOOD, "golden_answers": ["Émile Zola"], "ended_with_eos": True, **item})
    return req


def _invalid_utf8_payload() -> bytes:
    req = _request(2)
    req.items[1].response = "@@PLACEHOLDER@@"
    data = req.SerializeToString()
    bad = data.replace(b"@@PLACEHOLDER@@", b"\xff\xfe\xfd" + b"x" * 12)  # same length: prefixes stay valid
    assert len(bad) == len(data)
    return bad


def _golds_invalid_utf8_payload() -> bytes:
    req = _request(1)
    req.items[0].golden_answers.append("@@GOLD@@")
    return req.SerializeToString().replace(b"@@GOLD@@", b"\xc3\x28" + b"y" * 6)


BAD_INPUTS = {
    "empty batch": (
        reward_pb2.ScoreRequest(scheme=reward_pb2.REWARD_SCHEME_RESEARCH).SerializeToString(),
        "empty batch",
    ),
    "over the batch limit": (_request(10_000).SerializeToString(), "10000 items is over the limit of 8192"),
    "invalid utf-8 response": (_invalid_utf8_payload(), "not a valid ScoreRequest"),
    "invalid utf-8 gold": (_golds_invalid_utf8_payload(), "not a valid ScoreRequest"),
    "not protobuf": (b"\xff\xff\xff\xff\xff", "not a valid ScoreRequest"),
    "missing gold answers": (_request(3, golden_answers=[]).SerializeToString(), "items[0] has no gold answers"),
    "blank gold answers": (_request(1, golden_answers=["", " "]).SerializeToString(), "items[0] has no gold answers"),
    "unspecified scheme": (_request(1, scheme=0).SerializeToString(), "scheme is unspecified"),
    "unknown scheme": (_request(1, scheme=99).SerializeToString(), "unknown reward scheme value 99"),
    "response too long": (
        _request(1, response="x" * 70_000).SerializeToString(),
        "items[0].response has 70000 characters",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(server: ServiceProcess, case: str) -> None:
    payload, message = BAD_INPUTS[case]
    err = _raw_call(server.target, payload)
    assert isinstance(err, grpc.RpcError), f"{case}: expected an error, got a reply"
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert message in (err.details() or "")
    assert "Traceback" not in (err.details() or "")
    ok = _raw_call(server.target, _request(1).SerializeToString())
    assert isinstance(ok, bytes)
    assert reward_pb2.ScoreResponse.FromString(ok).results[0].reward == pytest.approx(1.0)


async def test_sdk_rejects_bad_arguments_before_calling() -> None:
    async with RewardClient("127.0.0.1:1") as client:
        with pytest.raises(InvalidRequest, match="unknown reward scheme"):
            await client.score([GOOD], [["x"]], "nope")
        with pytest.raises(InvalidRequest, match="1 responses but 2"):
            await client.score([GOOD], [["x"], ["y"]])


# ------------------------------------------------------------------------------------------------------- shutdown


def test_health_goes_not_serving_on_sigterm_then_exits_cleanly() -> None:
    # The Watch stream is itself an in-flight call: the server's graceful stop waits for it (up to --grace-s), so the
    # NOT_SERVING update is delivered before the server goes away; the test does not race the shutdown.
    proc = ServiceProcess("reward", ["--grace-s", "3"], timeout_s=120)
    try:
        with grpc.insecure_channel(proc.target) as channel:
            stream = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30
            )
            first = next(stream)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            proc.signal(signal.SIGTERM)
            second = next(stream)
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError):  # the stream ends when the grace period runs out
                next(stream)
        assert proc.proc.wait(20) == 0
        assert "signal received, draining" in proc.output()
    finally:
        proc.stop()


def test_bad_configuration_exits_with_code_2() -> None:
    assert main(["--grpc-port", "0", "--metrics-port", "-1", "--max-batch-size", "0"]) == 2
    assert main(["--grpc-port", "0", "--metrics-port", "-1", "--search-r1-info-tag", "<x>"]) == 2


# ---------------------------------------------------------------------------------------------- in-process server


async def _start(**overrides: object) -> GrpcServer:
    cfg = RewardConfig(grpc_port=0, metrics_port=-1, grace_s=0.5, **overrides)  # type: ignore[arg-type]
    srv = GrpcServer(cfg, specs(cfg), "reward")
    await srv.start()
    return srv


@pytest.fixture
async def plain_server() -> AsyncIterator[GrpcServer]:
    srv = await _start(offload_min_batch=2)
    yield srv
    await srv.stop()


async def test_in_process_server_and_thread_offload(plain_server: GrpcServer) -> None:
    responses = [GOOD, WRONG, SR1] * 4
    golds = [["Émile Zola"], ["Émile Zola"], ["Paris"]] * 4
    async with RewardClient(f"127.0.0.1:{plain_server.port}") as client:
        offloaded = await client.score(responses, golds, "zerosearch_f1")  # 12 >= 2: scored in a worker thread
        inline = await client.score(responses[:1], golds[:1], "zerosearch_f1")
    assert [r.reward for r in offloaded[:1]] == [r.reward for r in inline]
    expected = scoring.score_batch(responses, golds, "zerosearch_f1")
    assert [round(r.reward, 6) for r in offloaded] == [round(e.reward, 6) for e in expected]


async def test_auth_token_required_when_configured() -> None:
    srv = await _start(auth_token="s3cret-token")
    target = f"127.0.0.1:{srv.port}"
    try:
        async with RewardClient(target) as anonymous:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await anonymous.score([GOOD], [["Émile Zola"]])
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with RewardClient(target, ChannelOptions(token="wrong")) as wrong:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await wrong.score([GOOD], [["Émile Zola"]])
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        async with RewardClient(target, ChannelOptions(token="s3cret-token")) as authed:
            [r] = await authed.score([GOOD], [["Émile Zola"]])
            assert r.reward == pytest.approx(1.0)
        # Kubernetes probes need no token
        async with grpc.aio.insecure_channel(target) as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await srv.stop()


def _self_signed(tmp: Path) -> tuple[Path, Path, bytes]:
    """A self-signed certificate for localhost / 127.0.0.1: ``(cert path, key path, cert PEM)``."""
    cert, key = self_signed_certificate(tmp)
    return cert, key, cert.read_bytes()


async def test_tls_with_a_self_signed_certificate(tmp_path: Path) -> None:
    cert, key, cert_pem = _self_signed(tmp_path)
    srv = await _start(tls_cert_file=str(cert), tls_key_file=str(key), auth_token="tls-token")
    target = f"localhost:{srv.port}"
    try:
        async with RewardClient(target, ChannelOptions(tls=True, root_ca=cert_pem, token="tls-token")) as client:
            [r] = await client.score([SR1], [["Paris"]], "search_r1_em")
            assert r.reward == 1.0
        async with RewardClient(target, ChannelOptions(tls=True, root_ca=cert_pem)) as no_token:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await no_token.score([SR1], [["Paris"]], "search_r1_em")
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # a plaintext client cannot talk to the TLS port
        async with RewardClient(target, ChannelOptions(timeout_s=2, max_attempts=2, token="tls-token")) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await plain.score([SR1], [["Paris"]], "search_r1_em")
            assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        # the stub raw: also reachable through the generated stub over the same secure channel
        creds = grpc.ssl_channel_credentials(cert_pem)
        async with grpc.aio.secure_channel(target, creds) as ch:
            stub = reward_pb2_grpc.RewardServiceStub(ch)
            reply = await stub.Score(_request(1), metadata=(("authorization", "Bearer tls-token"),), timeout=10)
            assert reply.results[0].reward == pytest.approx(1.0)
    finally:
        await srv.stop()


def test_batch_histogram_exposes_what_prometheus_histogram_would() -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from searchrl.services.reward.server import BatchHistogram

    bounds = (0.0, 0.05, 0.1, 0.5, 1.0)
    values = [0.0, 0.1, 1.0, 0.33, 0.05, 0.7, 0.1, 0.0] * 25
    reg_ref, reg_ours = CollectorRegistry(), CollectorRegistry()
    ref = Histogram("reward_value", "doc", ["scheme"], buckets=bounds, registry=reg_ref)
    ours = BatchHistogram("reward_value", "doc", "scheme", bounds, registry=reg_ours)
    for v in values:
        ref.labels("research").observe(v)
    ours.observe_many("research", values[:77])
    ours.observe_many("research", values[77:])
    expected = [ln for ln in generate_latest(reg_ref).decode().splitlines() if "_created" not in ln]
    got = generate_latest(reg_ours).decode().splitlines()
    assert [ln for ln in got if "_sum" not in ln] == [ln for ln in expected if "_sum" not in ln]
    [got_sum] = [float(ln.split()[-1]) for ln in got if "_sum{" in ln]
    [expected_sum] = [float(ln.split()[-1]) for ln in expected if "_sum{" in ln]
    assert got_sum == pytest.approx(expected_sum)  # summation order differs
