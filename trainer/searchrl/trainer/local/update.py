"""The GRPO update of the local trainer: :class:`GRPOUpdater` holds the policy, the frozen reference, AdamW and the
learning-rate schedule, and turns one step's scored episodes into optimizer steps.

GRPO advantages per question group; old log-probs recomputed with a forward pass of the current weights (on-policy:
the ratio starts at 1) and reference log-probs from the frozen initial model (with LoRA: the policy with its adapters
disabled; with ``kl_coef == 0``: none); the PPO-clip loss over loss-masked
tokens plus ``kl_coef`` x low-variance KL, aggregated ``token-mean`` over the mini-batch (gradient accumulation over
micro-batches gives the same gradient as one big batch); AdamW, gradient clipping. The maths is verl's
(:mod:`searchrl.trainer.grpo` wraps ``verl.trainer.ppo.core_algos``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from searchrl.trainer import grpo
from searchrl.trainer.config import TrainConfig
from searchrl.trainer.local.batching import MicroBatch, causal_lm_parts, collate, output_logits, response_hidden
from searchrl.trainer.local.lora import is_lora, trainable_parameters

log = logging.getLogger(__name__)


@dataclass
class EpisodeData:
    """One scored episode as the update needs it.

    Attributes:
        prompt_ids, response_ids: token ids.
        loss_mask: one entry per response token (1: sampled by the policy, trained on).
        rollout_logprobs: the rollout engine's log-probs of the response tokens (diagnostics only).
        reward: the episode's scalar reward.
        group: the GRPO group (one per question and step).
    """

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    rollout_logprobs: list[float]
    reward: float
    group: str


class GRPOUpdater:
    """GRPO updates of ``model`` against the frozen reference policy (see the module docstring).

    Args:
        model: the policy (float32 master weights; ``model.dtype=bfloat16`` runs the forward passes under autocast);
            a :class:`peft.PeftModel` trains only its LoRA adapters.
        ref_model: the frozen reference policy of the KL term; ``None`` with a LoRA policy (the reference is
            ``model`` with its adapters disabled) or with ``algorithm.kl_coef == 0`` (no reference pass at all: the
            reference log-probs are taken equal to the policy's, so the KL term and ``actor/kl`` are 0).
        config: the run's configuration (``algorithm``, ``model.dtype``, ``model.gradient_checkpointing``,
            ``data.group_size``).
        pad_id: token id of the padding.

    Raises:
        ValueError: ``ref_model`` is ``None`` while the KL term needs a reference that ``model`` cannot provide.
    """

    def __init__(self, model: Any, ref_model: Any, config: TrainConfig, pad_id: int) -> None:
        algo = self.algo = config.algorithm
        self.model, self.ref_model, self.pad_id = model, ref_model, pad_id
        self.lora = is_lora(model)
        self.use_reference = algo.kl_coef != 0
        if self.use_reference and ref_model is None and not self.lora:
            raise ValueError("a reference model is needed when algorithm.kl_coef != 0 (full fine-tuning)")
        self.use_bf16 = config.model.dtype == "bfloat16"
        self.share_prompt = algo.share_prompt and not config.model.gradient_checkpointing
        self.params = trainable_parameters(model)
        self.optimizer = torch.optim.AdamW(self.params, lr=algo.lr, betas=algo.betas, weight_decay=algo.weight_decay)
        warm = algo.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: min(1.0, (n + 1) / warm) if warm else 1.0
        )
        self.actor_cfg = grpo.actor_config(
            clip_ratio=algo.clip_ratio,
            clip_ratio_low=algo.clip_ratio_low,
            clip_ratio_high=algo.clip_ratio_high,
            clip_ratio_c=algo.clip_ratio_c,
            loss_agg_mode=algo.loss_agg_mode,
            kl_loss_coef=algo.kl_coef,
            kl_loss_type=algo.kl_type,
            entropy_coeff=algo.entropy_coeff,
            rollout_n=config.data.group_size,
        )

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer", "scheduler"}`` state."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def forward_logprobs(
        self, model: Any, mb: MicroBatch, *, with_entropy: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs ``(b, R)`` of the response tokens (and their entropies) under ``model``.

        With ``algorithm.loss_token_logits`` the LM head, log-softmax and entropy run only at loss-mask-1 positions
        (the ``<result>`` documents, the response prefix and the padding need no vocabulary logits); the other
        entries are 0 and every consumer masks them out.
        """
        with torch.autocast(mb.input_ids.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            hidden = response_hidden(model, mb, share_prompt=self.share_prompt)  # (b, R, H)
            if self.algo.loss_token_logits:
                keep = mb.response_mask > 0
                logits = output_logits(model, hidden[keep]).float()  # (n, V)
                labels = mb.responses[keep]
            else:
                logits = output_logits(model, hidden).float()  # (b, R, V)
                labels = mb.responses
        logp = grpo.token_log_probs(logits, labels)
        ent = None
        if with_entropy:
            if self.actor_cfg.entropy_coeff != 0:
                ent = grpo.token_entropy(logits)
            else:
                with torch.no_grad():
                    ent = grpo.token_entropy(logits.detach())
        if self.algo.loss_token_logits:
            logp = logp.new_zeros(keep.shape).masked_scatter(keep, logp)
            if ent is not None:
                ent = ent.new_zeros(keep.shape).masked_scatter(keep, ent)
        return logp, ent

    def reference_logprobs(self, mb: MicroBatch) -> torch.Tensor:
        """Log-probs ``(b, R)`` of the response tokens under the reference policy (no gradient): the frozen
        ``ref_model``, or with LoRA the policy with its adapters disabled."""
        with torch.no_grad():
            if self.ref_model is not None:
                return self.forward_logprobs(self.ref_model, mb, with_entropy=False)[0]
            with self.model.disable_adapter():
                return self.forward_logprobs(self.model, mb, with_entropy=False)[0]

    def plan(self, n_ep: int) -> list[list[list[int]]]:
        """Mini-batches of micro-batches of episode indices (the same partition for every pass of a step)."""
        size = self.algo.micro_batch_size
        plan = []
        for mini in np.array_split(np.arange(n_ep), self.algo.mini_batches):
            idx = [int(i) for i in mini]
            if idx:
                plan.append([idx[s : s + size] for s in range(0, len(idx), size)])
        return plan

    def _collate(self, data: Sequence[EpisodeData], part: Sequence[int]) -> MicroBatch:
        return collate(
            [data[i].prompt_ids for i in part],
            [data[i].response_ids for i in part],
            [data[i].loss_mask for i in part],
            self.pad_id,
            device=next(self.model.parameters()).device,
        )

    def update(self, data: Sequence[EpisodeData], *, behaviour_logprobs: bool = False) -> dict[str, float]:
        """GRPO update on the scored episodes; returns the ``actor/*`` metrics.

        Args:
            data: the step's scored episodes (whole groups).
            behaviour_logprobs: take the PPO ratio's old log-probs from the sampling policy
                (``EpisodeData.rollout_logprobs``) instead of recomputing them with the current weights: the
                importance ratio of off-policy groups sampled by older weights (``rollout.mode=async``; verl's and
                AReaL's asynchronous trainers do the same). Saves the old-log-prob pass.

        Raises:
            ValueError: ``behaviour_logprobs`` while an episode has no log-prob per response token.
        """
        algo = self.algo
        if behaviour_logprobs:
            short = [i for i, d in enumerate(data) if len(d.rollout_logprobs) != len(d.response_ids)]
            if short:
                raise ValueError(f"episodes {short[:5]} have no sampling log-prob per response token")
        n_ep = len(data)
        plan = self.plan(n_ep)
        r_max = max(max(len(d.response_ids) for d in data), 1)

        # Advantages per question group (GRPO), broadcast over each response's loss tokens.
        rewards = torch.tensor([d.reward for d in data], dtype=torch.float32)
        full_mask = torch.zeros((n_ep, r_max))
        for i, d in enumerate(data):
            full_mask[i, : len(d.loss_mask)] = torch.tensor(d.loss_mask, dtype=torch.float32)
        advantages = grpo.grpo_advantages(
            rewards, full_mask, [d.group for d in data], epsilon=algo.adv_epsilon, norm_by_std=algo.norm_adv_by_std
        )

        # Old (behaviour) log-probs are those of the weights before the update. With one PPO epoch and one
        # mini-batch nothing changes the weights before the only forward pass, so that pass's detached log-probs are
        # exactly the recomputed old log-probs (ratio 1); otherwise a separate no-grad pass computes them first, over
        # the same micro-batches as the update. Reference log-probs come from the frozen initial model.
        reuse_first_pass = (algo.ppo_epochs == 1 and len(plan) == 1) or behaviour_logprobs
        old_lp: dict[int, torch.Tensor] = {}
        ref_lp: dict[int, torch.Tensor] = {}
        self.model.eval()
        with torch.no_grad():
            for mini in plan:
                for part in mini:
                    mb = self._collate(data, part)
                    if self.use_reference:
                        rlp = self.reference_logprobs(mb)
                        for row, i in enumerate(part):
                            ref_lp[i] = rlp[row]
                    if not reuse_first_pass:
                        lp, _ = self.forward_logprobs(self.model, mb, with_entropy=False)
                        for row, i in enumerate(part):
                            old_lp[i] = lp[row]

        sums = dict.fromkeys(("kl", "entropy", "clip", "clip_lower", "approx_kl", "tokens"), 0.0)
        pg_losses: list[float] = []
        losses: list[float] = []
        grad_norms: list[float] = []
        skipped = 0
        self.model.train()
        try:
            for _epoch in range(algo.ppo_epochs):
                for mini in plan:
                    mini_idx = [i for part in mini for i in part]
                    n_tokens = int(sum(sum(data[i].loss_mask) for i in mini_idx))
                    self.optimizer.zero_grad(set_to_none=True)
                    mini_loss = mini_pg = 0.0
                    for part in mini:
                        mb = self._collate(data, part)
                        logp, ent = self.forward_logprobs(self.model, mb, with_entropy=True)
                        if reuse_first_pass:  # (with behaviour log-probs: the first pass's, for the gap metric)
                            for row, i in enumerate(part):
                                old_lp.setdefault(i, logp[row].detach())
                        if behaviour_logprobs:
                            old = logp.new_zeros(logp.shape)
                            for row, i in enumerate(part):
                                lp = data[i].rollout_logprobs[: mb.response_len]
                                old[row, : len(lp)] = torch.tensor(lp, dtype=old.dtype)
                        else:
                            old = torch.stack([old_lp[i] for i in part])
                        # kl_coef 0: no reference pass; the reference equal to the policy makes the KL exactly 0.
                        ref = torch.stack([ref_lp[i] for i in part]) if self.use_reference else logp.detach()
                        adv = advantages[part][:, : mb.response_len].to(logp.device)
                        out = grpo.grpo_objective(
                            logp,
                            old,
                            ref,
                            adv,
                            mb.response_mask,
                            self.actor_cfg,
                            entropy=ent,
                            batch_num_tokens=max(n_tokens, 1),
                            global_batch_size=len(mini_idx),
                        )
                        out.loss.backward()
                        mini_loss += float(out.loss.detach())
                        mini_pg += out.pg_loss
                        # Token-weighted diagnostics, independent of the aggregation mode.
                        mask = mb.response_mask
                        tok = float(mask.sum())
                        with torch.no_grad():
                            kld = grpo.kl_per_token(logp.detach(), ref, self.actor_cfg.kl_loss_type)
                            sums["kl"] += float((kld * mask).nan_to_num().sum())
                            if ent is not None:
                                sums["entropy"] += float((ent.detach() * mask).sum())
                        sums["clip"] += out.clip_fraction * tok
                        sums["clip_lower"] += out.metrics["clip_fraction_lower"] * tok
                        sums["approx_kl"] += out.approx_kl * tok
                        sums["tokens"] += tok
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, algo.max_grad_norm))
                    if math.isfinite(grad_norm):
                        self.optimizer.step()
                    else:  # verl skips the step on a non-finite gradient norm, too
                        skipped += 1
                        log.warning("non-finite gradient norm: optimizer step skipped")
                        self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    grad_norms.append(grad_norm)
                    losses.append(mini_loss)
                    pg_losses.append(mini_pg)
        finally:
            self.model.eval()
        # How far the rollout engine's log-probs are from the trainer's forward pass (both float32: ~1e-5).
        gap_sum = gap_n = 0.0
        for i, d in enumerate(data):
            n = len(d.response_ids)
            if not n or len(d.rollout_logprobs) != n:
                continue
            m = torch.tensor(d.loss_mask, dtype=torch.bool)
            if m.any():
                beh = torch.tensor(d.rollout_logprobs, dtype=torch.float32)
                gap_sum += float((old_lp[i][:n].cpu()[m] - beh[m]).abs().sum())
                gap_n += float(m.sum())
        tokens = max(sums["tokens"], 1.0)
        return {
            "actor/loss": float(np.mean(losses)),
            "actor/pg_loss": float(np.mean(pg_losses)),
            "actor/kl": sums["kl"] / tokens,
            "actor/entropy": sums["entropy"] / tokens,
            "actor/clip_fraction": sums["clip"] / tokens,
            "actor/clip_fraction_lower": sums["clip_lower"] / tokens,
            "actor/ppo_kl": sums["approx_kl"] / tokens,
            "actor/grad_norm": float(np.mean(grad_norms)),
            "actor/skipped_updates": float(skipped),
            "actor/lr": float(self.scheduler.get_last_lr()[0]),
            "actor/loss_tokens": float(sums["tokens"]) / algo.ppo_epochs,
            "actor/rollout_logprob_gap": gap_sum / gap_n if gap_n else 0.0,
            **self.work(data, plan, no_grad_passes=int(self.use_reference) + int(not reuse_first_pass)),
        }

    def work(
        self, data: Sequence[EpisodeData], plan: list[list[list[int]]], *, no_grad_passes: int
    ) -> dict[str, float]:
        """The update's arithmetic, counted the usual way (Kaplan et al. 2020; PaLM's MFU): a forward pass costs
        ``2 x parameters`` FLOP per token, a trained pass ``6 x`` (forward, activation gradients, weight gradients);
        a LoRA pass ``4 x`` (frozen weights get no weight gradients, the activation gradients are still needed; the
        adapters' own work is negligible). The LM head (``vocab x hidden`` parameters) counts only for the tokens
        that get logits.

        Returns:
            ``perf/decoder_tokens`` (tokens through the decoder per pass: each distinct prompt once per micro-batch
            with ``share_prompt``, else the padded rows), ``perf/logit_tokens`` (LM-head tokens per pass),
            ``perf/no_grad_passes`` (reference and old-log-prob passes), ``perf/update_gflop`` (whole update).
        """
        decoder_tokens = logit_tokens = 0
        for mini in plan:
            for part in mini:
                rows = [data[i] for i in part]
                r_len = max(max(len(d.response_ids) for d in rows), 1)
                if self.share_prompt:
                    groups: dict[tuple[int, ...], int] = {}
                    for d in rows:
                        key = tuple(d.prompt_ids)
                        groups[key] = max(groups.get(key, 0), len(d.response_ids))
                    # each prompt once, then every row padded to its group's longest response, less the token the
                    # prompt pass predicts
                    decoder_tokens += sum(len(p) for p in groups)
                    decoder_tokens += sum(max(groups[tuple(d.prompt_ids)], 1) - 1 for d in rows)
                else:
                    decoder_tokens += len(rows) * (max(len(d.prompt_ids) for d in rows) + r_len)
                if self.algo.loss_token_logits:
                    logit_tokens += int(sum(sum(d.loss_mask) for d in rows))
                else:
                    logit_tokens += len(rows) * r_len
        head = sum(p.numel() for p in causal_lm_parts(self.model)[1].parameters())
        body = sum(p.numel() for p in self.model.parameters()) - head
        if self.lora:
            body -= sum(p.numel() for p in self.params)  # adapters: not part of N
        per_pass = 2.0 * (body * decoder_tokens + head * logit_tokens)  # one forward pass, FLOP
        trained = (2.0 if self.lora else 3.0) * per_pass * self.algo.ppo_epochs
        return {
            "perf/decoder_tokens": float(decoder_tokens),
            "perf/logit_tokens": float(logit_tokens),
            "perf/no_grad_passes": float(no_grad_passes),
            "perf/update_gflop": (trained + per_pass * no_grad_passes) / 1e9,
        }
