"""Tensor layout of the GRPO update (as verl's) and the forward pass over it.

Prompts left-padded to the longest prompt ``P`` of the micro-batch, responses right-padded to the longest response
``R``; ``input_ids (b, P + R)``; the final hidden states of the positions before each response token
(:func:`response_hidden`) give, through the LM head, the log-probs of the ``R`` response tokens; ``response_mask (b, R)`` is the episode's loss mask (0 for inserted ``<result>`` tokens, the
response prefix and padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class MicroBatch:
    """Episodes collated for one forward pass (see the module docstring for the layout)."""

    input_ids: torch.Tensor  # (b, P + R)
    attention_mask: torch.Tensor  # (b, P + R)
    position_ids: torch.Tensor  # (b, P + R)
    responses: torch.Tensor  # (b, R)
    response_mask: torch.Tensor  # (b, R) float
    response_len: int
    prompt_lists: list[list[int]] = field(default_factory=list)
    response_lists: list[list[int]] = field(default_factory=list)


def collate(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    masks: Sequence[Sequence[int]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> MicroBatch:
    """Left-pads prompts and right-pads responses (verl's layout), on ``device``; see the module docstring."""
    b = len(prompts)
    p_len = max(len(p) for p in prompts)
    r_len = max(max(len(r) for r in responses), 1)
    ids = torch.full((b, p_len + r_len), pad_id, dtype=torch.long)
    attn = torch.zeros((b, p_len + r_len), dtype=torch.long)
    resp = torch.full((b, r_len), pad_id, dtype=torch.long)
    rmask = torch.zeros((b, r_len), dtype=torch.float32)
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks, strict=True)):
        ids[i, p_len - len(p) : p_len] = torch.tensor(p, dtype=torch.long)
        attn[i, p_len - len(p) : p_len] = 1
        if r:
            ids[i, p_len : p_len + len(r)] = torch.tensor(r, dtype=torch.long)
            attn[i, p_len : p_len + len(r)] = 1
            resp[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            rmask[i, : len(r)] = torch.tensor(m, dtype=torch.float32)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    ids, attn, pos, resp, rmask = (t.to(device) for t in (ids, attn, pos, resp, rmask))
    return MicroBatch(ids, attn, pos, resp, rmask, r_len, [list(p) for p in prompts], [list(r) for r in responses])


def causal_lm_parts(model: Any) -> tuple[Any, Any]:
    """``(decoder, lm_head)`` of a transformers causal LM, or of the one inside a :class:`peft.PeftModel` (whose
    injected LoRA layers, and ``disable_adapter()``, act inside the decoder)."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.get_decoder(), causal.get_output_embeddings()


def output_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits ``(..., V)`` from final hidden states ``(..., H)`` (the LM head, plus Gemma-style final
    logit soft-capping when the config has it)."""
    logits = causal_lm_parts(model)[1](hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits  # type: ignore[no-any-return]


def response_logits(model: Any, mb: MicroBatch, *, share_prompt: bool) -> torch.Tensor:
    """Next-token logits ``(b, R, V)`` at the response positions: entry ``t`` predicts response token ``t``.

    ``output_logits(model, response_hidden(...))``; see :func:`response_hidden` for the arguments.
    """
    return output_logits(model, response_hidden(model, mb, share_prompt=share_prompt))


def response_hidden(model: Any, mb: MicroBatch, *, share_prompt: bool) -> torch.Tensor:
    """Final hidden states ``(b, R, H)`` at the positions that predict the response tokens: entry ``t`` predicts
    response token ``t`` (the LM head of :func:`output_logits` turns them into logits, for all or some positions).

    Args:
        model: a causal LM (or a peft model around one).
        mb: the micro-batch from :func:`collate`.
        share_prompt: run each distinct prompt once and its responses on top of its KV cache (a GRPO group shares
            one prompt, so the prompt is computed once instead of ``n`` times, forward and backward); otherwise one
            forward pass over the padded ``prompt + response`` rows. Both give the same values up to float rounding.

    Raises:
        RuntimeError: ``share_prompt`` with a model whose KV cache layers cannot be re-batched.
    """
    decoder = causal_lm_parts(model)[0]
    r_all = mb.response_len
    if not share_prompt:
        out = decoder(
            input_ids=mb.input_ids,
            attention_mask=mb.attention_mask,
            position_ids=mb.position_ids,
            use_cache=False,
        )
        return out.last_hidden_state[:, -r_all - 1 : -1, :]  # type: ignore[no-any-return]
    from transformers import DynamicCache

    from searchrl.services.policy.engines.kv_cache import cache_layers

    dev = mb.input_ids.device
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, prompt in enumerate(mb.prompt_lists):
        groups.setdefault(tuple(prompt), []).append(row)
    parts: dict[int, torch.Tensor] = {}
    for prompt, rows in groups.items():
        p_len, k = len(prompt), len(rows)
        cache = DynamicCache(config=model.config)
        p_out = decoder(
            input_ids=torch.tensor([prompt], dtype=torch.long, device=dev),
            past_key_values=cache,
            use_cache=True,
        )
        first = p_out.last_hidden_state[:, -1:, :].expand(k, 1, -1)  # predicts response token 0
        r_len = max(max(len(mb.response_lists[r]) for r in rows), 1)
        if r_len > 1:
            # The batch-1 prompt cache repeated k times in place (expand: no copy; gradients sum over the rows).
            for layer in cache_layers(p_out.past_key_values):
                layer.keys = layer.keys.expand(k, -1, -1, -1)
                layer.values = layer.values.expand(k, -1, -1, -1)
            ids = torch.full((k, r_len), 0, dtype=torch.long)
            attn = torch.zeros((k, p_len + r_len), dtype=torch.long)
            attn[:, :p_len] = 1
            for i, r in enumerate(rows):
                resp = mb.response_lists[r]
                ids[i, : len(resp)] = torch.tensor(resp, dtype=torch.long)
                attn[i, p_len : p_len + len(resp)] = 1
            pos = torch.arange(p_len, p_len + r_len).unsqueeze(0).expand(k, -1)
            ids, attn, pos = ids.to(dev), attn.to(dev), pos.to(dev)
            r_out = decoder(
                input_ids=ids[:, :-1],
                attention_mask=attn[:, :-1],
                position_ids=pos[:, :-1],
                past_key_values=p_out.past_key_values,
                use_cache=True,
            )
            hidden = torch.cat([first, r_out.last_hidden_state], dim=1)  # (k, r_len, H)
        else:
            hidden = first
        for i, r in enumerate(rows):
            row_hidden = hidden[i]
            if row_hidden.shape[0] < r_all:  # pad to the micro-batch width; padded positions are masked out
                row_hidden = torch.cat(
                    [row_hidden, row_hidden.new_zeros(r_all - row_hidden.shape[0], row_hidden.shape[1])]
                )
            parts[r] = row_hidden
    return torch.stack([parts[r] for r in range(len(mb.prompt_lists))])
