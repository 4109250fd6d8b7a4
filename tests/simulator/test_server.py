"""SimulatedSearchService over real gRPC: the real CPU engine, a real Redis cache, validation, dead and slow engines."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from searchrl.client.base import ChannelOptions
from searchrl.client.simulation import SimulatorClient
from searchrl.errors import InvalidRequest
from searchrl.rollout.v1 import rollout_pb2
from searchrl.serving.cache import SearchCache
from searchrl.serving.runtime import GrpcServer, ServiceSpec
from searchrl.simulation.v1 import simulation_pb2, simulation_pb2_grpc
from searchrl.simulator.curriculum import Quality, draw_qualities
from searchrl.simulator.engines import OpenAISimulationEngine
from searchrl.simulator.server import SERVICE_NAME, SimulatorConfig, SimulatorServicer, check_config
from searchrl.testing import free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

USEFUL, NOISY = rollout_pb2.DOCUMENT_QUALITY_USEFUL, rollout_pb2.DOCUMENT_QUALITY_NOISY
PROTO = {Quality.USEFUL: USEFUL, Quality.NOISY: NOISY}
QUERIES = [
    "capital of France",
    "tallest mountain",
    "who wrote Hamlet",
    "largest ocean",
    "capital of Japan",
    "first man on the moon",
]


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def _serve(config: SimulatorConfig, engine: Any, cache: Any = None) -> tuple[GrpcServer, SimulatorClient]:
    servicer = SimulatorServicer(config, engine, cache)
    spec = ServiceSpec(SERVICE_NAME, servicer, simulation_pb2_grpc.add_SimulatedSearchServiceServicer_to_server)
    server = GrpcServer(config, [spec], "simulator")
    await server.start()
    client = SimulatorClient(f"127.0.0.1:{server.port}", ChannelOptions(timeout_s=600, max_attempts=2))
    return server, client


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served(sim_engine, redis_url):
    """An in-process SimulatedSearchService on the real engine with a Redis cache in its own namespace."""
    config = SimulatorConfig(
        grpc_port=0,
        metrics_port=-1,
        redis_url=redis_url,
        top_k=2,
        tokens_per_doc=24,
        max_retries=1,
        max_batch=8,
        seed=3,
    )
    cache = SearchCache(redis_url, ttl_s=600, namespace=f"test-sim-{uuid.uuid4().hex}")
    server, client = await _serve(config, sim_engine, cache)
    yield client, cache
    await client.close()
    await server.stop(0)
    await cache.close()


async def test_k_documents_then_a_cache_hit(served, redis_client) -> None:
    client, cache = served
    hits = _metric("searchrl_search_cache_requests_total", {"backend": "simulator", "result": "hit"})
    docs_before = _metric("searchrl_simulator_documents_total", {"quality": "useful"})
    first = await client.search(QUERIES[:2], top_k=2, quality="useful")
    assert first.noise_probability == -1.0
    assert [r.query for r in first.results] == QUERIES[:2]
    ids = set()
    for r in first.results:
        assert r.quality == USEFUL and not r.cache_hit and len(r.documents) == 2
        for d in r.documents:
            assert d.id.startswith("sim-") and d.title and len(d.text.split()) >= 4 and d.quality == USEFUL
            ids.add(d.id)
    assert len(ids) == 4
    assert _metric("searchrl_simulator_documents_total", {"quality": "useful"}) - docs_before == 4
    again = await client.search(QUERIES[:2], top_k=2, quality="useful")
    assert all(r.cache_hit for r in again.results)
    assert [[d.text for d in r.documents] for r in again.results] == [
        [d.text for d in r.documents] for r in first.results
    ]
    assert _metric("searchrl_search_cache_requests_total", {"backend": "simulator", "result": "hit"}) - hits == 2
    assert len(redis_client.keys(cache.namespace + "simulator:*")) >= 2
    fresh = await client.search(QUERIES[:1], top_k=2, quality="useful", skip_cache=True)
    assert not fresh.results[0].cache_hit and len(fresh.results[0].documents) == 2


async def test_same_seed_gives_the_same_qualities(served) -> None:
    client, _ = served
    a = await client.search(QUERIES, top_k=1, noise_probability=0.5, seed=42)
    b = await client.search(QUERIES, top_k=1, noise_probability=0.5, seed=42)
    expected = [PROTO[q] for q in draw_qualities(QUERIES, 0.5, 42)]
    assert [r.quality for r in a.results] == [r.quality for r in b.results] == expected
    assert {USEFUL, NOISY} <= set(expected)  # this seed draws both kinds, so the check has teeth
    assert a.noise_probability == pytest.approx(0.5)
    assert all(r.cache_hit for r in b.results)
    assert all(d.quality == r.quality for r in a.results for d in r.documents)


async def test_curriculum_position_sets_the_noise_probability(served) -> None:
    client, _ = served
    end = await client.search(QUERIES, top_k=1, curriculum=(10, 10), seed=42)
    assert end.noise_probability == pytest.approx(0.5)
    assert [r.quality for r in end.results] == [PROTO[q] for q in draw_qualities(QUERIES, 0.5, 42)]
    assert _metric("searchrl_simulator_noise_probability") == pytest.approx(0.5)
    start = await client.search(QUERIES[:2], top_k=1, curriculum=(0, 10), seed=42)
    assert start.noise_probability == 0.0 and all(r.quality == USEFUL for r in start.results)
    info = await client.info()
    assert (info.engine, info.curriculum_start, info.curriculum_end, info.curriculum_base) == (
        "transformers",
        0.0,
        0.5,
        4.0,
    )
    assert info.model.endswith("smollm2-135m-instruct")


def _req(**kw: Any) -> simulation_pb2.SearchRequest:
    req = simulation_pb2.SearchRequest(queries=kw.pop("queries", ["capital of France"]), top_k=kw.pop("top_k", 2))
    for k, v in kw.items():
        if k == "curriculum":
            req.curriculum.step, req.curriculum.total_steps = v
        else:
            setattr(req, k, v)
    return req


@pytest.mark.parametrize(
    ("request_kw", "fragment"),
    [
        ({"queries": []}, "queries is empty"),
        ({"queries": ["ok", "  "]}, "queries[1] is empty"),
        ({"queries": ["q"] * 9}, "max batch 8"),
        ({"queries": ["x" * 1025]}, "the limit is 1024"),
        ({"top_k": 21}, "top_k must be in [0, 20]"),
        ({"top_k": -1}, "top_k must be in [0, 20]"),
        ({"quality": 7}, "quality must be"),
        ({"quality": 0}, "quality must be"),
        ({"noise_probability": 1.5}, "noise_probability must be in [0, 1]"),
        ({"noise_probability": float("nan")}, "noise_probability must be in [0, 1]"),
        ({"curriculum": (5, 0)}, "total_steps > 0"),
        ({"curriculum": (11, 10)}, "0 <= step <= total_steps"),
    ],
)
async def test_bad_input_is_invalid_argument_and_the_service_keeps_serving(served, request_kw, fragment) -> None:
    client, _ = served
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.stub.Search(_req(**request_kw), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()
    ok = await client.search(QUERIES[:1], top_k=2, quality="useful")  # cached by the first test or generated now
    assert len(ok.results[0].documents) == 2


async def test_client_rejects_conflicting_quality_sources() -> None:
    with pytest.raises(InvalidRequest):
        SimulatorClient.build_request(["q"], quality="useful", noise_probability=0.2)
    with pytest.raises(InvalidRequest):
        SimulatorClient.build_request(["q"], quality="great")
    req = SimulatorClient.build_request(["q"], 3, curriculum=(2, 9), question="Q?", golden_answers=["A"], seed=5)
    assert req.WhichOneof("quality_source") == "curriculum" and req.curriculum.total_steps == 9 and req.seed == 5


async def _health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
        )
        return resp.status


async def test_engine_down_is_unavailable_and_the_service_keeps_serving() -> None:
    config = SimulatorConfig(grpc_port=0, metrics_port=-1, engine="openai", openai_base_urls=["http://127.0.0.1:1"])
    engine = OpenAISimulationEngine([f"http://127.0.0.1:{free_port()}"], "sim-model", max_attempts=2)
    server, client = await _serve(config, engine)
    try:
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.search(["capital of France"], quality="noisy", timeout_s=60)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "simulation engine unavailable" in err.value.details()
        assert await _health(client.target) == health_pb2.HealthCheckResponse.SERVING
        assert (await client.info()).engine == "openai"
    finally:
        await client.close()
        await server.stop(0)
        await engine.close()


async def test_engine_timeout_is_deadline_exceeded(openai_server_factory) -> None:
    slow = openai_server_factory(None, delay_s=5.0)
    config = SimulatorConfig(grpc_port=0, metrics_port=-1, engine="openai", openai_base_urls=[slow.url])
    engine = OpenAISimulationEngine([slow.url], "sim-model", timeout_s=0.3)
    server, client = await _serve(config, engine)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.search(["capital of France"], quality="useful", timeout_s=60)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not answer within the timeout" in err.value.details()
        assert await _health(client.target) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await client.close()
        await server.stop(0)
        await engine.close()


async def test_config_checks() -> None:
    check_config(SimulatorConfig())
    for bad in (
        SimulatorConfig(engine="sglang"),
        SimulatorConfig(engine="openai"),
        SimulatorConfig(top_k=21),
        SimulatorConfig(noise_probability=2.0),
        SimulatorConfig(curriculum_base=0.0),
        SimulatorConfig(vllm_kwargs="{not json"),
    ):
        with pytest.raises(ValueError):
            check_config(bad)
