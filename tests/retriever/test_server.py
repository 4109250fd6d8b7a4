"""``searchrl serve retriever`` as a real subprocess: gRPC and Search-R1 HTTP agree, Redis cache, metrics, start-up errors."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from searchrl.testing import ServiceProcess, free_port

QUERIES = ["What is the population of Macau?", "Who painted the Mona Lisa?", "tallest mountain on Earth"]


@pytest.fixture(scope="module")
def server(index_dirs, redis_url):  # noqa: ANN001, ANN201
    """The retriever on the flat slice index with the session Redis as its search cache; yields (process, http url)."""
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    http_port = free_port()
    proc = ServiceProcess(
        "retriever",
        ["--index-dir", str(index_dirs["flat"]), "--http-port", str(http_port), "--redis-url", redis_url],
    )
    yield proc, f"http://127.0.0.1:{http_port}"
    rc = proc.stop()
    assert rc == 0, proc.output()[-2000:]  # SIGTERM drains and exits cleanly


async def _post(url: str, payload: object | bytes) -> tuple[int, object]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with aiohttp.ClientSession() as s, s.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, await r.json(content_type=None)


async def test_http_retrieve_matches_grpc_exactly(server) -> None:  # noqa: ANN001
    from searchrl.client import RetrievalClient

    proc, http = server
    async with RetrievalClient(proc.target) as client:
        grpc_docs = await client.search(QUERIES, top_k=3, skip_cache=True)
    status, body = await _post(f"{http}/retrieve", {"queries": QUERIES, "topk": 3, "return_scores": True})
    assert status == 200
    assert list(body) == ["result"] and len(body["result"]) == 3
    for hits, docs in zip(body["result"], grpc_docs, strict=True):
        assert [h["document"]["id"] for h in hits] == [d.id for d in docs]
        assert [h["document"]["contents"] for h in hits] == [f'"{d.title}"\n{d.text}' for d in docs]
        assert [h["score"] for h in hits] == pytest.approx([d.score for d in docs], abs=1e-6)
        assert set(hits[0]) == {"document", "score"} and set(hits[0]["document"]) == {"id", "contents"}
    assert grpc_docs[0][0].title == "Macau"


async def test_search_r1_and_flashrag_response_shapes(server) -> None:  # noqa: ANN001
    _, http = server
    status, body = await _post(f"{http}/retrieve", {"queries": QUERIES[:2], "topk": 2})
    assert status == 200 and [len(r) for r in body["result"]] == [2, 2]
    assert set(body["result"][0][0]) == {"id", "contents"}  # documents only without return_scores
    status, body = await _post(f"{http}/retrieve", {"queries": QUERIES[:1]})
    assert len(body["result"][0]) == 5  # no topk: the server default
    status, docs = await _post(f"{http}/search", {"query": QUERIES[0], "top_n": 3})
    assert status == 200 and len(docs) == 3 and docs[0]["contents"].startswith('"Macau"\n')
    status, (docs, scores) = await _post(f"{http}/search", {"query": QUERIES[0], "top_n": 2, "return_score": True})
    assert len(docs) == len(scores) == 2 and scores[0] >= scores[1]
    status, batch = await _post(f"{http}/batch_search", {"query": QUERIES, "top_n": 2})
    assert status == 200 and [len(x) for x in batch] == [2, 2, 2]
    status, (docs, scores) = await _post(f"{http}/batch_search", {"query": QUERIES[:2], "return_score": True})
    assert [len(x) for x in docs] == [10, 10] and [len(x) for x in scores] == [10, 10]  # FlashRAG default top_n 10
    with urllib.request.urlopen(f"{http}/health") as r:
        health = json.loads(r.read())
    assert health["status"] == "healthy" and health["index"]["size"] == 1000


@pytest.mark.parametrize(
    "path,payload,message",
    [
        ("/retrieve", b"{not json", "not valid JSON"),
        ("/retrieve", [1, 2], "must be a JSON object"),
        ("/retrieve", {"queries": "one string"}, "'queries' must be a list of strings"),
        ("/retrieve", {"queries": ["ok"], "topk": "3"}, "'topk' must be an integer"),
        ("/retrieve", {"queries": ["ok"], "topk": 10_000}, "exceeds this server's max_top_k"),
        ("/retrieve", {"queries": ["ok"], "topk": -2}, "top_k must be positive"),
        ("/retrieve", {"queries": [""]}, "query 0 is empty"),
        ("/retrieve", {"queries": ["x" * 100_000]}, "the limit is 4096"),
        ("/retrieve", {"queries": ["q"] * 5000}, "max_batch_size of 1024"),
        ("/retrieve", {"queries": []}, "must not be empty"),
        ("/search", {"query": None}, "'query' must be a string"),
        ("/batch_search", {"query": ["ok"], "return_score": "yes"}, "must be true or false"),
    ],
)
async def test_http_bad_input_is_400_with_a_message(server, path: str, payload: object, message: str) -> None:  # noqa: ANN001
    _, http = server
    status, body = await _post(http + path, payload)
    assert status == 400
    assert message in body["detail"]


async def test_cache_through_the_service_returns_what_a_miss_returns(server) -> None:  # noqa: ANN001
    from searchrl.client import RetrievalClient

    proc, http = server
    qs = ["Where is the Eiffel Tower?", "Who discovered penicillin?"]
    async with RetrievalClient(proc.target) as client:
        first = await client.search(qs, top_k=4)
        second = await client.search(qs, top_k=4)
    assert first.cache_hits == [False, False] and second.cache_hits == [True, True]
    assert [[(d.id, d.title, d.text, d.score) for d in q] for q in first] == [
        [(d.id, d.title, d.text, d.score) for d in q] for q in second
    ]
    # HTTP shares the cache and the documents
    status, body = await _post(f"{http}/retrieve", {"queries": qs, "topk": 4, "return_scores": True})
    assert [[h["document"]["id"] for h in r] for r in body["result"]] == [[d.id for d in q] for q in first]


async def test_concurrent_clients_are_micro_batched_and_metrics_exported(server) -> None:  # noqa: ANN001
    from prometheus_client.parser import text_string_to_metric_families

    from searchrl.client import RetrievalClient

    proc, http = server
    async with RetrievalClient(proc.target) as client:
        qs = [f"question number {i} about history" for i in range(24)]
        results = await asyncio.gather(*(client.search([q], top_k=2, skip_cache=True) for q in qs))
    assert all(len(r[0]) == 2 for r in results)
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    batch = {s.name: s.value for s in families["searchrl_retriever_batch_size"].samples if not s.labels.get("le")}
    assert batch["searchrl_retriever_batch_size_sum"] / batch["searchrl_retriever_batch_size_count"] > 1.0
    stages = {s.labels["stage"] for s in families["searchrl_retriever_stage_seconds"].samples}
    assert stages == {"encode", "search", "lookup"}
    queries = {
        s.labels["api"]: s.value for s in families["searchrl_retriever_queries"].samples if s.name.endswith("_total")
    }
    assert queries["grpc"] >= 24 and queries["http"] >= 1
    cache = {
        (s.labels["backend"], s.labels["result"]): s.value
        for s in families["searchrl_search_cache_requests"].samples
        if s.name.endswith("_total")
    }
    assert cache[("retriever", "hit")] >= 2 and cache[("retriever", "miss")] >= 2


def test_metrics_say_which_device_serves_the_index(server, index_dirs) -> None:  # noqa: ANN001
    from prometheus_client.parser import text_string_to_metric_families

    proc, _ = server
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    samples = [(s.labels, s.value) for s in families["searchrl_index_device_info"].samples]
    assert samples == [({"index": Path(index_dirs["flat"]).resolve().name, "device": "cpu"}, 1.0)]


def _serve(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "searchrl",
        "serve",
        "retriever",
        "--grpc-port",
        "0",
        "--metrics-port",
        "-1",
        "--http-port",
        "-1",
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    )


@pytest.mark.parametrize("damage", ["corrupt", "model", "missing"])
def test_bad_index_fails_at_startup_with_exit_2(tmp_path: Path, index_dirs, damage: str) -> None:  # noqa: ANN001
    bad = tmp_path / "idx"
    shutil.copytree(index_dirs["flat"], bad, ignore=shutil.ignore_patterns("embeddings"))
    args = ["--index-dir", str(bad)]
    expect = {
        "corrupt": "not a readable FAISS index",
        "model": "built with embedding model 'all-minilm-l6-v2', but 'intfloat/e5-base-v2' was requested",
        "missing": "does not exist",
    }[damage]
    if damage == "corrupt":
        (bad / "index.faiss").write_bytes(b"garbage" * 100)
    elif damage == "model":
        args += ["--embedding-model", "intfloat/e5-base-v2"]
    else:
        args = ["--index-dir", str(tmp_path / "nowhere")]
    done = _serve(args)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and expect in lines[0], done.stdout
    assert "Traceback" not in done.stdout + done.stderr
