"""Query and passage embeddings through sentence-transformers, with each model family's prefixes.

Dense retrievers are trained with fixed input formats, and using another format costs recall:

=========================  ===================================================  ==================  =========
family (matched in name)   query prefix                                          passage prefix      pooling
=========================  ===================================================  ==================  =========
``e5`` (intfloat/e5-*)     ``"query: "``                                        ``"passage: "``     mean
``bge`` (BAAI/bge-*)       ``"Represent this sentence for searching relevant    none                CLS
                           passages: "``
anything else (MiniLM)     none                                                 none                the model's
=========================  ===================================================  ==================  =========

(e5: Wang et al., "Text Embeddings by Weakly-Supervised Contrastive Pre-training", arXiv 2212.03533; bge: the
BAAI/bge model cards; Search-R1's ``retrieval_server.py`` applies the same prefixes.) A checkpoint without a
sentence-transformers config gets mean pooling, which is what e5 needs; checkpoints with one (bge, MiniLM) keep theirs.
Embeddings are L2-normalised, so inner product (``IndexFlatIP``) equals cosine similarity.

Four CPU measures make query encoding fast under rollout load (figures: ``benchmarks/retrieval_bench.py``):

* **Packing** (BERT-family encoders with mean or CLS pooling, which covers MiniLM, e5 and bge): the queries of a
  micro-batch are concatenated into one sequence with per-query position ids and a block-diagonal attention mask, so
  the linear layers, 80% of the work, see no padding at all; pooling is done per query. This is the padding-free
  batching of variable-length inference servers (TEI, vLLM), on the transformers model as it is.
* **Length bucketing** for other encoders. A batch is padded to its longest text, and a transformer's cost grows
  with the padded token count, so one 60-token query in a micro-batch of 15-token queries quadruples the work.
  :func:`plan_length_buckets`
  splits a batch into length-sorted chunks, trading the padding against the fixed cost of a forward pass
  (``bucket_overhead_tokens``, measured on MiniLM with one core: about 8 ms of fixed cost against 0.3 ms per token in
  float32, 0.15 ms in bfloat16).
* **bfloat16 queries**, opt-in (``query_dtype="bfloat16"``), on CPUs with native bf16 (AVX512-BF16 or AMX): about
  1.5x faster at batch 8-32. Passages (index builds) stay float32; against a float32 index the bf16 query vectors
  keep 99% of float32's top-10 (measured on FanOutQA queries over the bundled Wikipedia index), as the fp16 queries
  of the GPU path do. Not the default: see :func:`resolve_query_dtype` for the reproducibility it costs.
* **Splitting** a packed batch over single-threaded worker threads (``encode_workers``), one per core: 1.2-1.3x
  (float32) and 1.4-1.9x (bfloat16) faster at 8-32 queries on an idle 2-core machine, with none of the OpenMP barrier stalls that two threads inside
  one forward pass suffer when another process holds a core. :class:`SplitChooser` keeps measuring both ways and
  splits only while it pays.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from searchrl.errors import FailedPrecondition, InvalidRequest

log = logging.getLogger("searchrl.retriever.embed")

BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "


@dataclass(frozen=True)
class Prefixes:
    """Text prepended to queries and passages before encoding."""

    query: str = ""
    passage: str = ""


def model_family(name: str) -> str:
    """``"e5"``, ``"bge"`` or ``"plain"`` from a model name or path (case-insensitive substring match)."""
    low = name.lower().rstrip("/")
    base = low.rsplit("/", 1)[-1]
    if "e5" in base:
        return "e5"
    if "bge" in base:
        return "bge"
    return "plain"


def prefixes_for(name: str) -> Prefixes:
    """The query/passage prefixes of the model ``name`` or family name (see the module table)."""
    fam = name if name in ("e5", "bge", "plain") else model_family(name)
    if fam == "e5":
        return Prefixes("query: ", "passage: ")
    if fam == "bge":
        return Prefixes(BGE_QUERY_INSTRUCTION, "")
    return Prefixes()


def canonical_model_name(name: str) -> str:
    """The name recorded in index manifests: lower-cased, without a ``sentence-transformers/`` hub prefix.

    ``"sentence-transformers/all-MiniLM-L6-v2"`` and ``"all-minilm-l6-v2"`` both give ``"all-minilm-l6-v2"``; a local
    folder gives its last path component; other hub names keep their organisation (``"intfloat/e5-base-v2"``).
    """
    n = name.strip().rstrip("/")
    if os.path.isdir(n):
        n = os.path.basename(n)
    n = n.lower()
    if n.startswith("sentence-transformers/"):
        n = n.split("/", 1)[1]
    return n


def same_model(a: str, b: str) -> bool:
    """True when two model names/paths denote the same model: equal canonical names or equal last components.

    ``"intfloat/e5-base-v2"`` matches ``"/models/e5-base-v2"``; ``"all-minilm-l6-v2"`` does not match ``"e5-base-v2"``.
    """
    ca, cb = canonical_model_name(a), canonical_model_name(b)
    return ca == cb or ca.rsplit("/", 1)[-1] == cb.rsplit("/", 1)[-1]


QUERY_DTYPES = ("auto", "float32", "bfloat16", "float16")

#: Fixed cost of one ``encode`` call in token units, per query dtype, for :func:`plan_length_buckets` on CPU. Fitted
#: on all-MiniLM-L6-v2 with one thread (batch 1-16 x 8-64 tokens): float32 ~8 ms fixed against ~0.3 ms per padded
#: token; bfloat16 ~7.7 ms against ~0.15 ms.
CPU_BUCKET_OVERHEAD_TOKENS = {"float32": 28.0, "bfloat16": 50.0}


def resolve_query_dtype(query_dtype: str, device: str, fp16: bool) -> str:
    """The dtype queries are encoded in: ``"auto"`` is float16 on CUDA (when ``fp16``) and float32 on CPU.

    bfloat16 on CPU is an opt-in: about 1.5x faster on CPUs with native bf16, but a query's vector then depends on
    which other queries share its micro-batch at the 1e-3 level (float32: 1e-7), enough to reorder near-tied passages,
    so runs stop being reproducible (a resumed training run would see other documents than the uninterrupted one).

    Raises:
        InvalidRequest: unknown dtype name, or float16 asked for on CPU (slow and inexact there).
    """
    if query_dtype not in QUERY_DTYPES:
        raise InvalidRequest(f"unknown query dtype {query_dtype!r}: expected one of {', '.join(QUERY_DTYPES)}")
    on_gpu = device.startswith("cuda")
    if query_dtype == "auto":
        if on_gpu:
            return "float16" if fp16 else "float32"
        return "float32"
    if query_dtype == "float16" and not on_gpu:
        raise InvalidRequest("float16 query encoding needs a GPU; use bfloat16 or float32 on CPU")
    return query_dtype


def plan_length_buckets(lengths: Sequence[int], overhead_tokens: float, max_chunk: int) -> list[list[int]]:
    """Splits a batch into chunks that minimise padded work plus a fixed cost per chunk.

    The cost of a chunk is ``overhead_tokens + len(chunk) * max(length in chunk)``: padding to the longest member, plus
    the fixed cost of one forward pass in token units. Sorting by length and cutting at the optimal places (a dynamic
    program over the sorted order, O(n * max_chunk)) gives the minimum total.

    Args:
        lengths: token count of each text (``n`` entries).
        overhead_tokens: fixed cost of one forward pass, in tokens; ``<= 0`` or ``n <= 1`` gives one chunk per
            ``max_chunk`` texts in length order.
        max_chunk: most texts per chunk (>= 1).

    Returns:
        Chunks of indices into ``lengths``, each sorted by length; together they hold every index once.
    """
    n = len(lengths)
    order = sorted(range(n), key=lambda i: lengths[i])
    if n == 0:
        return []
    max_chunk = max(1, max_chunk)
    if overhead_tokens <= 0 or n == 1:
        return [order[i : i + max_chunk] for i in range(0, n, max_chunk)]
    sorted_len = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of the j shortest texts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = sorted_len[j - 1]
        for i in range(max(0, j - max_chunk), j):
            cost = best[i] + overhead_tokens + (j - i) * longest
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks: list[list[int]] = []
    j = n
    while j > 0:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


#: Most tokens in one packed forward pass: the block-diagonal attention is computed densely, so very long packs would
#: spend more on masked-out attention scores than they save on calls (at 384 tokens it is ~5% of the pass).
PACK_MAX_TOKENS = 384


def packing_plan(model: Any) -> str | None:
    """The pooling mode (``"mean"`` or ``"cls"``) when ``model`` (a ``SentenceTransformer``) can be run packed, else
    ``None``: a BERT-family transformer with sdpa or eager attention, followed by mean (prompt included) or CLS
    pooling and optionally a Normalize module."""
    mods = list(model)
    if len(mods) not in (2, 3) or not hasattr(mods[0], "auto_model"):
        return None
    cfg = mods[0].auto_model.config
    if cfg.model_type != "bert" or getattr(cfg, "_attn_implementation", "eager") not in ("sdpa", "eager"):
        return None
    if type(mods[1]).__name__ != "Pooling" or (len(mods) == 3 and type(mods[2]).__name__ != "Normalize"):
        return None
    pool = mods[1].get_config_dict()
    mode = pool.get("pooling_mode")
    if mode == "cls" or (mode == "mean" and pool.get("include_prompt", True)):
        return str(mode)
    return None


def tokenize(model: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as ``model`` (a ``SentenceTransformer``) sees them: special tokens added, truncated to its
    ``max_seq_length``. Fast tokenizers are not safe to call from several threads at once; callers serialise."""
    return list(
        model.tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=model.max_seq_length)[
            "input_ids"
        ]
    )


def encode_packed(
    model: Any, token_ids: Sequence[Sequence[int]], pooling: str, max_tokens: int = PACK_MAX_TOKENS
) -> np.ndarray:
    """Embeds tokenized texts with no padding: packs of consecutive texts run as one sequence (see the module
    docstring). Touches no tokenizer, so several threads may run it at once on the same model.

    Args:
        model: a ``SentenceTransformer`` for which :func:`packing_plan` returned ``pooling``.
        token_ids: N texts (prefixes applied) tokenized by :func:`tokenize`.
        pooling: ``"mean"`` or ``"cls"``.
        max_tokens: tokens per pack; a longer single text runs alone.

    Returns:
        float32 array ``(N, dimension)``, unit L2 norm per row, equal to the padded ``model.encode`` up to float
        rounding.
    """
    import torch

    ids = token_ids
    lengths = [len(x) for x in ids]
    bert = model[0].auto_model
    device = bert.device
    out = np.empty((len(ids), bert.config.hidden_size), dtype=np.float32)
    start = 0
    while start < len(ids):
        end, total = start + 1, lengths[start]
        while end < len(ids) and total + lengths[end] <= max_tokens:
            total += lengths[end]
            end += 1
        lens = torch.tensor(lengths[start:end], device=device)
        input_ids = torch.tensor([[t for x in ids[start:end] for t in x]], device=device)
        segment = torch.repeat_interleave(torch.arange(end - start, device=device), lens)
        first = torch.cumsum(lens, 0) - lens  # offset of each text in the pack
        positions = (torch.arange(total, device=device) - first[segment]).unsqueeze(0)
        mask = (segment[:, None] == segment[None, :])[None, None]  # (1, 1, T, T), True = may attend
        hidden = (
            bert(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                token_type_ids=torch.zeros_like(input_ids),
            )
            .last_hidden_state[0]
            .float()
        )
        if pooling == "cls":
            pooled = hidden[first]
        else:
            pooled = torch.zeros(end - start, hidden.shape[1], device=device).index_add_(0, segment, hidden)
            pooled = pooled / lens[:, None]
        out[start:end] = torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
        start = end
    return out


def split_by_tokens(lengths: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Cuts ``range(len(lengths))`` into at most ``parts`` contiguous, non-empty ``(start, end)`` ranges of about
    equal token count (texts stay in order)."""
    n = len(lengths)
    parts = max(1, min(parts, n))
    total = sum(lengths)
    bounds, acc, start = [], 0, 0
    for i, length in enumerate(lengths):
        acc += length
        cut_here = acc >= total * (len(bounds) + 1) / parts and len(bounds) < parts - 1
        if cut_here and n - (i + 1) >= parts - 1 - len(bounds):
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, n))
    return [b for b in bounds if b[0] < b[1]]


class SplitChooser:
    """Decides, per batch, whether to encode in one thread or split over the encode worker threads, by measurement.

    Splitting a micro-batch over two single-threaded workers was 1.2-1.9x faster at 8-32 queries on an idle 2-core
    machine, and up to 1.5x slower at 4-8 queries when another process kept one core busy (the halves then share a
    core). So the encoder measures both: per batch-size class (``n.bit_length()``) it keeps an exponentially weighted
    mean of seconds per token for each way, uses the faster, and re-tries the other every ``explore_every``-th batch
    of that class, which follows the machine's load as it changes.

    Args:
        explore_every: every how many batches of a size class the slower way is measured again (>= 2).
        alpha: weight of the newest measurement in the running means.
    """

    def __init__(self, explore_every: int = 16, alpha: float = 0.3) -> None:
        self.explore_every = max(2, explore_every)
        self.alpha = alpha
        self._mean: dict[tuple[int, bool], float] = {}
        self._count: dict[int, int] = {}
        self._lock = threading.Lock()

    def choose(self, n: int) -> bool:
        """True: split this batch of ``n`` texts."""
        size_class = n.bit_length()
        with self._lock:
            count = self._count[size_class] = self._count.get(size_class, 0) + 1
            split, serial = self._mean.get((size_class, True)), self._mean.get((size_class, False))
        if split is None or serial is None:
            return split is None  # measure each way once first
        faster = split < serial
        return (not faster) if count % self.explore_every == 0 else faster

    def record(self, n: int, split: bool, seconds: float, tokens: int) -> None:
        """Adds one measurement: a batch of ``n`` texts and ``tokens`` tokens took ``seconds``."""
        key = (n.bit_length(), split)
        value = seconds / max(1, tokens)
        with self._lock:
            old = self._mean.get(key)
            self._mean[key] = value if old is None else (1 - self.alpha) * old + self.alpha * value

    def snapshot(self) -> dict[str, float]:
        """``{"<size class>/<split|serial>": seconds per token}``, for logs and benchmarks."""
        with self._lock:
            return {f"{c}/{'split' if s else 'serial'}": v for (c, s), v in sorted(self._mean.items())}


def set_torch_threads(n: int) -> None:
    """Sets torch's intra-op thread count once for the process (``n <= 0``: leave torch's default)."""
    if n > 0:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _load_error(model: str, path: str, exc: BaseException, allow_download: bool) -> str:
    """One-line reason a model did not load, with the way out when it is a hub name missing from an offline cache."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    msg = f"cannot load embedding model {model!r} from {path!r}: {first}"
    forced_offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if allow_download and not os.path.isdir(path):
        if forced_offline:
            return msg + " -- HF_HUB_OFFLINE=1 is set in the environment, which blocks --allow-download; unset it."
        return msg + " -- downloads were allowed: check access to the Hugging Face Hub (HF_ENDPOINT, HF_TOKEN)."
    if not allow_download and not os.path.isdir(path):
        hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
        msg += (
            f" -- it is not bundled, not a local folder, and not in the offline Hugging Face cache (HF_HOME={hf_home})."
            " Build the index with 'searchrl index build --allow-download' to download it (the index directory then"
            " stores it in <index-dir>/model/, which 'searchrl serve retriever --index-dir' loads offline), or pass"
            " a local model folder."
        )
    return msg


class Encoder:
    """A sentence-transformers model that embeds queries and passages for inner-product search.

    Args:
        model: the embedded default ``"all-minilm-l6-v2"``, a local folder, or a hub name in the local Hugging Face
            cache (offline: ``HF_HUB_OFFLINE=1`` is set and ``local_files_only``, unless ``allow_download``). The
            name also picks the prefix family (see the module table).
        model_path: load the weights from this folder instead of resolving ``model`` (an index directory's
            ``model/``); ``model`` still gives :attr:`name` and the prefixes.
        allow_download: let sentence-transformers download ``model`` from the Hub when it is not cached (no forced
            offline mode, ``local_files_only=False``); an ``HF_HUB_OFFLINE=1`` set by the caller still wins.
        device: ``"cpu"``, ``"cuda"``... ``None`` picks CUDA when available.
        fp16: half precision on GPU, for queries and passages (ignored on CPU, where fp16 matmuls are slow).
        max_length: token limit per text (``None``: the model's own ``max_seq_length``).
        torch_threads: intra-op threads for CPU inference (``<= 0``: torch's default).
        family: force the prefix family (``"e5"``, ``"bge"``, ``"plain"``) when the name does not reveal it.
        query_dtype: dtype of query encoding, see :func:`resolve_query_dtype` (``"auto"``: float16 on GPU, float32 on
            CPU). Passages are always encoded in the model's dtype (float32 on CPU).
        encode_workers: threads a packed query batch may be split over (CPU; each runs one torch thread); ``<= 0``:
            one per available core, at most 8. :class:`SplitChooser` decides per batch whether splitting pays.
        min_split: smallest batch (texts) that may be split.
        bucket_overhead_tokens: fixed cost of a forward pass in tokens, for :func:`plan_length_buckets` (``None``:
            :data:`CPU_BUCKET_OVERHEAD_TOKENS` on CPU, 0 = no bucketing on GPU, where padding is nearly free).

    Raises:
        FailedPrecondition: the model cannot be loaded; offline, the message says how to get it
            (``searchrl index build --allow-download``, or a local folder).
        InvalidRequest: unknown ``query_dtype``.

    Attributes:
        name: canonical model name (see :func:`canonical_model_name`).
        dimension: embedding size ``d``.
        prefixes: query/passage prefixes in use.
        query_dtype: the resolved query dtype (``"float32"``, ``"bfloat16"`` or ``"float16"``).
    """

    def __init__(
        self,
        model: str = "all-minilm-l6-v2",
        device: str | None = None,
        fp16: bool = True,
        max_length: int | None = None,
        torch_threads: int = 0,
        family: str | None = None,
        query_dtype: str = "auto",
        bucket_overhead_tokens: float | None = None,
        encode_workers: int = 1,
        min_split: int = 8,
        model_path: str | None = None,
        allow_download: bool = False,
    ) -> None:
        if not allow_download:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        import torch
        from sentence_transformers import SentenceTransformer

        from searchrl.assets import embedding_model_path

        with contextlib.suppress(Exception):  # the "Loading weights" bar is noise in service logs
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        set_torch_threads(torch_threads)
        self.name = canonical_model_name(model)
        path = model_path or embedding_model_path(model)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.query_dtype = resolve_query_dtype(query_dtype, device, fp16)
        try:
            self.model = SentenceTransformer(path, device=device, local_files_only=not allow_download)
        except Exception as exc:  # noqa: BLE001 - any load failure is a start-up precondition
            raise FailedPrecondition(_load_error(model, path, exc, allow_download)) from exc
        if fp16 and device.startswith("cuda"):
            self.model.half()
        if max_length is not None:
            self.model.max_seq_length = max_length
        self.model.eval()
        self.dimension = int(self.model.get_embedding_dimension() or 0)
        self.prefixes = prefixes_for(family or model)
        model_dtype = "float16" if fp16 and device.startswith("cuda") else "float32"
        self._query_model = self.model
        if self.query_dtype != model_dtype:  # a second copy of the weights in the query dtype (MiniLM: +45 MB)
            import copy

            self._query_model = copy.deepcopy(self.model).to(getattr(torch, self.query_dtype))
        # Packing pays on CPU, where the cost follows the token count; on GPU a padded batch is as fast.
        self._pooling = packing_plan(self._query_model) if not device.startswith("cuda") else None
        if bucket_overhead_tokens is None:
            bucket_overhead_tokens = CPU_BUCKET_OVERHEAD_TOKENS.get(self.query_dtype, 0.0) if device == "cpu" else 0.0
        self.bucket_overhead_tokens = bucket_overhead_tokens
        # sentence-transformers and fast tokenizers are not documented as thread-safe: calls into them hold this lock.
        # The packed forward pass itself (torch modules in inference mode) runs in several threads at once.
        self._lock = threading.Lock()
        if encode_workers <= 0:
            encode_workers = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        self.encode_workers = encode_workers if self._pooling is not None else 1
        self.min_split = max(2, min_split)
        self.split_chooser = SplitChooser()
        self._pool: ThreadPoolExecutor | None = None
        if self.encode_workers > 1:
            self._pool = ThreadPoolExecutor(
                self.encode_workers - 1,
                thread_name_prefix="searchrl-encode",
                initializer=set_torch_threads,
                initargs=(torch.get_num_threads(),),
            )

    def _encode(self, texts: Sequence[str], prefix: str, batch_size: int, progress: bool, model: Any) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        import torch

        with self._lock, torch.inference_mode():
            emb = model.encode(
                list(texts),
                prompt=prefix or None,
                batch_size=batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=progress,
            )
        emb = np.asarray(emb, dtype=np.float32)
        if model is not self.model:  # renormalise in float32: a bf16/fp16 norm is off by up to ~1e-3
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(emb)

    def token_lengths(self, texts: Sequence[str], prefix: str = "") -> list[int]:
        """Token counts of ``prefix + text`` as the model sees them (special tokens included, truncated)."""
        with self._lock:
            return [len(ids) for ids in tokenize(self.model, [prefix + t for t in texts])]

    def encode_queries(self, queries: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embeds queries with the query prefix.

        Queries are encoded in :attr:`query_dtype`; on CPU a batch is packed without padding
        (:func:`encode_packed`) or, for encoders that cannot be packed, split into length buckets
        (:func:`plan_length_buckets`) so that short queries are not padded to a long one.

        Returns:
            float32 array ``(len(queries), dimension)``, unit L2 norm per row.
        """
        n = len(queries)
        if n and self._pooling is not None:
            return self._encode_packed_queries(queries)
        if n <= 1 or self.bucket_overhead_tokens <= 0:
            return self._encode(queries, self.prefixes.query, batch_size, False, self._query_model)
        chunks = plan_length_buckets(
            self.token_lengths(queries, self.prefixes.query), self.bucket_overhead_tokens, batch_size
        )
        out = np.empty((n, self.dimension), dtype=np.float32)
        for chunk in chunks:
            out[chunk] = self._encode(
                [queries[i] for i in chunk], self.prefixes.query, len(chunk), False, self._query_model
            )
        return out

    def _encode_packed_queries(self, queries: Sequence[str]) -> np.ndarray:
        import torch

        assert self._pooling is not None
        with self._lock:
            ids = tokenize(self._query_model, [self.prefixes.query + q for q in queries])
        n = len(ids)
        split = self._pool is not None and n >= self.min_split and self.split_chooser.choose(n)
        tokens = sum(len(x) for x in ids)
        t0 = time.perf_counter()

        def part(start: int, end: int) -> np.ndarray:
            with torch.inference_mode():
                return encode_packed(self._query_model, ids[start:end], self._pooling or "mean")

        if not split:
            out = part(0, n)
        else:
            assert self._pool is not None
            ranges = split_by_tokens([len(x) for x in ids], self.encode_workers)
            futures = [self._pool.submit(part, a, b) for a, b in ranges[1:]]
            first = part(*ranges[0])  # this thread takes a share too
            out = np.concatenate([first, *(f.result() for f in futures)])
        if self._pool is not None and n >= self.min_split:
            self.split_chooser.record(n, split, time.perf_counter() - t0, tokens)
        return out

    def close(self) -> None:
        """Stops the encode worker threads (the encoder stays usable, without splitting)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def save(self, target: str | os.PathLike[str]) -> str:
        """Writes the model (float32 weights, tokenizer, pooling) as a sentence-transformers folder at ``target``.

        The folder is written next to ``target`` and renamed over it, so a crash leaves the old folder or none.
        :class:`Encoder` (``model_path=target``) loads it offline. Returns ``target``.
        """
        import copy
        import shutil

        import torch

        target = os.fspath(target)
        tmp = target.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model = self.model
        if any(p.dtype != torch.float32 for p in model.parameters()):  # fp16 on GPU: store float32 for CPU loads
            model = copy.deepcopy(model).float()
        with self._lock:
            model.save(tmp, create_model_card=False)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(tmp, target)
        return target

    def encode_passages(self, passages: Sequence[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Embeds passages (``"title\\ntext"``) with the passage prefix.

        Returns:
            float32 array ``(len(passages), dimension)``, unit L2 norm per row.
        """
        return self._encode(passages, self.prefixes.passage, batch_size, progress, self.model)
