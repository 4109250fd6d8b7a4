"""Embedding: model-family prefixes and the real MiniLM encoder."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.retrieval_support import cpu_has_native_bf16
from searchrl.errors import InvalidRequest
from searchrl.retriever.embed import (
    BGE_QUERY_INSTRUCTION,
    Prefixes,
    SplitChooser,
    canonical_model_name,
    encode_packed,
    model_family,
    packing_plan,
    plan_length_buckets,
    prefixes_for,
    resolve_query_dtype,
    same_model,
    split_by_tokens,
    tokenize,
)


@pytest.mark.parametrize(
    "name,family,prefixes",
    [
        ("intfloat/e5-base-v2", "e5", Prefixes("query: ", "passage: ")),
        ("/models/multilingual-e5-large", "e5", Prefixes("query: ", "passage: ")),
        ("BAAI/bge-large-en-v1.5", "bge", Prefixes(BGE_QUERY_INSTRUCTION, "")),
        ("all-minilm-l6-v2", "plain", Prefixes()),
        ("sentence-transformers/all-MiniLM-L6-v2", "plain", Prefixes()),
    ],
)
def test_prefixes_by_model_family(name: str, family: str, prefixes: Prefixes) -> None:
    assert model_family(name) == family
    assert prefixes_for(name) == prefixes


def test_model_names() -> None:
    assert canonical_model_name("sentence-transformers/all-MiniLM-L6-v2") == "all-minilm-l6-v2"
    assert canonical_model_name("intfloat/e5-base-v2") == "intfloat/e5-base-v2"
    assert same_model("intfloat/e5-base-v2", "/models/e5-base-v2")
    assert same_model("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2")
    assert not same_model("all-minilm-l6-v2", "intfloat/e5-base-v2")


def test_minilm_embeddings_are_unit_norm_and_semantic(encoder) -> None:  # noqa: ANN001
    assert encoder.name == "all-minilm-l6-v2" and encoder.dimension == 384
    q = encoder.encode_queries(["Who painted the Mona Lisa?", "capital city of Japan"])
    p = encoder.encode_passages(
        [
            "Leonardo da Vinci\nThe Mona Lisa is a portrait painting by Leonardo.",
            "Tokyo\nTokyo is the capital of Japan.",
        ]
    )
    assert q.shape == (2, 384) and q.dtype == np.float32
    assert np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-4) and np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-4)
    sims = q @ p.T
    assert sims[0, 0] > sims[0, 1] and sims[1, 1] > sims[1, 0]
    assert np.allclose(encoder.encode_queries(["capital city of Japan"])[0], q[1], atol=1e-5)  # batch-independent
    assert encoder.encode_queries([]).shape == (0, 384)


def test_prefix_is_applied_to_queries_and_passages(encoder) -> None:  # noqa: ANN001
    plain = encoder.prefixes
    try:
        encoder.prefixes = prefixes_for("e5")
        e5_query = encoder.encode_queries(["tallest mountain"])
        e5_passage = encoder.encode_passages(["tallest mountain"])
    finally:
        encoder.prefixes = plain
    assert np.allclose(e5_query, encoder.encode_queries(["query: tallest mountain"]), atol=1e-5)
    assert np.allclose(e5_passage, encoder.encode_passages(["passage: tallest mountain"]), atol=1e-5)
    assert not np.allclose(e5_query, encoder.encode_queries(["tallest mountain"]), atol=1e-3)


def _partitions(items: list[int]):  # noqa: ANN202 - every set partition of items (Bell(n) of them)
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _partitions(rest):
        yield [[first], *part]
        for i in range(len(part)):
            yield [*part[:i], [first, *part[i]], *part[i + 1 :]]


@pytest.mark.parametrize("seed", range(12))
def test_length_buckets_are_optimal_against_every_partition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 7))
    lengths = [int(x) for x in rng.integers(5, 70, size=n)]
    overhead = float(rng.choice([0.5, 10.0, 28.0, 200.0]))
    max_chunk = int(rng.integers(1, n + 1))

    def cost(chunks: list[list[int]]) -> float:
        return sum(overhead + len(c) * max(lengths[i] for i in c) for c in chunks)

    chunks = plan_length_buckets(lengths, overhead, max_chunk)
    assert sorted(i for c in chunks for i in c) == list(range(n))
    assert all(1 <= len(c) <= max_chunk for c in chunks)
    best = min(cost(p) for p in _partitions(list(range(n))) if all(len(c) <= max_chunk for c in p))
    assert cost(chunks) == pytest.approx(best)


def test_length_buckets_split_an_outlier_and_keep_uniform_batches_whole() -> None:
    assert plan_length_buckets([14, 15, 64, 13, 16, 15, 14, 15], 28.0, 64) == [[3, 0, 6, 1, 5, 7, 4], [2]]
    assert plan_length_buckets([15] * 8, 28.0, 64) == [list(range(8))]
    assert plan_length_buckets([15] * 8, 28.0, 3) == [[0, 1], [2, 3, 4], [5, 6, 7]]  # the cap holds, fewest chunks
    assert plan_length_buckets([30, 10, 20], 0.0, 2) == [[1, 2], [0]]  # no overhead: plain length-sorted chunks
    assert plan_length_buckets([], 28.0, 8) == []


def test_query_dtype_resolution() -> None:
    assert resolve_query_dtype("auto", "cuda:0", fp16=True) == "float16"
    assert resolve_query_dtype("auto", "cuda", fp16=False) == "float32"
    assert resolve_query_dtype("auto", "cpu", fp16=True) == "float32"  # reproducible by default
    assert resolve_query_dtype("bfloat16", "cpu", fp16=True) == "bfloat16"
    assert resolve_query_dtype("float32", "cpu", fp16=True) == "float32"
    with pytest.raises(InvalidRequest, match="unknown query dtype 'int8'"):
        resolve_query_dtype("int8", "cpu", fp16=True)
    with pytest.raises(InvalidRequest, match="needs a GPU"):
        resolve_query_dtype("float16", "cpu", fp16=True)


def test_bucketed_batches_return_rows_in_input_order(encoder) -> None:  # noqa: ANN001
    queries = [
        "capital of Japan",
        "Which painter, born in the Italian town of Vinci in 1452, painted the portrait known as the Mona Lisa "
        "that hangs in the Louvre in Paris?",
        "tallest mountain",
        "who wrote On the Origin of Species",
        "boiling point of water at sea level in degrees",
    ]
    lengths = encoder.token_lengths(queries, encoder.prefixes.query)
    assert len(plan_length_buckets(lengths, encoder.bucket_overhead_tokens, 64)) >= 2  # the long one goes alone
    single = np.stack([encoder.encode_queries([q])[0] for q in queries])
    pooling = encoder._pooling
    try:
        for path in ("packed", "length buckets"):
            if path == "length buckets":
                encoder._pooling = None  # as for an encoder that cannot be packed
            batch = encoder.encode_queries(queries)
            assert np.allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5), path
            assert np.abs(batch - single).max() < 2e-2, path  # same rows; bf16 sums differ a little with padding
            assert (np.argmax(batch @ single.T, axis=1) == np.arange(len(queries))).all(), path
    finally:
        encoder._pooling = pooling


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16")
def test_bfloat16_queries_rank_like_float32(encoder) -> None:  # noqa: ANN001
    from searchrl.retriever.embed import Encoder

    bf16 = Encoder("all-minilm-l6-v2", query_dtype="bfloat16")
    assert bf16.query_dtype == "bfloat16" and encoder.query_dtype == "float32"
    queries = ["Who painted the Mona Lisa?", "capital city of Japan", "largest desert on Earth", "speed of light"]
    a, b = bf16.encode_queries(queries), encoder.encode_queries(queries)
    assert a.dtype == np.float32 and (np.sum(a * b, axis=1) > 0.995).all()
    passages = encoder.encode_passages(
        ["Leonardo da Vinci painted the Mona Lisa.", "Tokyo is the capital of Japan.", "The Sahara is a desert."]
    )
    assert (np.argmax(a[:3] @ passages.T, axis=1) == np.argmax(b[:3] @ passages.T, axis=1)).all()


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_encoding_equals_padded_encoding(pooling: str) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    from searchrl.assets import embedding_model_path

    path = embedding_model_path("all-minilm-l6-v2")
    st = SentenceTransformer(modules=[Transformer(path), Pooling(384, pooling_mode=pooling), Normalize()], device="cpu")
    st.eval()
    assert packing_plan(st) == pooling
    texts = [
        "capital of Japan",
        "Which painter, born in Vinci in 1452, painted the portrait known as the Mona Lisa?",
        "tallest mountain",
        "who wrote On the Origin of Species",
    ]
    padded = st.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)
    import torch

    with torch.inference_mode():
        ids = tokenize(st, texts)
        one_pack = encode_packed(st, ids, pooling)
        many_packs = encode_packed(st, ids, pooling, max_tokens=20)  # one or two texts per pack
    assert np.abs(one_pack - padded).max() < 1e-5 and np.abs(many_packs - padded).max() < 1e-5
    assert packing_plan(SentenceTransformer(modules=[Transformer(path), Pooling(384, "max")], device="cpu")) is None


def test_encoder_packs_queries_on_cpu(encoder) -> None:  # noqa: ANN001
    from searchrl.retriever.embed import Encoder

    fp32 = Encoder("all-minilm-l6-v2", query_dtype="float32")
    assert fp32._pooling == "mean" and encoder._pooling == "mean" and encoder.query_dtype == "float32"
    queries = ["capital of Japan", "who wrote On the Origin of Species", "boiling point of water at sea level"]
    padded = fp32._encode(queries, "", 8, False, fp32.model)  # sentence-transformers' own padded batch
    assert np.abs(fp32.encode_queries(queries) - padded).max() < 1e-5


@pytest.mark.parametrize("seed", range(8))
def test_split_by_tokens_covers_every_text_in_order(seed: int) -> None:
    rng = np.random.default_rng(seed)
    lengths = [int(x) for x in rng.integers(3, 60, size=int(rng.integers(1, 40)))]
    parts = int(rng.integers(1, 5))
    ranges = split_by_tokens(lengths, parts)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(lengths)
    assert all(a < b for a, b in ranges) and all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))
    assert len(ranges) == min(parts, len(lengths))
    share = sum(lengths) / len(ranges)
    assert max(sum(lengths[a:b]) for a, b in ranges) <= share + max(lengths)  # balanced up to one text


def test_split_chooser_measures_both_ways_then_keeps_the_faster_and_re_probes() -> None:
    chooser = SplitChooser(explore_every=4)
    assert chooser.choose(8) is True  # nothing measured: split first
    chooser.record(8, True, 0.030, 100)
    assert chooser.choose(8) is False  # then the serial way
    chooser.record(8, False, 0.020, 100)
    picks = [chooser.choose(8) for _ in range(8)]
    assert picks.count(True) == 2 and picks.count(False) == 6  # serial is faster; every 4th batch probes split
    for _ in range(10):  # the machine got idle: splitting is now faster
        chooser.record(8, True, 0.010, 100)
    picks = [chooser.choose(8) for _ in range(8)]
    assert picks.count(True) == 6 and picks.count(False) == 2  # now split wins; every 4th batch probes serial
    assert chooser.choose(64) is True  # another size class is measured on its own
    assert set(chooser.snapshot()) == {"4/split", "4/serial"}


def test_split_encoding_equals_one_call() -> None:
    from searchrl.retriever.embed import Encoder

    enc = Encoder("all-minilm-l6-v2", query_dtype="float32", encode_workers=3, min_split=2)
    try:
        assert enc.encode_workers == 3 and enc._pool is not None
        queries = [f"who founded the city number {i} in the history of the world" for i in range(7)] + ["capital"]
        enc.split_chooser.choose = lambda n: False  # type: ignore[method-assign]
        one = enc.encode_queries(queries)
        enc.split_chooser.choose = lambda n: True  # type: ignore[method-assign]
        split = enc.encode_queries(queries)
        assert np.abs(one - split).max() < 1e-5
    finally:
        enc.close()
