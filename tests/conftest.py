"""Shared fixtures: a real Redis per test session, the embedded models, the bundled data."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_service_log() -> Iterator[None]:
    """#17: after the session, no token, password or private key that a test gave a ``searchrl serve`` process
    (``searchrl.testing.ServiceProcess``: flags, environment, and the files they name) appears anywhere in that
    process's output: start-up lines, errors, tracebacks."""
    yield
    from searchrl.testing import ServiceProcess

    leaks = [f"{p.service} ({p.log_path}): {p.leaked_secrets()}" for p in ServiceProcess.launched if p.leaked_secrets()]
    checked = sum(1 for p in ServiceProcess.launched if p.secrets)
    assert not leaks, f"secrets in service logs ({checked} processes had secrets):\n" + "\n".join(leaks)


@pytest.fixture(scope="session")
def tiny_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat MiniLM index of 40 generated passages, built once per session by ``searchrl index build`` (for tests
    that need a retriever to start, not to find anything in particular)."""
    import json
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("tiny-index")
    corpus = tmp / "corpus.jsonl"
    rows = [
        {"id": str(i), "contents": f'"Topic {i}"\nA short passage number {i} about subject {i % 7}.'} for i in range(40)
    ]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "index"
    proc = subprocess.run(
        [sys.executable, "-m", "searchrl", "index", "build", "--corpus", str(corpus), "--model", "all-minilm-l6-v2",
         "--index-type", "flat", "--out", str(out), "--no-progress"],  # fmt: skip
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """URL of a real Redis: a local ``redis-server`` on a free port, else a testcontainers Redis when Docker runs."""
    if shutil.which("redis-server"):
        from searchrl.testing import redis_server

        with redis_server() as url:
            yield url
        return
    try:
        from testcontainers.redis import RedisContainer  # type: ignore[import-not-found]

        with RedisContainer() as rc:
            yield f"redis://{rc.get_container_host_ip()}:{rc.get_exposed_port(6379)}/0"
    except Exception as exc:  # noqa: BLE001 - neither a binary nor a Docker engine
        pytest.skip(f"no redis-server binary and no Docker engine for testcontainers: {exc}")


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[object]:
    """A redis-py client on the session Redis, flushed before the test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def policy_path() -> str:
    """Dense checkpoint of the embedded SmolLM2-135M-Instruct (converted once from the bundled GGUF)."""
    from searchrl.assets import policy_model_path

    return policy_model_path()


@pytest.fixture(scope="session")
def embedding_path() -> str:
    """Folder of the embedded all-MiniLM-L6-v2."""
    from searchrl.assets import embedding_model_path

    return embedding_model_path()


@pytest.fixture(scope="session")
def small_wiki_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat index of ~200 bundled Wikipedia summaries: every 50th one plus Eiffel Tower, Paris, Dracula and France."""
    import json

    from searchrl.retriever.corpus import iter_wiki
    from searchrl.retriever.index.build import build_index

    root = tmp_path_factory.mktemp("small-wiki")
    corpus = root / "corpus.jsonl"
    with open(corpus, "w", encoding="utf-8") as fh:
        for i, p in enumerate(iter_wiki()):
            if p.title in {"Eiffel Tower", "Paris", "Dracula", "France"} or i % 50 == 0:
                fh.write(json.dumps({"id": p.id, "contents": p.contents}) + "\n")
    build_index(str(corpus), root / "flat", index_type="flat", shard_size=256, progress=False)
    return root / "flat"


@pytest.fixture(scope="session")
def small_wiki_retriever(small_wiki_index: Path) -> Iterator[object]:
    """A real RetrievalService (child process, read-only) over :func:`small_wiki_index`, shared by the session."""
    from searchrl.testing import ServiceProcess

    args = ["--index-dir", str(small_wiki_index), "--http-port", "-1"]
    with ServiceProcess("retriever", args, timeout_s=300) as proc:
        yield proc
