"""Checkpoints of the local trainer: everything needed to continue a run exactly.

Layout of one checkpoint (written to ``step_NNNNNN.tmp`` and renamed, so a crash never leaves a half checkpoint)::

    <checkpoint dir>/step_000020/
        model/               Hugging Face checkpoint (safetensors + tokenizer): ``from_pretrained`` and the
                             PolicyService ``LoadWeights`` read it directly (a LoRA run writes the merged model)
        adapter/             LoRA runs only: the peft adapter (``adapter_config.json``, ``adapter_model.safetensors``)
                             that resuming puts back on the base model
        trainer_state.pt     optimizer and LR-scheduler state, RNG states (python, numpy, torch), data cursor,
                             guard history, step, MLflow run id
        config.yaml          the run's config
    <checkpoint dir>/latest  name of the newest complete checkpoint

Resuming restores all of it, so the next batch, the sampled episodes (seeded per step) and the metrics of the next
step equal those of a run that was never interrupted.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
STATE_FILE = "trainer_state.pt"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
LATEST = "latest"


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU) RNG states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores :func:`rng_state` output."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def step_dir_name(step: int) -> str:
    """``step_000020`` for step 20."""
    return f"step_{step:06d}"


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk."""

    step: int
    path: Path

    @property
    def model_path(self) -> Path:
        """The Hugging Face model folder (what ``LoadWeights`` takes)."""
        return self.path / MODEL_DIR

    @property
    def adapter_path(self) -> Path:
        """The peft LoRA adapter folder (present only in checkpoints of LoRA runs)."""
        return self.path / ADAPTER_DIR


def list_checkpoints(root: str | Path) -> list[CheckpointInfo]:
    """Complete checkpoints under ``root``, oldest first (half-written ``.tmp`` folders are ignored)."""
    base = Path(root)
    if not base.is_dir():
        return []
    out = []
    for p in base.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file() and (p / MODEL_DIR / "config.json").is_file():
            out.append(CheckpointInfo(int(m.group(1)), p))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(root: str | Path) -> CheckpointInfo | None:
    """The newest complete checkpoint, or ``None``."""
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: Any,
    tokenizer: Any,
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    adapter: Any = None,
) -> CheckpointInfo:
    """Writes one checkpoint atomically and prunes old ones.

    Args:
        root: checkpoint folder.
        step: the step just finished.
        model: the policy as a plain transformers model (``save_pretrained``; with LoRA the merged model).
        tokenizer: its tokenizer (saved next to the weights so the folder loads on its own).
        state: trainer state (optimizer, scheduler, cursor ...); the RNG states are added here.
        config_yaml: the run's config.
        keep_last: keep this many newest checkpoints.
        adapter: with LoRA, the :class:`peft.PeftModel` whose adapter weights are saved in ``adapter/``.

    Returns:
        The new checkpoint.
    """
    base = Path(root)
    base.mkdir(parents=True, exist_ok=True)
    final = base / step_dir_name(step)
    tmp = base / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp / MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(tmp / MODEL_DIR)
    if adapter is not None:
        adapter.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
    torch.save({**state, "rng": rng_state(), "step": step}, tmp / STATE_FILE)
    (tmp / "config.yaml").write_text(config_yaml)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    (base / (LATEST + ".tmp")).write_text(final.name + "\n")
    os.replace(base / (LATEST + ".tmp"), base / LATEST)
    for old in list_checkpoints(base)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    log.info("checkpoint %s written", final)
    return CheckpointInfo(step, final)


def load_state(info: CheckpointInfo) -> dict[str, Any]:
    """The ``trainer_state.pt`` of a checkpoint (RNG states included, not yet applied)."""
    state: dict[str, Any] = torch.load(info.path / STATE_FILE, map_location="cpu", weights_only=False)
    return state
