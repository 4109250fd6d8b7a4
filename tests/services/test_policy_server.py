"""PolicyService over real gRPC on loopback with the real SmolLM2 engine and the real RetrievalService."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from searchrl.agent.loop import AgentLoop, AgentLoopConfig
from searchrl.client.policy import PolicyClient
from searchrl.policy.v1 import policy_pb2, policy_pb2_grpc
from searchrl.rollout.v1 import rollout_pb2
from searchrl.services.policy.engines.remote import RemotePolicyBackend
from searchrl.services.policy.engines.transformers import TransformersEngine
from searchrl.services.policy.server import SERVICE_NAME, PolicyConfig, PolicyServicer, build_searches
from searchrl.serving.runtime import GrpcServer, ServiceSpec
from searchrl.testing import ServiceProcess, free_port

FORCED = "<think> I should look this up. </think>\n<search> Eiffel Tower </search>"


@pytest.fixture(scope="module")
def engine(policy_path: str) -> Iterator[TransformersEngine]:
    eng = TransformersEngine(policy_path, max_batch_size=8, batch_wait_ms=2, torch_threads=1)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def retriever(small_wiki_retriever: ServiceProcess) -> ServiceProcess:
    """A real RetrievalService over ~200 bundled Wikipedia summaries (Eiffel Tower among them)."""
    return small_wiki_retriever


async def serve(
    engine: TransformersEngine, metrics: bool = False, store: object = None, **overrides: object
) -> GrpcServer:
    cfg = PolicyConfig(grpc_port=0, metrics_port=0 if metrics else -1, **overrides)  # type: ignore[arg-type]
    servicer = PolicyServicer(engine, cfg, build_searches(cfg), store)
    server = GrpcServer(
        cfg, [ServiceSpec(SERVICE_NAME, servicer, policy_pb2_grpc.add_PolicyServiceServicer_to_server)], "policy"
    )
    await server.start()
    return server


@pytest.fixture
async def server(engine: TransformersEngine) -> AsyncIterator[GrpcServer]:
    srv = await serve(engine, max_new_tokens=64)
    yield srv
    await srv.stop(0)


async def test_generate_text_and_ids(server: GrpcServer, engine: TransformersEngine) -> None:
    async with PolicyClient(f"127.0.0.1:{server.port}") as pc:
        greedy = await pc.generate(text="The capital of France is", max_new_tokens=5, temperature=0.0, n=2)
        assert len(greedy.completions) == 2 and greedy.completions[0].token_ids == greedy.completions[1].token_ids
        c = greedy.completions[0]
        assert len(c.token_ids) == len(c.logprobs) <= 5 and c.finish_reason in ("length", "eos", "stop")
        assert greedy.prompt_tokens == len(engine.tokenizer.encode("The capital of France is"))
        assert greedy.policy_version == engine.version
        ids = engine.tokenizer.encode("The capital of France is")
        seeded = await pc.generate(token_ids=ids, max_new_tokens=6, seed=9, n=2)
        again = await pc.generate(token_ids=ids, max_new_tokens=6, seed=9, n=2)
        assert [list(x.token_ids) for x in seeded.completions] == [list(x.token_ids) for x in again.completions]
        info = await pc.model_info()
        assert info.engine == "transformers" and info.vocab_size == 49152 and info.max_context_tokens == 8192
        assert info.eos_token_id == engine.eos_token_id


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({}, "set prompt"),
        ({"text": ""}, "empty"),
        ({"text": "hi", "n": 65}, "n must be"),
        ({"text": "hi", "max_new_tokens": 65}, "max_new_tokens"),
        ({"text": "hi", "top_p": 0.0}, "top_p"),
        ({"token_ids": [5] * 9000}, "limit"),
        ({"token_ids": [60000]}, "token ids"),
    ],
)
async def test_generate_bad_input(server: GrpcServer, kwargs: dict[str, object], message: str) -> None:
    async with PolicyClient(f"127.0.0.1:{server.port}") as pc:
        req = policy_pb2.GenerateRequest(n=int(kwargs.get("n", 1)))  # type: ignore[call-overload]
        if "text" in kwargs:
            req.text = str(kwargs["text"])
        if "token_ids" in kwargs:
            req.token_ids.ids.extend(kwargs["token_ids"])  # type: ignore[arg-type]
        req.sampling.CopyFrom(
            pc.sampling(max_new_tokens=int(kwargs.get("max_new_tokens", 2)), top_p=kwargs.get("top_p"))
        )  # type: ignore[arg-type]
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pc.stub.Generate(req, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (err.value.details() or "")


@pytest.mark.slow  # a real retriever over a freshly built index, or a child policy process
async def test_rollout_with_real_retriever_streams_turns_and_stores(
    engine: TransformersEngine, retriever: ServiceProcess, redis_url: str, redis_client
) -> None:  # type: ignore[no-untyped-def]
    from searchrl.services.rollouts.store import DEFAULT_STREAM, RolloutStore

    store = RolloutStore(redis_url)
    srv = await serve(
        engine,
        store=store,
        retriever_target=retriever.target,
        response_prefix=FORCED,
        max_new_tokens_per_turn=32,
        max_response_tokens=400,
        max_turns=2,
        top_k=2,
    )
    try:
        async with PolicyClient(f"127.0.0.1:{srv.port}") as pc:
            req = policy_pb2.RolloutRequest(
                question="In which city is the Eiffel Tower?", golden_answers=["Paris"], question_id="q-eiffel"
            )
            req.sampling.CopyFrom(pc.sampling(temperature=0.7, seed=4))
            events = [e async for e in pc.rollout_stream(req)]
    finally:
        await srv.stop(0)
        await store.close()
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "trajectory" and set(kinds[:-1]) == {"turn"} and len(kinds) >= 2
    traj = events[-1].trajectory
    first = events[0].turn
    assert (
        first.finish_reason == "search" and first.search.backend == "retriever" and first.search.query == "Eiffel Tower"
    )
    docs = first.search.documents
    assert len(docs) == 2 and any("Eiffel" in d.title or "Eiffel" in d.text for d in docs)
    assert first.observation_text.startswith(" <result>\nDoc 1 (Title: ")
    assert traj.question_id == "q-eiffel" and len(traj.response_ids) == len(traj.loss_mask) == len(
        traj.response_logprobs
    )
    assert first.observation_text in traj.response_text
    # The reward came from the reward library: ReSearch's rule gives 0 (format failed), 0.1 or an F1 in (0, 1].
    assert traj.reward == 0.0 or 0.1 <= traj.reward <= 1.0
    assert traj.timings.total_ms > 0 and traj.timings.search_ms > 0
    entries = redis_client.xrange(DEFAULT_STREAM)
    stored = rollout_pb2.Trajectory.FromString(entries[-1][1][b"t"])
    assert stored.id == traj.id and list(stored.loss_mask) == list(traj.loss_mask)


async def test_rollout_with_dead_retriever_counts_errors(engine: TransformersEngine) -> None:
    srv = await serve(
        engine,
        metrics=True,
        retriever_target=f"127.0.0.1:{free_port()}",
        response_prefix=FORCED,
        max_new_tokens_per_turn=8,
        max_response_tokens=200,
        max_turns=2,
        search_timeout_s=5.0,
        max_prompt_tokens=1000,
    )
    try:
        async with PolicyClient(f"127.0.0.1:{srv.port}") as pc:
            traj = await pc.rollout(
                "Where is the Eiffel Tower?", ["Paris"], search_backend="retriever", sampling=pc.sampling(seed=1)
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pc.rollout("Q?", search_backend="simulator")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pc.rollout("word " * 1500)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tokens" in (err.value.details() or "")
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
    finally:
        await srv.stop(0)
    assert traj.turns[0].search.error.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))
    assert "Search error: the search engine is unavailable." in traj.turns[0].observation_text
    assert len(traj.turns) == 2  # the episode went on after the failed search
    assert 'searchrl_policy_searches_total{backend="retriever",outcome="error"}' in metrics
    assert "searchrl_policy_episodes_total{finish_reason=" in metrics
    assert "searchrl_policy_generated_tokens_total" in metrics


async def test_load_weights_does_not_drop_requests(engine: TransformersEngine, policy_path: str) -> None:
    server = await serve(engine, max_new_tokens=64, weights_roots=str(Path(policy_path).parent))
    async with PolicyClient(f"127.0.0.1:{server.port}") as pc:
        before = (await pc.model_info()).policy_version
        in_flight = [
            asyncio.create_task(pc.generate(text=f"Story number {i}:", max_new_tokens=24, seed=i + 1)) for i in range(3)
        ]
        await asyncio.sleep(0.5)
        loaded = await pc.load_weights(policy_path, "step-2")
        assert loaded.policy_version == "step-2" and loaded.load_ms > 0
        done = await asyncio.gather(*in_flight)
        assert all(len(r.completions[0].token_ids) >= 1 for r in done)
        assert {r.policy_version for r in done} <= {before, "step-2"}
        after = await pc.generate(text="Hello", max_new_tokens=2)
        assert after.policy_version == "step-2" and (await pc.model_info()).policy_version == "step-2"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pc.load_weights(str(Path(policy_path).parent / "nonexistent"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await server.stop(0)


async def test_load_weights_only_from_the_checkpoint_roots(
    engine: TransformersEngine, policy_path: str, tmp_path: Path
) -> None:
    """#17: outside --weights-roots (``..``, a symlink out, any absolute path) is PERMISSION_DENIED whether or not it
    exists; inside, a directory that is not a checkpoint is INVALID_ARGUMENT; the weights never change."""
    root = tmp_path / "checkpoints"
    (root / "notes").mkdir(parents=True)
    (root / "escape").symlink_to(Path(policy_path))  # a real checkpoint, but outside the root
    server = await serve(engine, weights_roots=str(root))
    try:
        async with PolicyClient(f"127.0.0.1:{server.port}") as pc:
            before = (await pc.model_info()).policy_version
            for path in ("/etc", str(root / "../../.."), "/nonexistent/checkpoint", policy_path, str(root / "escape")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pc.load_weights(path, "evil")
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (path, err.value.details())
            for path in (str(root / "notes"), str(root), str(root / "missing")):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pc.load_weights(path, "evil")
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, err.value.details())
                assert "not a checkpoint directory" in (err.value.details() or "")
            for path in ("\x00", str(root / "a\x00b"), "/etc/\x00"):  # found by the long fuzz run: INTERNAL before
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await pc.load_weights(path, "evil")
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, err.value.details())
                assert "NUL character" in (err.value.details() or "")
            assert (await pc.model_info()).policy_version == before
    finally:
        await server.stop(0)
    none = await serve(engine, weights_roots="")
    try:
        async with PolicyClient(f"127.0.0.1:{none.port}") as pc:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await pc.load_weights(policy_path, "x")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "none configured" in (err.value.details() or "")
    finally:
        await none.stop(0)


async def test_remote_backend_loads_its_pinned_weights_again_only_into_a_service_that_lost_them(
    engine: TransformersEngine, policy_path: str
) -> None:
    """#17: a PolicyService that restarted serves its start-up weights. RemotePolicyBackend.restore_pinned (what the
    async trainer calls for a group from weights it never pushed) loads the pinned weights again; when the service
    still serves them (the group was merely old), or nothing is pinned, it loads nothing."""
    from transformers import AutoTokenizer

    server = await serve(engine, max_new_tokens=8, weights_roots=str(Path(policy_path).parent))
    try:
        async with PolicyClient(f"127.0.0.1:{server.port}") as pc:
            backend = RemotePolicyBackend(pc, AutoTokenizer.from_pretrained(policy_path))
            assert await backend.restore_pinned("anything") is False
            await pc.load_weights(policy_path, "step-3.ab12")
            backend.pinned = ("step-3.ab12", policy_path)
            assert await backend.restore_pinned("step-2.ab12") is False and backend.reloads == 0
            await pc.load_weights(policy_path, "start-up")  # what a restarted service serves
            assert await backend.restore_pinned("start-up") is True and backend.reloads == 1
            assert (await pc.model_info()).policy_version == "step-3.ab12"
            assert await backend.restore_pinned("start-up") is False and backend.reloads == 1
    finally:
        await server.stop(0)


@pytest.mark.slow  # a real retriever over a freshly built index, or a child policy process
async def test_serve_policy_process_and_remote_backend(policy_path: str) -> None:
    """``searchrl serve policy`` as a child process; the agent loop drives it through RemotePolicyBackend."""
    from transformers import AutoTokenizer

    proc = ServiceProcess(
        "policy", ["--max-new-tokens", "32", "--max-batch-size", "4", "--torch-threads", "1"], timeout_s=300
    )
    try:
        async with PolicyClient(proc.target) as pc:
            info = await pc.model_info()
            assert info.engine == "transformers" and info.policy_version == "0"
            backend = RemotePolicyBackend(pc, AutoTokenizer.from_pretrained(policy_path))
            loop = AgentLoop(
                backend, None, AgentLoopConfig(max_turns=2, max_new_tokens_per_turn=16, max_response_tokens=48)
            )
            ep = await loop.run("Who wrote Dracula?", ["Bram Stoker"], seed=2)
            assert ep.policy_version == "0" and sum(ep.loss_mask) >= 1
            assert ep.finish_reason in ("answer", "eos", "turn_limit", "token_budget")
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(60) == 0
    finally:
        proc.stop()
