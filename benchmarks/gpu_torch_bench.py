"""searchrl's torch paths on one CUDA GPU, with random-init models: no weights, no network, no vLLM/SGLang/faiss.

Measures, with models of the Qwen2.5-0.5B and Qwen2.5-1.5B shapes (``Qwen2Config``: hidden 896/1536, layers 24/28,
heads 14/12, KV heads 2/2, intermediate 4864/8960, vocab 151936, tied embeddings) and BERT encoders of the
all-MiniLM-L6-v2 / e5-base-v2 shapes, all randomly initialised:

* ``rollout``: :class:`searchrl.services.policy.engines.transformers.TransformersEngine` (continuous batching, stop strings,
  log-probs) given the model object, as the local trainer does; 1 and 16 concurrent requests, each sampling 256 tokens
  at T=1 after a 256-token prompt whose first half all rows share (the system prompt); bfloat16 weights on CUDA,
  float32 on CPU. Result: generated tokens/s.
* ``grpo``: one GRPO update of the local trainer, ``GRPOUpdater.update`` (``searchrl.trainer.local.update``) on 4 questions
  x 4 samples, float32 master weights + AdamW, forward passes under bfloat16 autocast (``model.dtype: bfloat16``),
  the loss from ``searchrl.trainer.grpo`` (verl ``core_algos``). Result: seconds per update (mean of 2 after a
  warm-up).
* ``encoder``: the retriever's query encoder, :class:`searchrl.retriever.embed.Encoder` (float16 on CUDA), on batches
  of 32 and 256 twelve-word queries. Result: queries/s.

Each row also reports the peak GPU memory of its measurement (``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``). It prints one markdown table (device name, torch and its CUDA version, transformers
version above it), writes it as JSON with ``--json``, and exits 1 when any row failed (the row says why). Sized for
1-3 minutes on one H200 (8 at most: rows not started after ``--time-budget`` seconds, default 420, are skipped).

Runs from a checkout with searchrl installed (``python benchmarks/gpu_torch_bench.py``), and on a bare GPU machine
that holds only torch, transformers, tokenizers and sentence-transformers (e.g. torch 2.11 + CUDA 13 on Python 3.12):
when ``searchrl`` is not installed, the script imports it from the repository tree around it (the folders that hold
the ``searchrl`` namespace, pyproject.toml ``dev-mode-dirs``). The pure-Python packages such a machine lacks are carried as wheels (about 6 MB). Prepare them here,
in the repository root, once::

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        verl==0.9.1 tensordict==0.10.0 pyvers==0.1.0 omegaconf==2.3.1 codetiming==1.4.0 protobuf==7.36.2 \
        orjson==3.13.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing-extensions==4.16.0
    python3 -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # omegaconf's pin: sdist only, pure Python

and run, with the device tool (``run``, ``carry: [".whl"]``, ``timeout_s: 540``)::

    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_torch_bench.py \
      --device cuda --json $OUT/gpu_torch_bench.json 2>&1 | tee $OUT/gpu_torch_bench.log

Ray (a 79 MB wheel) cannot be carried: verl imports it at package import but its loss functions never call it, so
when ``ray`` is missing the script registers a stand-in module for that import only (any use of it raises) and says
so above the table. protobuf is carried because the generated code in ``searchrl/*/v1`` needs protobuf >= 7.35.

CPU check (the test suite runs it): ``python benchmarks/gpu_torch_bench.py --device cpu --tiny`` (tiny shapes,
seconds). Without ``--device``, a machine with no CUDA device prints why and exits 0, so ``make bench`` passes on CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
STOP_STRINGS = ("</search>", "</answer>")  # what the ReSearch agent loop sends every turn


# --------------------------------------------------------------------------------------------------- bootstrap
def source_roots(root: Path) -> list[Path]:
    """The folders that hold the ``searchrl`` namespace in a checkout (pyproject.toml ``dev-mode-dirs``: the core in
    ``searchrl/`` and each application in ``<app>/searchrl/<app>/``), as an editable install puts them on sys.path.

    Raises:
        FileNotFoundError: ``root/pyproject.toml`` is missing.
        KeyError: it has no ``[tool.hatch.build.targets.wheel] dev-mode-dirs``.
    """
    import tomllib

    config = tomllib.loads((root / "pyproject.toml").read_text())
    return [(root / d).resolve() for d in config["tool"]["hatch"]["build"]["targets"]["wheel"]["dev-mode-dirs"]]


def ensure_searchrl(root: Path = REPO_ROOT) -> str:
    """Makes ``import searchrl.*`` work: the installed package if there is one, else the source tree at ``root``.

    Returns:
        ``"installed"`` or ``"source tree <root>"``.
    """
    try:
        if importlib.util.find_spec("searchrl.trainer") is not None:
            return "installed"
    except ModuleNotFoundError:
        pass
    for name in [m for m in sys.modules if m == "searchrl" or m.startswith("searchrl.")]:
        del sys.modules[name]  # a namespace package found earlier would keep its old, partial __path__
    sys.path[:0] = [str(p) for p in source_roots(root)]
    importlib.invalidate_caches()
    return f"source tree {root}"


def ensure_ray_importable() -> str:
    """verl imports ``ray`` at package import; when it is not installed, registers a stand-in for that import only.

    verl's algorithm functions that the local trainer calls (``core_algos``, ``torch_functional``) never use Ray; the
    only attribute read at import is the ``ray.ObjectRef`` annotation of ``verl.protocol.DataProtoFuture``. Any other
    attribute of the stand-in raises ``AttributeError`` naming the missing package.

    Returns:
        ``"installed"`` or ``"stand-in (not installed)"``.
    """
    if importlib.util.find_spec("ray") is not None:
        return "installed"
    stub = types.ModuleType("ray", "stand-in for verl's `import ray` (gpu_torch_bench.py); Ray is not installed")

    class ObjectRef:
        """Placeholder type: never instantiated."""

    def __getattr__(name: str) -> Any:
        raise AttributeError(f"ray.{name}: Ray is not installed here (gpu_torch_bench.py registered a stand-in)")

    stub.ObjectRef = ObjectRef  # type: ignore[attr-defined]
    stub.__getattr__ = __getattr__  # type: ignore[method-assign]
    stub.__spec__ = importlib.machinery.ModuleSpec("ray", None)
    sys.modules["ray"] = stub
    return "stand-in (not installed)"


# --------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class LMShape:
    """A decoder-only LM shape (``Qwen2Config`` fields)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class EncoderShape:
    """A BERT encoder shape (``BertConfig`` fields)."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int


# Qwen2.5-0.5B / 1.5B (their config.json: both tie the input and output embeddings, rope theta 1e6)
QWEN25_05B = LMShape("qwen2.5-0.5b", 896, 24, 14, 2, 4864, 151936)
QWEN25_15B = LMShape("qwen2.5-1.5b", 1536, 28, 12, 2, 8960, 151936)
# all-MiniLM-L6-v2 (the bundled default) and intfloat/e5-base-v2 (the wiki-18 preset)
MINILM_L6 = EncoderShape("minilm-l6", 384, 6, 12, 1536, 30522)
E5_BASE = EncoderShape("e5-base", 768, 12, 12, 3072, 30522)
TINY_LMS = (LMShape("tiny-qwen2.5-0.5b", 64, 2, 4, 2, 128, 1024), LMShape("tiny-qwen2.5-1.5b", 96, 2, 6, 2, 192, 1024))
TINY_ENCODERS = (EncoderShape("tiny-minilm-l6", 32, 2, 2, 64, 512), EncoderShape("tiny-e5-base", 48, 2, 4, 96, 512))


@dataclass(frozen=True)
class Sizes:
    """Workload sizes of one run (full or ``--tiny``)."""

    lms: tuple[LMShape, ...]
    encoders: tuple[EncoderShape, ...]
    prompt_tokens: int
    new_tokens: int
    rollout_batches: tuple[int, ...] = (1, 16)
    grpo_questions: int = 4
    grpo_group: int = 4
    grpo_micro_batch: int = 4
    grpo_response_tokens: int = 512
    grpo_timed_updates: int = 2
    encoder_batches: tuple[int, ...] = (32, 256)
    encoder_min_seconds: float = 2.0
    query_words: int = 12


FULL = Sizes(lms=(QWEN25_05B, QWEN25_15B), encoders=(MINILM_L6, E5_BASE), prompt_tokens=256, new_tokens=256)
TINY = Sizes(
    lms=TINY_LMS,
    encoders=TINY_ENCODERS,
    prompt_tokens=16,
    new_tokens=8,
    grpo_questions=2,
    grpo_group=2,
    grpo_micro_batch=2,
    grpo_response_tokens=12,
    grpo_timed_updates=1,
    encoder_min_seconds=0.0,
)


@dataclass
class Row:
    """One measurement; ``error`` is set when it failed, ``skipped`` when the time budget ran out first."""

    section: str
    model: str
    setting: str
    metric: str
    value: float | None = None
    unit: str = ""
    seconds: float = 0.0
    peak_mem_bytes: int | None = None
    note: str = ""
    error: str = ""
    skipped: str = ""
    extra: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------- builders
def build_lm_tokenizer(vocab: int) -> Any:
    """A fast tokenizer over ``vocab`` word tokens ``t0 t1 ...`` with ``<|endoftext|>`` as EOS and padding.

    Built with the ``tokenizers`` library (no files, no network): every model id decodes to a token, so stop-string
    checks see real text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    words = {"<unk>": 0, **{f"t{i}": i for i in range(1, vocab - 1)}, eos: vocab - 1}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, unk_token="<unk>")


def build_lm(shape: LMShape, tokenizer: Any, device: str, dtype: Any) -> Any:
    """A randomly initialised ``Qwen2ForCausalLM`` of ``shape``, created directly on ``device`` in ``dtype``."""
    import inspect

    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    kwargs: dict[str, Any] = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    params = inspect.signature(Qwen2Config.__init__).parameters
    if "rope_parameters" in params:  # transformers 5
        kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    else:  # transformers 4
        kwargs["rope_theta"] = 1_000_000.0
    config = Qwen2Config(**kwargs)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device (seconds for 1.5B parameters on a GPU, not minutes)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()  # a no-op unless from_config ignored the device context


def build_encoder_dir(shape: EncoderShape, folder: Path) -> Path:
    """Writes a randomly initialised BERT of ``shape`` as a sentence-transformers folder (mean pooling, normalised).

    The layout is the classic one the bundled all-MiniLM-L6-v2 uses (``modules.json``, ``1_Pooling``), which every
    sentence-transformers release loads. The WordPiece vocabulary is ``[PAD] [UNK] [CLS] [SEP] [MASK] w0 w1 ...``.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text(
        "\n".join(specials + [f"w{i}" for i in range(shape.vocab - len(specials))]) + "\n"
    )
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=False)
    torch.manual_seed(0)
    model = BertModel(
        BertConfig(
            vocab_size=shape.vocab,
            hidden_size=shape.hidden,
            num_hidden_layers=shape.layers,
            num_attention_heads=shape.heads,
            intermediate_size=shape.intermediate,
            max_position_embeddings=512,
        )
    )
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": shape.hidden,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
                "pooling_mode_mean_sqrt_len_tokens": False,
            }
        )
    )
    return folder


# --------------------------------------------------------------------------------------------------- measuring
class Meter:
    """Wall time and peak device memory of one measurement (CUDA: synchronised, ``max_memory_allocated``)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")
        self.seconds = 0.0
        self.peak: int | None = None

    def __enter__(self) -> Meter:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = int(self.torch.cuda.max_memory_allocated())
        self.seconds = time.perf_counter() - self._t0


def free_device_memory(device: str) -> None:
    """Returns cached blocks to the driver between sections (so each row's peak is its own)."""
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def prompts_for(tokenizer: Any, vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` ids: a shared first half (the system prompt every episode has) + a random rest."""
    rng = random.Random(seed)
    hi = vocab - 2  # ids 1..vocab-2 are plain words; 0 is <unk>, vocab-1 is EOS
    shared = [rng.randint(1, hi) for _ in range(length // 2)]
    return [shared + [rng.randint(1, hi) for _ in range(length - len(shared))] for _ in range(n)]


def bench_rollout(shape: LMShape, sizes: Sizes, device: str, budget: Callable[[], str]) -> list[Row]:
    """TransformersEngine: generated tokens/s at each batch size in ``sizes.rollout_batches``."""
    import torch

    from searchrl.agent.settings import SamplingParams
    from searchrl.services.policy.engines.transformers import TransformersEngine

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtype_name = str(dtype).replace("torch.", "")
    rows = [
        Row("rollout", shape.name, f"batch {b}", "generated tokens/s", unit="tok/s", note=dtype_name)
        for b in sizes.rollout_batches
    ]
    tok = build_lm_tokenizer(shape.vocab)
    model = build_lm(shape, tok, device, dtype)
    engine = TransformersEngine(model, tokenizer=tok, max_batch_size=max(sizes.rollout_batches), batch_wait_ms=5.0)

    async def run(prompts: list[list[int]], new_tokens: int) -> int:
        sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0)
        outs = await asyncio.gather(
            *(engine.generate(p, sampling, stop=STOP_STRINGS, seed=i) for i, p in enumerate(prompts))
        )
        return sum(len(o.token_ids) for o in outs)

    async def main() -> None:
        try:
            await run(prompts_for(tok, shape.vocab, 2, sizes.prompt_tokens, seed=1), 4)  # warm-up (kernels, caches)
            for row, batch in zip(rows, sizes.rollout_batches, strict=True):
                if reason := budget():
                    row.skipped = reason
                    continue
                prompts = prompts_for(tok, shape.vocab, batch, sizes.prompt_tokens, seed=batch)
                try:
                    with Meter(device) as m:
                        tokens = await run(prompts, sizes.new_tokens)
                except Exception as exc:  # noqa: BLE001 - reported in the row
                    row.error = f"{type(exc).__name__}: {exc}"
                    continue
                row.value, row.seconds, row.peak_mem_bytes = tokens / m.seconds, m.seconds, m.peak
                row.extra = {"tokens": float(tokens), "prompt_tokens": float(sizes.prompt_tokens)}
        finally:
            await engine.close()

    try:
        asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - e.g. the warm-up failed: every unmeasured row says why
        for row in rows:
            if row.value is None and not row.skipped:
                row.error = row.error or f"{type(exc).__name__}: {exc}"
    engine = model = None  # noqa: F841 - drop the model before the next section
    free_device_memory(device)
    return rows


def grpo_episodes(sizes: Sizes, vocab: int, seed: int = 0) -> list[Any]:
    """Scored episodes as ``GRPOUpdater.update`` takes them: ``questions x group`` responses of varied length.

    Each response has an inserted ``<result>`` span (loss mask 0) in its middle, like a ReSearch episode with one
    search; rewards alternate 0/1 inside each group so every advantage is non-zero.
    """
    from searchrl.trainer.local.update import EpisodeData

    rng = random.Random(seed)
    hi = vocab - 2
    out = []
    for q in range(sizes.grpo_questions):
        prompt = [rng.randint(1, hi) for _ in range(sizes.prompt_tokens)]
        for s in range(sizes.grpo_group):
            n = rng.randint(max(2, sizes.grpo_response_tokens // 2), sizes.grpo_response_tokens)
            mask = [1] * n
            span = n // 8
            for i in range(n // 2 - span // 2, n // 2 - span // 2 + span):
                mask[i] = 0
            out.append(
                EpisodeData(
                    prompt_ids=prompt,
                    response_ids=[rng.randint(1, hi) for _ in range(n)],
                    loss_mask=mask,
                    rollout_logprobs=[-math.log(vocab)] * n,
                    reward=float(s % 2),
                    group=f"q{q}",
                )
            )
    return out


def bench_grpo(shape: LMShape, sizes: Sizes, device: str, budget: Callable[[], str]) -> list[Row]:
    """One local GRPO update (``GRPOUpdater.update``) in bfloat16 autocast: seconds per update and peak memory."""
    import torch

    from searchrl.trainer.config import TrainConfig
    from searchrl.trainer.local.update import GRPOUpdater

    episodes = sizes.grpo_questions * sizes.grpo_group
    row = Row(
        "grpo",
        shape.name,
        f"{sizes.grpo_questions}x{sizes.grpo_group} episodes, micro {sizes.grpo_micro_batch}",
        "seconds per update",
        unit="s",
        note="fp32 master + AdamW, bf16 autocast",
    )
    if reason := budget():
        row.skipped = reason
        return [row]
    try:
        config = TrainConfig.model_validate(
            {
                "model": {"dtype": "bfloat16"},
                "data": {"batch_size": sizes.grpo_questions, "group_size": sizes.grpo_group},
                "algorithm": {"micro_batch_size": sizes.grpo_micro_batch},
            }
        )
        # What LocalTrainer.setup() builds around the update, minus loading a checkpoint, MLflow and the rollout side:
        # float32 master weights and a frozen float32 reference (bfloat16 only through autocast), AdamW, warm-up.
        tok = build_lm_tokenizer(shape.vocab)
        model = build_lm(shape, tok, device, torch.float32)
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        trainer = GRPOUpdater(model, ref, config, int(tok.pad_token_id))
        data = grpo_episodes(sizes, shape.vocab)
        trainer.update(data)  # warm-up: kernels, autotuning, optimizer state allocation
        times, peak, metrics = [], 0, {}
        for _ in range(sizes.grpo_timed_updates):
            with Meter(device) as m:
                metrics = trainer.update(data)
            times.append(m.seconds)
            peak = max(peak, m.peak or 0)
        row.value = sum(times) / len(times)
        row.seconds = sum(times)
        row.peak_mem_bytes = peak if device.startswith("cuda") else None
        tokens = sum(len(d.prompt_ids) + len(d.response_ids) for d in data)
        row.extra = {
            "episodes": float(episodes),
            "tokens_per_update": float(tokens),
            "update_tokens_per_s": tokens / row.value,
            "loss": float(metrics.get("actor/loss", float("nan"))),
            "grad_norm": float(metrics.get("actor/grad_norm", float("nan"))),
        }
        if not all(math.isfinite(v) for v in (row.extra["loss"], row.extra["grad_norm"])):
            row.error = f"non-finite update: loss {row.extra['loss']}, grad norm {row.extra['grad_norm']}"
    except Exception as exc:  # noqa: BLE001 - reported in the row
        row.error = f"{type(exc).__name__}: {exc}"
    trainer = None  # noqa: F841 - drop the models and optimizer state before the next section
    free_device_memory(device)
    return [row]


def bench_encoder(
    shape: EncoderShape, sizes: Sizes, device: str, workdir: Path, budget: Callable[[], str]
) -> list[Row]:
    """The retriever's query ``Encoder``: queries/s at each batch size in ``sizes.encoder_batches``."""
    from searchrl.retriever.embed import Encoder

    rows = [
        Row("encoder", shape.name, f"batch {b}", "queries/s", unit="q/s", note=f"{sizes.query_words}-word queries")
        for b in sizes.encoder_batches
    ]
    try:
        folder = build_encoder_dir(shape, workdir / shape.name)
        encoder = Encoder(str(folder), device=device, fp16=True)
    except Exception as exc:  # noqa: BLE001 - reported in the rows
        for row in rows:
            row.error = f"{type(exc).__name__}: {exc}"
        return rows
    for row in rows:
        row.note += f", {encoder.query_dtype}"
    rng = random.Random(0)
    n_words = shape.vocab - 5
    try:
        encoder.encode_queries([" ".join(f"w{rng.randrange(n_words)}" for _ in range(sizes.query_words))] * 4)
        for row, batch in zip(rows, sizes.encoder_batches, strict=True):
            if reason := budget():
                row.skipped = reason
                continue
            queries = [" ".join(f"w{rng.randrange(n_words)}" for _ in range(sizes.query_words)) for _ in range(batch)]
            try:
                encoder.encode_queries(queries, batch_size=batch)  # warm-up at this shape
                reps = 0
                with Meter(device) as m:
                    start = time.perf_counter()
                    while True:
                        vecs = encoder.encode_queries(queries, batch_size=batch)
                        reps += 1
                        if reps >= 3 and time.perf_counter() - start >= sizes.encoder_min_seconds:
                            break
            except Exception as exc:  # noqa: BLE001 - reported in the row
                row.error = f"{type(exc).__name__}: {exc}"
                continue
            if vecs.shape != (batch, encoder.dimension):
                row.error = f"encode_queries returned shape {vecs.shape}, expected {(batch, encoder.dimension)}"
                continue
            row.value, row.seconds, row.peak_mem_bytes = batch * reps / m.seconds, m.seconds, m.peak
            row.extra = {"repeats": float(reps)}
    finally:
        encoder.close()
    del encoder
    free_device_memory(device)
    return rows


# --------------------------------------------------------------------------------------------------- report
def environment(device: str, searchrl_from: str, ray_from: str) -> dict[str, str]:
    """Device name, versions and where searchrl/ray came from, for the table header and the JSON."""
    import torch
    import transformers

    env = {
        "device": device,
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "searchrl": searchrl_from,
        "ray": ray_from,
    }
    if device.startswith("cuda"):
        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        env["device_name"] = props.name
        env["device_memory_gib"] = f"{props.total_memory / 2**30:.1f}"
        env["compute_capability"] = f"{props.major}.{props.minor}"
    return env


def _fmt_value(row: Row) -> str:
    if row.error:
        return "FAILED: " + row.error.splitlines()[0][:160]
    if row.skipped:
        return "skipped: " + row.skipped
    if row.value is None:
        return "not measured"
    return f"{row.value:,.3f} {row.unit}" if row.unit == "s" else f"{row.value:,.1f} {row.unit}"


def format_table(env: dict[str, str], rows: Sequence[Row]) -> str:
    """The result as one markdown table, with the environment above it."""
    head = ", ".join(f"{k} {v}" for k, v in env.items())
    lines = [
        f"gpu_torch_bench: {head}",
        "",
        "| section | model | setting | result | peak GPU memory | notes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r.peak_mem_bytes / 2**30:.2f} GiB" if r.peak_mem_bytes is not None else "n/a"
        notes = r.note
        if "update_tokens_per_s" in r.extra:
            notes += f"; {r.extra['update_tokens_per_s']:,.0f} tok/s of update"
        lines.append(f"| {r.section} | {r.model} | {r.setting} | {_fmt_value(r)} | {peak} | {notes} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main
SECTIONS = ("rollout", "grpo", "encoder")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the selected sections and prints the table; returns 0, or 1 when a row failed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="torch device: cuda (default), cuda:N or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and lengths (CPU test; seconds)")
    parser.add_argument("--json", metavar="OUT", help="also write the environment and rows as JSON here")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}"
    )
    parser.add_argument(
        "--time-budget", type=float, default=420.0, help="seconds; rows not started by then are reported as skipped"
    )
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")

    import torch

    device = args.device or "cuda"
    if device.startswith("cuda") and not torch.cuda.is_available():
        msg = f"gpu_torch_bench: torch {torch.__version__} sees no CUDA device"
        if args.device is None:  # `make bench` on a CPU machine: nothing to measure here
            print(f"{msg}; skipped (pass --device cpu --tiny for the CPU check)")
            return 0
        print(f"{msg}; --device {device} cannot run", file=sys.stderr)
        return 1

    searchrl_from = ensure_searchrl()
    ray_from = ensure_ray_importable()
    sizes = TINY if args.tiny else FULL
    started = time.monotonic()

    def budget() -> str:
        spent = time.monotonic() - started
        return f"time budget {args.time_budget:.0f} s spent" if spent > args.time_budget else ""

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="gpu-torch-bench-") as tmp:
        if "rollout" in sections:
            for shape in sizes.lms:
                rows += bench_rollout(shape, sizes, device, budget)
        if "grpo" in sections:
            for shape in sizes.lms:
                rows += bench_grpo(shape, sizes, device, budget)
        if "encoder" in sections:
            for enc in sizes.encoders:
                rows += bench_encoder(enc, sizes, device, Path(tmp), budget)
    env = environment(device, searchrl_from, ray_from)
    env["wall_s"] = f"{time.monotonic() - started:.0f}"
    print(format_table(env, rows), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=2))
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
