"""Supervised fine-tuning of the simulation LLM (ZeroSearch, arXiv 2505.04588, section 3.3).

ZeroSearch makes a model a better search simulator with a light SFT: collect trajectories of a policy that searched a
*real* engine; the query -> documents pairs of trajectories that reached the right answer are examples of USEFUL
documents, those of trajectories that got it wrong examples of NOISY ones. The examples use the very prompt the
simulator serves with (:func:`searchrl.simulator.prompts.sft_messages`), conditioned on the question and gold answer.

* :func:`collect_sft_rows` reads the rollout store (:class:`searchrl.services.rollouts.store.RolloutStore`), keeps
  searches answered by the real retriever (``SearchCall.backend == "retriever"``, no error, at least one document),
  labels each by the trajectory's answer F1 against its gold answers (SQuAD-normalised token F1,
  :func:`searchrl.reward.scoring.f1_score`): USEFUL when ``F1 >= useful_min_f1``, NOISY when
  ``F1 <= noisy_max_f1``, skipped in between.
* :func:`write_jsonl` writes conversational prompt/completion rows (the format TRL's ``SFTTrainer`` takes; the loss is
  on the completion only).
* :func:`train_sft` fine-tunes with TRL's ``SFTTrainer`` and saves a checkpoint (model + tokenizer) that
  ``searchrl serve simulator --model DIR`` loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from searchrl.rollout.v1 import rollout_pb2
from searchrl.simulator.curriculum import Quality
from searchrl.simulator.parsing import truncate_words
from searchrl.simulator.prompts import DOC_WORDS, Conditioning, sft_messages

log = logging.getLogger("searchrl.simulator.sft")

REAL_BACKEND = "retriever"


@dataclass
class CollectStats:
    """What :func:`collect_sft_rows` saw.

    Attributes:
        trajectories: trajectories read.
        searches: retriever searches considered.
        rows: rows written, by quality (``"useful"``/``"noisy"``).
        skipped: searches not used, by reason (``other_backend``, ``error``, ``no_documents``, ``ambiguous_f1``).
    """

    trajectories: int = 0
    searches: int = 0
    rows: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)


def label_trajectory(
    trajectory: rollout_pb2.Trajectory, useful_min_f1: float = 0.8, noisy_max_f1: float = 0.0
) -> Quality | None:
    """USEFUL when the trajectory reached the right answer, NOISY when it did not, ``None`` when in between.

    Args:
        trajectory: a finished trajectory with ``answer`` and ``golden_answers``.
        useful_min_f1: answer F1 at or above which the documents count as useful.
        noisy_max_f1: answer F1 at or below which they count as noisy.

    Returns:
        The label, or ``None`` for an F1 strictly between the thresholds or a trajectory without gold answers.
    """
    from searchrl.reward.scoring import f1_score

    golds = [g for g in trajectory.golden_answers if g.strip()]
    if not golds:
        return None
    f1 = f1_score(trajectory.answer, golds) if trajectory.answer.strip() else 0.0
    if f1 >= useful_min_f1:
        return Quality.USEFUL
    if f1 <= noisy_max_f1:
        return Quality.NOISY
    return None


def document_text(doc: rollout_pb2.Document, max_words: int) -> str:
    """A retrieved document as the simulator should write it: its title on the first line, then the body cut to
    ``max_words`` words (at a sentence end when possible)."""
    body = truncate_words(" ".join(doc.text.split()), max_words)
    title = " ".join(doc.title.split())
    return f"{title}\n{body}" if title and body else (body or title)


def rows_from_trajectory(
    trajectory: rollout_pb2.Trajectory,
    stats: CollectStats | None = None,
    *,
    useful_min_f1: float = 0.8,
    noisy_max_f1: float = 0.0,
    max_doc_words: int = 2 * DOC_WORDS,
    max_docs: int = 5,
    condition: bool = True,
) -> list[dict[str, Any]]:
    """SFT rows (one per retriever search) of one trajectory.

    Args:
        trajectory: the trajectory.
        stats: counters to update (optional).
        useful_min_f1, noisy_max_f1: labelling thresholds (see :func:`label_trajectory`).
        max_doc_words: words kept per document.
        max_docs: documents kept per search (ZeroSearch top-k 5).
        condition: put the question and gold answers in the prompt (ZeroSearch's training-time prompt).

    Returns:
        Rows ``{"prompt": [...], "completion": [...], "quality", "query", "trajectory_id"}``.
    """
    stats = stats if stats is not None else CollectStats()
    searches = [t.search for t in trajectory.turns if t.HasField("search")]
    label = label_trajectory(trajectory, useful_min_f1, noisy_max_f1)
    rows: list[dict[str, Any]] = []
    for call in searches:
        if call.backend != REAL_BACKEND:
            stats.skipped["other_backend"] += 1
            continue
        stats.searches += 1
        if call.error:
            stats.skipped["error"] += 1
            continue
        texts = [document_text(d, max_doc_words) for d in call.documents[:max_docs]]
        texts = [t for t in texts if t.strip()]
        if not texts or not call.query.strip():
            stats.skipped["no_documents"] += 1
            continue
        if label is None:
            stats.skipped["ambiguous_f1"] += 1
            continue
        cond = Conditioning(trajectory.question, tuple(trajectory.golden_answers)) if condition else None
        prompt, completion = sft_messages(call.query, label, texts, cond)
        rows.append(
            {
                "prompt": prompt,
                "completion": completion,
                "quality": label.value,
                "query": call.query,
                "trajectory_id": trajectory.id,
            }
        )
        stats.rows[label.value] += 1
    return rows


async def collect_sft_rows(
    redis_url: str,
    stream: str = "searchrl:rollouts",
    *,
    limit: int = 0,
    useful_min_f1: float = 0.8,
    noisy_max_f1: float = 0.0,
    max_doc_words: int = 2 * DOC_WORDS,
    condition: bool = True,
) -> tuple[list[dict[str, Any]], CollectStats]:
    """Reads every trajectory of the rollout stream and builds SFT rows (see :func:`rows_from_trajectory`).

    Args:
        redis_url: Redis of the rollout store.
        stream: the stream key.
        limit: stop after this many rows (0: no limit).
        useful_min_f1, noisy_max_f1, max_doc_words, condition: see :func:`rows_from_trajectory`.

    Returns:
        The rows and the statistics.

    Raises:
        searchrl.errors.Unavailable: Redis is down.
    """
    from searchrl.services.rollouts.store import RolloutStore

    stats = CollectStats()
    rows: list[dict[str, Any]] = []
    async with RolloutStore(redis_url, stream=stream) as store:
        async for _entry_id, trajectory in store.iter_all():
            stats.trajectories += 1
            rows.extend(
                rows_from_trajectory(
                    trajectory,
                    stats,
                    useful_min_f1=useful_min_f1,
                    noisy_max_f1=noisy_max_f1,
                    max_doc_words=max_doc_words,
                    condition=condition,
                )
            )
            if limit and len(rows) >= limit:
                rows = rows[:limit]
                break
    return rows, stats


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> int:
    """Writes rows as JSON lines (UTF-8); returns how many."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads SFT rows, checking that each has ``prompt`` and ``completion`` message lists.

    Raises:
        ValueError: a line that is not JSON or lacks the fields, or an empty file.
    """
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not JSON: {exc}") from None
            if not isinstance(row.get("prompt"), list) or not isinstance(row.get("completion"), list):
                raise ValueError(f"{path}:{n}: a row needs 'prompt' and 'completion' message lists")
            rows.append({"prompt": row["prompt"], "completion": row["completion"]})
    if not rows:
        raise ValueError(f"{path}: no SFT rows")
    return rows


@dataclass
class SFTResult:
    """Outcome of :func:`train_sft`.

    Attributes:
        output_dir: the checkpoint directory (loadable with ``from_pretrained`` and ``searchrl serve simulator``).
        steps: optimizer steps run.
        train_loss: mean training loss over the run (cross-entropy on completion tokens, nats/token).
        losses: the logged per-step losses.
    """

    output_dir: str
    steps: int
    train_loss: float
    losses: list[float]


def train_sft(
    data: str | os.PathLike[str] | Sequence[dict[str, Any]],
    model: str,
    output_dir: str | os.PathLike[str],
    *,
    max_steps: int = 100,
    learning_rate: float = 1e-5,
    batch_size: int = 4,
    grad_accum: int = 1,
    max_length: int = 1024,
    seed: int = 0,
    bf16: bool | None = None,
) -> SFTResult:
    """Fine-tunes the simulator with TRL's ``SFTTrainer`` (completion-only loss) and saves the checkpoint.

    Args:
        data: a JSONL file from ``searchrl simulator sft-data`` or the rows themselves.
        model: base model directory or name (``"smollm2-135m-instruct"``: the embedded one).
        output_dir: where the checkpoint goes.
        max_steps: optimizer steps (>= 1).
        learning_rate: AdamW learning rate.
        batch_size: rows per device step.
        grad_accum: gradient-accumulation steps.
        max_length: longest tokenised example, in tokens (longer ones are truncated).
        seed: training seed.
        bf16: mixed precision; ``None`` uses bf16 when a CUDA GPU supports it.

    Returns:
        The :class:`SFTResult`.

    Raises:
        ValueError: no rows, ``max_steps < 1`` or a non-finite loss.
    """
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from searchrl.assets import policy_model_path

    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    rows = (
        read_jsonl(data)
        if isinstance(data, (str, os.PathLike))
        else [{"prompt": r["prompt"], "completion": r["completion"]} for r in data]
    )
    if not rows:
        raise ValueError("no SFT rows")
    path = policy_model_path(model)
    cuda = torch.cuda.is_available()
    use_bf16 = bool(cuda and torch.cuda.is_bf16_supported()) if bf16 is None else bf16
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if use_bf16 else torch.float32)
    out = Path(output_dir)
    args = SFTConfig(
        output_dir=str(out),
        max_steps=max_steps,
        learning_rate=learning_rate,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum,
        max_length=max_length,
        completion_only_loss=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        bf16=use_bf16,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=lm, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    result = trainer.train()
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    train_loss = float(result.training_loss)
    if not math.isfinite(train_loss):
        raise ValueError(f"SFT diverged: training loss {train_loss}")
    trainer.save_model(str(out))
    tokenizer.save_pretrained(str(out))
    log.info("simulator SFT: %d steps, loss %.4f, saved to %s", result.global_step, train_loss, out)
    return SFTResult(output_dir=str(out), steps=int(result.global_step), train_loss=train_loss, losses=losses)
