"""The compressed index with exact re-ranking (``ivfpq_refine``), Flat-index conversion, parameter tuning and resumable
builds, with the real MiniLM model on the session's Wikipedia slice (issue #18)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from searchrl.errors import FailedPrecondition
from searchrl.retriever.cli import main
from searchrl.retriever.index.build import ShardSet, build_from_shards, convert_flat_index, trained_cache_path
from searchrl.retriever.index.faiss_util import index_type_of, recall_at_k
from searchrl.retriever.index.load import load_index
from searchrl.retriever.index.params import INDEX_FILE, IndexParams, read_manifest
from searchrl.testing import free_port


def _mapped_files() -> set[str]:
    """Paths of the files this process has memory-mapped (``/proc/self/maps``)."""
    out = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            out.add(parts[5])
    return out


def test_refine_index_recalls_flat_and_keeps_its_vectors_on_disk(
    index_dirs, flat_index, encoder, fanout_sample
) -> None:  # noqa: ANN001
    _, vecs = fanout_sample
    _, exact = flat_index.search_vectors(vecs, 10)
    m = read_manifest(index_dirs["ivfpq_refine"])
    assert m.index_type == "ivfpq_refine"
    assert m.build_params["factory"] == f"IVF{m.build_params['nlist']},PQ96x{m.build_params['pq_nbits']},Refine(SQ8)"
    loaded = load_index(index_dirs["ivfpq_refine"], encoder=encoder, use_gpu=False)
    assert index_type_of(loaded.index) == "ivfpq_refine"
    # the re-ranking vectors are served from a memory map of the index file, not a copy in RAM
    assert str((index_dirs["ivfpq_refine"] / INDEX_FILE).resolve()) in _mapped_files()
    _, rows = loaded.search_vectors(vecs, 10)
    refine_recall = recall_at_k(rows, exact, 5)
    pq = load_index(index_dirs["ivfpq"], encoder=encoder, use_gpu=False, nprobe=m.build_params["nprobe"])
    pq_recall = recall_at_k(pq.search_vectors(vecs, 10)[1], exact, 5)
    assert refine_recall >= 0.95, refine_recall
    assert refine_recall > pq_recall  # same coarse cells and codes; re-ranking is what brings recall back
    # k_factor 1 re-ranks only the IVF-PQ's own top k: no better than plain IVF-PQ
    loaded.set_search_params(k_factor=1)
    assert recall_at_k(loaded.search_vectors(vecs, 10)[1], exact, 5) < refine_recall


def test_trained_quantizer_is_reused_by_a_rerun(
    tmp_path: Path, index_dirs, shared_embeddings: Path, caplog: pytest.LogCaptureFixture
) -> None:  # noqa: ANN001
    meta = json.loads((shared_embeddings / "shards.json").read_text())
    shards = ShardSet(shared_embeddings, meta["size"], meta["shard_size"], meta["dimension"])
    p = IndexParams().resolved(shards.size, shards.dimension, "ivfpq_refine")
    cache = trained_cache_path(tmp_path, "ivfpq_refine", p, "test")
    first = build_from_shards(shards, "ivfpq_refine", p, trained_cache=cache)
    assert cache.exists()
    with caplog.at_level(logging.INFO, logger="searchrl.retriever.index"):
        second = build_from_shards(shards, "ivfpq_refine", p, trained_cache=cache)
    assert "reusing the trained quantizer" in caplog.text and "trained ivfpq_refine" not in caplog.text
    q = shards.load(0)[:20]
    assert np.array_equal(first.search(q, 5)[1], second.search(q, 5)[1])
    # another parameter set has another cache file: a changed build never reuses a stale quantizer
    assert trained_cache_path(tmp_path, "ivfpq_refine", IndexParams(k_factor=4).resolved(1000, 384, "ivfpq_refine"), "test") != cache


def test_eval_sweeps_nprobe_and_k_factor_and_stores_the_fastest_setting_reaching_the_target(
    tmp_path: Path, index_dirs, encoder, capsys: pytest.CaptureFixture[str]
) -> None:  # noqa: ANN001
    d = tmp_path / "refine"
    shutil.copytree(index_dirs["ivfpq_refine"], d)
    args = ["eval", "--index-dir", str(d), "--reference", str(index_dirs["flat"]), "--limit", "80"]
    args += ["--nprobe", "1,25", "--k-factor", "1,16", "--k", "5,10", "--target-recall", "0.9", "--store", "--json"]
    assert main(args) == 0
    out = capsys.readouterr().out
    rows = json.loads(next(line for line in out.splitlines() if line.startswith("[")))
    assert {r["setting"] for r in rows} == {f"nprobe={n} k_factor={f}" for n in (1, 25) for f in (1, 16)}
    by = {r["setting"]: r for r in rows}
    assert by["nprobe=25 k_factor=16"]["recall@5"] > by["nprobe=25 k_factor=1"]["recall@5"]
    assert any(r["frontier"] for r in rows) and all(r["ms_per_query"] > 0 for r in rows)
    ok = [r for r in rows if r["recall@5"] >= 0.9]
    best = min(ok, key=lambda r: r["ms_per_query"])
    m = read_manifest(d)
    assert {k: m.build_params[k] for k in ("nprobe", "k_factor")} == best["params"]
    assert m.model_extra["tuned"]["target"] == "recall@5 >= 0.9"
    loaded = load_index(d, encoder=encoder, use_gpu=False)
    assert loaded.nprobe == best["params"]["nprobe"]
    assert int(loaded.index.k_factor) == best["params"]["k_factor"]
    # an unreachable target stores nothing and says so
    before = (d / "manifest.json").read_text()
    assert main([*args[:-4], "--target-recall", "1.01", "--store"]) == 1
    assert "widen the sweep" in capsys.readouterr().err
    assert (d / "manifest.json").read_text() == before


def _serve_http(index_dir: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    http_port = free_port()
    cmd = [
        sys.executable, "-m", "searchrl", "serve", "retriever", "--index-dir", str(index_dir),
        "--grpc-port", str(free_port()), "--metrics-port", "-1", "--http-port", str(http_port),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.monotonic() + 180
    while "READY retriever" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"retriever did not start (rc={proc.poll()}):\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, http_port


async def test_a_flat_index_converts_without_reembedding_and_serves_the_search_r1_api(
    tmp_path: Path, index_dirs, flat_index, encoder, wiki_slice
) -> None:  # noqa: ANN001
    corpus, subs = wiki_slice
    raw = tmp_path / "e5_Flat.index"  # what a Search-R1 user has: the flat index file and its corpus jsonl
    shutil.copy(index_dirs["flat"] / INDEX_FILE, raw)
    out = tmp_path / "converted"
    assert main(["convert", "--flat-index", str(raw), "--corpus", str(corpus), "--model", "all-minilm-l6-v2",
                 "--out", str(out), "--no-progress"]) == 0  # fmt: skip
    m = read_manifest(out)
    assert m.index_type == "ivfpq_refine" and m.size == flat_index.size
    assert m.build_params["converted_from"] == str(raw.resolve())
    assert not (out / "embeddings").exists()  # nothing was embedded
    assert not list(out.glob("trained-*.faiss"))  # the resume file goes once the index is written
    questions = [s.question for s in subs[:30]]
    _, exact = flat_index.search(questions, 3)
    proc, port = _serve_http(out, tmp_path / "retriever.log")
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"http://127.0.0.1:{port}/retrieve", json={"queries": questions, "topk": 3, "return_scores": True}
            ) as r,
        ):
            assert r.status == 200
            body = await r.json()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    result = body["result"]
    assert len(result) == 30 and all(len(hits) == 3 for hits in result)
    # Search-R1's response shape: {"document": {"id", "contents"}, "score"} per hit
    got = [[flat_index.store.row_of(h["document"]["id"]) for h in hits] for hits in result]
    assert recall_at_k(np.array(got), exact, 3) >= 0.95
    assert all(h["document"]["contents"] for hits in result for h in hits)


def test_conversion_refuses_what_it_cannot_convert(tmp_path: Path, index_dirs, encoder, wiki_slice) -> None:  # noqa: ANN001
    import faiss

    corpus, _ = wiki_slice
    l2 = tmp_path / "l2.index"
    faiss.write_index(faiss.IndexFlatL2(384), str(l2))
    with pytest.raises(FailedPrecondition, match="L2 index"):
        convert_flat_index(l2, corpus, tmp_path / "a", "all-minilm-l6-v2", encoder=encoder, progress=False)
    with pytest.raises(FailedPrecondition, match="not a flat index"):
        convert_flat_index(index_dirs["hnsw"] / INDEX_FILE, corpus, tmp_path / "b", "all-minilm-l6-v2", encoder=encoder)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(corpus.read_text().splitlines(keepends=True)[:10]))
    with pytest.raises(FailedPrecondition, match="holds 1000 vectors but .* has 10 passages"):
        convert_flat_index(
            index_dirs["flat"] / INDEX_FILE, short, tmp_path / "c", "all-minilm-l6-v2", encoder=encoder, progress=False
        )


def test_index_build_killed_mid_embedding_resumes_from_the_last_finished_shard(tmp_path: Path, wiki_slice) -> None:  # noqa: ANN001
    corpus, _ = wiki_slice
    out = tmp_path / "idx"
    cmd = [
        sys.executable, "-m", "searchrl", "index", "build", "--corpus", str(corpus), "--out", str(out),
        "--index-type", "ivfpq_refine", "--shard-size", "100", "--batch-size", "16", "--no-progress",
        "--torch-threads", "1",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    shards = out / "embeddings"
    deadline = time.monotonic() + 300
    while len(list(shards.glob("shard_*.npy"))) < 3:
        assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "no 3 shards in 300 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    done = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.npy")}
    assert 3 <= len(done) < 10 and not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"embedding shards: {10 - len(done)} computed, {len(done)} reused" in rerun.stdout
    assert {p: (shards / p).stat().st_mtime_ns for p in done} == done  # finished shards were not recomputed
    assert not list(shards.glob("*.tmp.npy"))  # the shard being written at the kill was never taken as finished
    m = read_manifest(out)
    assert m.size == 1000 and m.index_type == "ivfpq_refine"
