"""GRPO maths for the local trainer: thin, typed wrappers around verl's ``core_algos``.

verl's workers need GPUs, but its algorithm functions are plain PyTorch. The local CPU trainer and the verl RayJob
therefore compute the same numbers: this module only adapts argument shapes and names and fixes the choices the
papers make (std-normalised group advantages, PPO clipping, low-variance KL, token-mean aggregation).

Shapes: ``B`` responses in a batch, ``L`` response tokens (right-padded); every per-token tensor is ``(B, L)`` and
``response_mask`` is 1 where the policy sampled the token and 0 for inserted observation tokens and padding (ReSearch
``loss_mask = result_mask * attention_mask``).

Sources:
    * GRPO advantage: DeepSeekMath (arXiv 2402.03300) eq. 3/outcome supervision, ``A_i = (r_i - mean(r)) / (std(r) +
      eps)`` over the n responses of one prompt; verl ``compute_grpo_outcome_advantage``.
    * Clipped surrogate: PPO (arXiv 1707.06347) eq. 7 with dual clipping (arXiv 1912.09729); verl
      ``compute_policy_loss_vanilla``.
    * KL to the reference: Schulman's k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` ("low_var_kl");
      verl ``kl_penalty``.
    * Aggregation: verl ``agg_loss`` (``token-mean`` divides by the number of loss tokens in the whole mini-batch, so
      gradient accumulation over micro-batches gives the same gradient as one big batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_TYPES = ("low_var_kl", "k3", "kl", "k1", "abs", "mse", "k2", "low_var_kl+", "k3+")


def _core() -> Any:
    """verl's ``core_algos`` module (imported lazily: verl pulls in a lot at import time)."""
    from verl.trainer.ppo import core_algos

    return core_algos


def _torch_functional() -> Any:
    """verl's ``utils.torch_functional`` module (log-probs and entropy from logits)."""
    from verl.utils import torch_functional

    return torch_functional


def grpo_advantages(
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: Sequence[str] | np.ndarray,
    *,
    epsilon: float = 1e-6,
    norm_by_std: bool = True,
) -> torch.Tensor:
    """GRPO outcome advantages, broadcast over each response's tokens.

    Args:
        rewards: ``(B,)`` scalar reward of each response.
        response_mask: ``(B, L)`` 1 for trained tokens, 0 elsewhere; the advantage is zeroed where it is 0.
        group_ids: ``B`` group keys; responses sampled from the same prompt share a key (verl's ``uid``).
        epsilon: added to the group standard deviation before dividing.
        norm_by_std: divide by the group std (GRPO); ``False`` gives Dr.GRPO (arXiv 2503.20783).

    Returns:
        ``(B, L)`` float tensor ``(r_i - mean_g) / (std_g + eps) * mask`` (unbiased std, as torch and verl compute
        it); a group of one response gets advantage ``r_i`` (verl's convention: mean 0, std 1).

    Raises:
        ValueError: shapes disagree.
    """
    if rewards.dim() != 1 or response_mask.dim() != 2 or rewards.shape[0] != response_mask.shape[0]:
        raise ValueError(
            f"rewards must be (B,) and response_mask (B, L); got {tuple(rewards.shape)} and {tuple(response_mask.shape)}"
        )
    if len(group_ids) != rewards.shape[0]:
        raise ValueError(f"{len(group_ids)} group ids for {rewards.shape[0]} rewards")
    mask = response_mask.to(torch.float32)
    # verl reads the scalar outcome as the sum of token-level rewards; put it on the first token of each row.
    token_rewards = torch.zeros_like(mask)
    token_rewards[:, 0] = rewards.to(torch.float32)
    index = np.asarray(list(group_ids), dtype=object)
    advantages, _returns = _core().compute_grpo_outcome_advantage(
        token_level_rewards=token_rewards,
        response_mask=mask,
        index=index,
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_by_std,
    )
    result: torch.Tensor = advantages
    return result


def actor_config(
    *,
    clip_ratio: float = 0.2,
    clip_ratio_low: float | None = None,
    clip_ratio_high: float | None = None,
    clip_ratio_c: float = 3.0,
    loss_agg_mode: str = "token-mean",
    kl_loss_coef: float = 0.001,
    kl_loss_type: str = "low_var_kl",
    entropy_coeff: float = 0.0,
    rollout_n: int = 1,
) -> Any:
    """A verl ``ActorConfig`` carrying the loss hyper-parameters ``compute_policy_loss_vanilla`` reads.

    Raises:
        ValueError: unknown ``loss_agg_mode`` (verl's own validation).
    """
    from verl.workers.config import ActorConfig

    low = clip_ratio if clip_ratio_low is None else clip_ratio_low
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    return ActorConfig(
        strategy="fsdp",
        rollout_n=rollout_n,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=clip_ratio,
        clip_ratio_low=low,
        clip_ratio_high=high,
        clip_ratio_c=clip_ratio_c,
        loss_agg_mode=loss_agg_mode,
        use_kl_loss=True,
        kl_loss_coef=kl_loss_coef,
        kl_loss_type=kl_loss_type,
        entropy_coeff=entropy_coeff,
    )


def aggregate(
    loss_mat: torch.Tensor,
    response_mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    batch_num_tokens: int | None = None,
    global_batch_size: int | None = None,
) -> torch.Tensor:
    """verl ``agg_loss``: reduces a ``(B, L)`` per-token loss to a scalar.

    Args:
        loss_mat: ``(B, L)`` per-token loss.
        response_mask: ``(B, L)`` tokens that count.
        mode: one of :data:`LOSS_AGG_MODES`.
        batch_num_tokens: loss tokens in the whole mini-batch (``token-mean`` with gradient accumulation: each
            micro-batch divides its sum by this, so the summed gradients equal the full-batch mean); default: this
            micro-batch's count.
        global_batch_size: responses in the mini-batch (sequence-mean modes), default: this micro-batch's.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGG_MODES}")
    out: torch.Tensor = _core().agg_loss(
        loss_mat=loss_mat,
        loss_mask=response_mask,
        loss_agg_mode=mode,
        dp_size=1,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
    )
    return out


@dataclass
class PolicyLossOutput:
    """The clipped surrogate of one (micro-)batch and its diagnostics (verl ``pg_metrics``)."""

    loss: torch.Tensor
    """Scalar loss (to minimise), aggregated with the configured mode."""
    clip_fraction: float
    """Share of loss tokens where the clipped term was chosen (``actor/pg_clipfrac``)."""
    approx_kl: float
    """Mean of ``old_logp - logp`` over loss tokens (``actor/ppo_kl``); 0 on the first epoch of an on-policy step."""
    clip_fraction_lower: float
    """Share of loss tokens hit by the dual-clip lower bound (``actor/pg_clipfrac_lower``)."""


def policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any,
    *,
    batch_num_tokens: int | None = None,
    global_batch_size: int | None = None,
) -> PolicyLossOutput:
    """PPO clipped surrogate through verl's registered ``"vanilla"`` policy loss.

    Args:
        old_log_prob: ``(B, L)`` log-probs of the sampled tokens under the policy before this update (detached).
        log_prob: ``(B, L)`` log-probs under the current parameters (carries gradient).
        advantages: ``(B, L)`` from :func:`grpo_advantages`.
        response_mask: ``(B, L)`` loss mask.
        config: from :func:`actor_config` (clip ratios, dual-clip ``c``, aggregation mode).
        batch_num_tokens: see :func:`aggregate`.
        global_batch_size: see :func:`aggregate`.

    Returns:
        :class:`PolicyLossOutput`. Per token: ``max(-A r, -A clip(r, 1-eps_low, 1+eps_high))``, bounded by
        ``-A c`` when ``A < 0``, with ``r = exp(logp - old_logp)``.
    """
    core = _core()
    config.global_batch_info.clear()
    config.global_batch_info.update(
        {"dp_size": 1, "batch_num_tokens": batch_num_tokens, "global_batch_size": global_batch_size}
    )
    fn = core.get_policy_loss_fn("vanilla")
    loss, metrics = fn(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=response_mask.to(torch.bool),
        loss_agg_mode=config.loss_agg_mode,
        config=config,
    )
    return PolicyLossOutput(
        loss=loss,
        clip_fraction=float(metrics["actor/pg_clipfrac"]),
        approx_kl=float(metrics["actor/ppo_kl"]),
        clip_fraction_lower=float(metrics["actor/pg_clipfrac_lower"]),
    )


def kl_per_token(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kl_type: str = "low_var_kl") -> torch.Tensor:
    """verl ``kl_penalty``: per-token KL estimate ``(B, L)`` between the policy and the frozen reference.

    ``low_var_kl`` (k3) is ``exp(ref - logp) - (ref - logp) - 1``, clamped to [-10, 10] as verl does.

    Raises:
        ValueError: unknown ``kl_type``.
    """
    if kl_type not in KL_TYPES:
        raise ValueError(f"unknown KL type {kl_type!r}; expected one of {KL_TYPES}")
    out: torch.Tensor = _core().kl_penalty(logprob=log_prob, ref_logprob=ref_log_prob, kl_penalty=kl_type)
    return out


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token, ``(B, L)`` from logits ``(B, L, V)`` (verl ``logprobs_from_logits``)."""
    out: torch.Tensor = _torch_functional().logprobs_from_logits(logits, labels)
    return out


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each next-token distribution, ``(B, L)`` from ``(B, L, V)`` (verl ``entropy_from_logits``)."""
    out: torch.Tensor = _torch_functional().entropy_from_logits(logits)
    return out


@dataclass
class ObjectiveOutput:
    """Everything one micro-batch contributes to an update: the scalar to backpropagate and its parts."""

    loss: torch.Tensor
    """``pg_loss + kl_coef * kl_loss - entropy_coeff * entropy``; backpropagate this."""
    pg_loss: float
    kl_loss: float
    """Aggregated per-token KL to the reference (the same estimator that enters the loss)."""
    entropy: float
    """Aggregated per-token entropy (nats)."""
    clip_fraction: float
    approx_kl: float
    metrics: dict[str, float] = field(default_factory=dict)


def grpo_objective(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    ref_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any,
    *,
    entropy: torch.Tensor | None = None,
    batch_num_tokens: int | None = None,
    global_batch_size: int | None = None,
) -> ObjectiveOutput:
    """The GRPO actor loss as verl's ``ppo_loss`` assembles it (verl ``workers/utils/losses.py``).

    Args:
        log_prob: ``(B, L)`` current log-probs (with gradient).
        old_log_prob: ``(B, L)`` log-probs before the update (detached; on-policy: equal to ``log_prob`` values).
        ref_log_prob: ``(B, L)`` log-probs under the frozen reference model (detached).
        advantages: ``(B, L)``.
        response_mask: ``(B, L)`` loss mask.
        config: from :func:`actor_config`.
        entropy: ``(B, L)`` token entropies; included in the loss when ``config.entropy_coeff != 0`` and reported.
        batch_num_tokens: loss tokens in the whole mini-batch (gradient accumulation), see :func:`aggregate`.
        global_batch_size: responses in the whole mini-batch.

    Returns:
        :class:`ObjectiveOutput`.
    """
    pg = policy_loss(
        old_log_prob,
        log_prob,
        advantages,
        response_mask,
        config,
        batch_num_tokens=batch_num_tokens,
        global_batch_size=global_batch_size,
    )
    mode = config.loss_agg_mode
    kld = kl_per_token(log_prob, ref_log_prob, config.kl_loss_type)
    kl_loss = aggregate(
        kld, response_mask, mode, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size
    )
    total = pg.loss + kl_loss * config.kl_loss_coef
    ent_value = 0.0
    if entropy is not None:
        ent_loss = aggregate(
            entropy, response_mask, mode, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size
        )
        if config.entropy_coeff != 0:
            total = total - config.entropy_coeff * ent_loss
        ent_value = float(ent_loss.detach())
    return ObjectiveOutput(
        loss=total,
        pg_loss=float(pg.loss.detach()),
        kl_loss=float(kl_loss.detach()),
        entropy=ent_value,
        clip_fraction=pg.clip_fraction,
        approx_kl=pg.approx_kl,
        metrics={"clip_fraction_lower": pg.clip_fraction_lower},
    )
