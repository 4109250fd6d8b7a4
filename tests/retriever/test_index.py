"""Index build/load with the real MiniLM model on a real Wikipedia slice: quality, types, manifests, resumability."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from benchmarks.retrieval_support import measure_index_memory
from searchrl.errors import FailedPrecondition
from searchrl.retriever.corpus import PassageStore, iter_jsonl
from searchrl.retriever.index.build import ShardSet, build_index
from searchrl.retriever.index.faiss_util import index_type_of, recall_at_k
from searchrl.retriever.index.load import load_index, load_raw_index
from searchrl.retriever.index.params import INDEX_FILE, MANIFEST_FILE, IndexParams, read_manifest, stored_encoder_dir


def test_fanoutqa_evidence_page_ranks_first(flat_index, fanout_sample) -> None:  # noqa: ANN001
    subs, vecs = fanout_sample
    _, rows = flat_index.search_vectors(vecs, 5)
    titles = [[flat_index.store.title_of(int(r)) for r in row] for row in rows]
    top1 = np.mean([t[0] == s.title for t, s in zip(titles, subs, strict=True)])
    top5 = np.mean([s.title in t for t, s in zip(titles, subs, strict=True)])
    # MiniLM on 1,000 summaries: the evidence page is first for most FanOutQA sub-questions, in the top 5 for nearly all
    assert top1 >= 0.8, top1
    assert top5 >= 0.93, top5
    known = {
        "What is the population of Macau?": "Macau",
        "What is the headquarter of Microsoft?": "Microsoft",
        "What is the height of Mount Everest?": "Mount Everest",
        "What are the symptoms of Lung Cancer?": "Lung cancer",
    }
    _, rows = flat_index.search(list(known), 1)
    assert [flat_index.store.title_of(int(r[0])) for r in rows] == list(known.values())


def test_manifest_records_model_corpus_and_params(index_dirs, flat_index, wiki_slice) -> None:  # noqa: ANN001
    corpus, _ = wiki_slice
    m = read_manifest(index_dirs["ivfpq"])
    assert m.embedding_model == "all-minilm-l6-v2"
    assert m.dimension == 384
    assert m.size == sum(1 for _ in iter_jsonl(corpus)) == flat_index.size
    assert m.index_type == "ivfpq"
    import faiss

    assert m.faiss_version == faiss.__version__
    assert m.corpus_checksum == PassageStore.open(index_dirs["ivfpq"] / "store").checksum
    assert m.build_params["nlist"] >= 1 and m.build_params["pq_m"] == 96
    assert 384 % m.build_params["pq_m"] == 0


@pytest.mark.parametrize("kind,min_recall", [("hnsw", 0.95), ("ivfpq", 0.5)])
def test_approximate_indexes_load_and_agree_with_flat(
    index_dirs, flat_index, encoder, fanout_sample, kind, min_recall
) -> None:  # noqa: ANN001
    _, vecs = fanout_sample
    _, exact = flat_index.search_vectors(vecs, 10)
    loaded = load_index(index_dirs[kind], encoder=encoder, use_gpu=False)
    assert index_type_of(loaded.index) == kind
    _, rows = loaded.search_vectors(vecs, 10)
    recall = recall_at_k(rows, exact, 10)
    assert recall >= min_recall, (kind, recall)
    assert recall_at_k(exact, exact, 10) == 1.0


def test_more_ivf_probes_raise_recall(index_dirs, flat_index, encoder, fanout_sample) -> None:  # noqa: ANN001
    _, vecs = fanout_sample
    _, exact = flat_index.search_vectors(vecs, 10)
    loaded = load_index(index_dirs["ivfpq"], encoder=encoder, use_gpu=False)
    recalls = []
    for nprobe in (1, loaded.params.nlist):
        loaded.set_search_params(nprobe=nprobe)
        recalls.append(recall_at_k(loaded.search_vectors(vecs, 10)[1], exact, 10))
    assert recalls[1] > recalls[0]


def test_model_name_differing_from_manifest_is_refused(index_dirs) -> None:  # noqa: ANN001
    with pytest.raises(FailedPrecondition, match="built with embedding model 'all-minilm-l6-v2'.*intfloat/e5-base-v2"):
        load_index(index_dirs["flat"], embedding_model="intfloat/e5-base-v2")


def test_wrong_dimension_is_refused(tmp_path: Path, index_dirs, encoder) -> None:  # noqa: ANN001
    import faiss

    bad = tmp_path / "bad"
    shutil.copytree(index_dirs["flat"], bad, ignore=shutil.ignore_patterns("embeddings"))
    m = read_manifest(bad)
    small = faiss.IndexFlatIP(128)
    small.add(np.random.default_rng(0).standard_normal((m.size, 128)).astype("float32"))
    faiss.write_index(small, str(bad / INDEX_FILE))
    with pytest.raises(FailedPrecondition, match="dimension 128 differs from the manifest's 384"):
        load_index(bad, encoder=encoder)
    # manifest and index agree on 128 but the model embeds in 384 dimensions
    (bad / MANIFEST_FILE).write_text(m.model_copy(update={"dimension": 128}).model_dump_json())
    with pytest.raises(FailedPrecondition, match="index dimension 128 does not match embedding model"):
        load_index(bad, encoder=encoder)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_index_file_is_refused(tmp_path: Path, index_dirs, encoder, damage: str) -> None:  # noqa: ANN001
    bad = tmp_path / "bad"
    shutil.copytree(index_dirs["flat"], bad, ignore=shutil.ignore_patterns("embeddings"))
    f = bad / INDEX_FILE
    data = f.read_bytes()
    f.write_bytes(b"\x00not a faiss index\x00" * 10 if damage == "garbage" else data[: len(data) // 3])
    with pytest.raises(FailedPrecondition, match="not a readable FAISS index") as err:
        load_index(bad, encoder=encoder)
    assert "\n" not in str(err.value)


def test_store_out_of_step_with_manifest_is_refused(tmp_path: Path, index_dirs, encoder) -> None:  # noqa: ANN001
    bad = tmp_path / "bad"
    shutil.copytree(index_dirs["flat"], bad, ignore=shutil.ignore_patterns("embeddings"))
    m = read_manifest(bad)
    (bad / MANIFEST_FILE).write_text(m.model_copy(update={"corpus_checksum": "0" * 64}).model_dump_json())
    with pytest.raises(FailedPrecondition, match="checksum"):
        load_index(bad, encoder=encoder)
    shutil.rmtree(bad)
    with pytest.raises(FailedPrecondition, match="no manifest.json"):
        load_index(bad, encoder=encoder)


def test_raw_search_r1_index_loads_unchanged(tmp_path: Path, index_dirs, flat_index, encoder, wiki_slice) -> None:  # noqa: ANN001
    corpus, subs = wiki_slice
    # A Search-R1 deployment has just these two files: e5_Flat.index and the corpus jsonl.
    raw = tmp_path / "e5_Flat.index"
    shutil.copy(index_dirs["flat"] / INDEX_FILE, raw)
    loaded = load_raw_index(raw, corpus, "sentence-transformers/all-MiniLM-L6-v2", encoder=encoder, use_gpu=False)
    assert (
        loaded.manifest.index_type == "flat" and loaded.manifest.corpus_checksum == flat_index.manifest.corpus_checksum
    )
    qs = [s.question for s in subs[:20]]
    s1, r1 = loaded.search(qs, 5)
    s2, r2 = flat_index.search(qs, 5)
    assert (r1 == r2).all() and np.allclose(s1, s2)
    assert loaded.store.get(int(r1[0][0])) == flat_index.store.get(int(r2[0][0]))
    # corpus with a different number of passages than the index
    short = tmp_path / "short.jsonl"
    short.write_text("".join(corpus.read_text().splitlines(keepends=True)[:10]))
    with pytest.raises(FailedPrecondition, match="holds 1000 vectors but .* has 10 passages"):
        load_raw_index(raw, short, "all-minilm-l6-v2", encoder=encoder)


def test_embedding_shards_resume_after_interruption(tmp_path: Path, encoder, monkeypatch) -> None:  # noqa: ANN001
    from searchrl.retriever.corpus import Passage

    corpus = tmp_path / "c.jsonl"
    rows = [Passage(f"p{i}", f"Title {i}", f"passage number {i} about topic {i % 7}") for i in range(20)]
    corpus.write_text("".join(json.dumps({"id": p.id, "contents": p.contents}) + "\n" for p in rows))

    class Interrupt(Exception):
        pass

    encode, calls = encoder.encode_passages, []

    def stop_after_two(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - one call per 8-passage shard
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt
        return encode(*args, **kwargs)

    out = tmp_path / "idx"
    with monkeypatch.context() as m, pytest.raises(Interrupt):
        m.setattr(encoder, "encode_passages", stop_after_two)
        build_index(str(corpus), out, encoder=encoder, shard_size=8, progress=False)
    done = sorted(p.name for p in (out / "embeddings").glob("shard_*.npy"))
    assert done == ["shard_00000.npy", "shard_00001.npy"]
    assert not (out / MANIFEST_FILE).exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").glob("shard_*.npy")}
    report = build_index(str(corpus), out, encoder=encoder, shard_size=8, progress=False)
    assert (report.shards_computed, report.shards_skipped) == (1, 2)
    assert stored_encoder_dir(out) == out / "model" and report.manifest.encoder_dir == "model"
    assert {p: (out / "embeddings" / p).stat().st_mtime_ns for p in mtimes} == mtimes  # finished shards untouched
    fresh = build_index(str(corpus), tmp_path / "fresh", encoder=encoder, shard_size=8, progress=False)
    assert fresh.shards_computed == 3
    a = ShardSet(out / "embeddings", 20, 8, 384).all()
    b = ShardSet(tmp_path / "fresh" / "embeddings", 20, 8, 384).all()
    assert np.allclose(a, b, atol=1e-5)
    # a changed corpus invalidates the shards instead of mixing embeddings of different passages
    corpus.write_text(corpus.read_text().replace("passage number 3 ", "passage number three "))
    again = build_index(str(corpus), out, encoder=encoder, shard_size=8, progress=False)
    assert (again.shards_computed, again.shards_skipped) == (3, 0)


def test_memory_per_passage_matches_index_layout(flat_index, index_dirs) -> None:  # noqa: ANN001
    vecs = flat_index.index.reconstruct_n(0, flat_index.size)
    flat = measure_index_memory(vecs, "flat")
    hnsw = measure_index_memory(vecs[:400], "hnsw", IndexParams(ef_construction=40))
    pq = measure_index_memory(vecs, "ivfpq")
    assert flat.bytes_per_vector == pytest.approx(4 * 384, rel=0.01)
    assert hnsw.bytes_per_vector > flat.bytes_per_vector  # full vectors plus the graph
    p = IndexParams().resolved(len(vecs), 384)
    assert pq.bytes_per_vector == pytest.approx(p.pq_m * p.pq_nbits / 8 + 8, rel=0.15)  # code + 8-byte id
    assert flat.bytes_at(21_000_000) == pytest.approx(21e6 * 1536, rel=0.01)
    assert pq.bytes_at(21_000_000) < flat.bytes_at(21_000_000) / 10
