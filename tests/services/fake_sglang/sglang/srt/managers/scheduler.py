"""Stand-in for SGLang's scheduler process: a thread that runs a toy model and answers the tokenizer manager over
a socket (the real one answers over ZMQ through the detokenizer). It reproduces the sampler's log-prob convention
(``srt/layers/sampler.py``: ``log_softmax(logits / T)``, raw ``log_softmax(logits)`` only with
``SGLANG_RETURN_ORIGINAL_LOGPROB=1`` read when the process starts), seeds (``sampling_seed`` only with deterministic
inference, default 42: ``srt/sampling/sampling_batch_info.py``) and the finish order of ``schedule_batch.py``
(stop string, then EOS, then length)."""

from __future__ import annotations

import os
import pickle
import queue
import socket
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sglang.srt.managers.io_struct import UpdateWeightFromDiskReqInput, UpdateWeightFromDiskReqOutput


def toy_logits(weights: str, prefix: Sequence[int], vocab: int) -> np.ndarray:
    """The toy model: next-token logits (float64, ``[vocab]``) from the weights path, the last token and the length."""
    seed = zlib.crc32(f"{weights}|{prefix[-1]}|{len(prefix)}".encode())
    return 4.0 * np.random.default_rng(seed).standard_normal(vocab)


def log_softmax(x: np.ndarray) -> np.ndarray:
    y = x - x.max()
    return y - np.log(np.exp(y).sum())


def send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj)
    sock.sendall(struct.pack("!I", len(data)) + data)


class Scheduler(threading.Thread):
    def __init__(
        self,
        *,
        model_path: str,
        tokenizer: Any,
        vocab_size: int,
        eos_ids: set[int],
        deterministic: bool,
        out_sock: socket.socket,
    ) -> None:
        super().__init__(daemon=True, name="fake-sglang-scheduler")
        self.weights = model_path
        self.tokenizer = tokenizer
        self.vocab = vocab_size
        self.eos_ids = eos_ids
        self.deterministic = deterministic
        self.out = out_sock
        self.inbox: queue.Queue[Any] = queue.Queue()
        # Read once at start, like the module-level constant of the real (spawned) scheduler process.
        self.return_original_logprob = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true")
        self.step_delay_s = float(os.environ.get("FAKE_SGLANG_STEP_DELAY_S", "0") or 0)
        self.load_delay_s = float(os.environ.get("FAKE_SGLANG_LOAD_DELAY_S", "0") or 0)
        self.rng = np.random.default_rng()  # unseeded: what SGLang does with seeds off

    def run(self) -> None:
        while True:
            item = self.inbox.get()
            if item is None:
                return
            if isinstance(item, UpdateWeightFromDiskReqInput):
                send(self.out, self.update_weights(item))
            else:
                send(self.out, self.generate(item))

    def update_weights(self, req: UpdateWeightFromDiskReqInput) -> UpdateWeightFromDiskReqOutput:
        time.sleep(self.load_delay_s)
        if not (Path(req.model_path) / "config.json").is_file():
            return UpdateWeightFromDiskReqOutput(
                success=False,
                message=f"Failed to get weights iterator: {req.model_path} (repository not found).",
            )
        self.weights = req.model_path
        return UpdateWeightFromDiskReqOutput(success=True, message="Succeeded to update model weights.")

    def sample(self, logits: np.ndarray, sp: Any, position: int) -> tuple[int, float]:
        raw = log_softmax(logits)
        if sp.top_k == 1:  # greedy (temperature 0 became top_k 1 in SamplingParams.__post_init__)
            tok = int(np.argmax(logits))
            return tok, float(raw[tok])
        scaled = log_softmax(logits / sp.temperature)
        probs = np.exp(scaled)
        if sp.top_k < len(probs):
            kth = np.partition(probs, -sp.top_k)[-sp.top_k]
            probs = np.where(probs >= kth, probs, 0.0)
        if sp.top_p < 1.0:
            order = np.argsort(-probs)
            cum = np.cumsum(probs[order])
            keep = np.zeros_like(probs, dtype=bool)
            keep[order] = (cum - probs[order]) < sp.top_p
            probs = np.where(keep, probs, 0.0)
        probs = probs / probs.sum()
        if self.deterministic:
            seed = sp.sampling_seed if sp.sampling_seed is not None else 42
            rng = np.random.default_rng([seed % 2**63, position])
        else:
            rng = self.rng
        tok = int(rng.choice(len(probs), p=probs))
        return tok, float(raw[tok] if self.return_original_logprob else scaled[tok])

    def generate(self, task: dict[str, Any]) -> dict[str, Any]:
        sp = task["sampling_params"]
        ids = list(task["input_ids"])
        out_ids: list[int] = []
        logprobs: list[float] = []
        finish: dict[str, Any] | None = None
        matched_str = None
        while finish is None:
            time.sleep(self.step_delay_s)
            tok, lp = self.sample(toy_logits(self.weights, ids + out_ids, self.vocab), sp, len(ids) + len(out_ids))
            out_ids.append(tok)
            logprobs.append(lp)
            text = self.tokenizer.decode(out_ids)
            for s in sp.stop_strs:
                if s in text:
                    finish, matched_str = {"type": "stop", "matched": s}, s
                    break
            if finish is None and tok in self.eos_ids and not sp.ignore_eos:
                finish = {"type": "stop", "matched": tok}
            if finish is None and len(out_ids) >= sp.max_new_tokens:
                finish = {"type": "length", "length": sp.max_new_tokens}
        text = self.tokenizer.decode(out_ids, skip_special_tokens=sp.skip_special_tokens)
        if matched_str is not None and not sp.no_stop_trim:
            text = text[: text.find(matched_str)]
        return {
            "rid": task["rid"],
            "text": text,
            "output_ids": out_ids,
            "logprobs": logprobs,
            "finish_reason": finish,
            "prompt_tokens": len(ids),
        }
