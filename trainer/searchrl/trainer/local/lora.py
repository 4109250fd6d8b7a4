"""LoRA for the local trainer, through ``peft``: adapters on the policy, the merged model for sampling and export.

With ``model.lora_rank > 0`` the policy is a :class:`peft.PeftModel` whose LoRA layers wrap the frozen base weights;
only the adapters (``lora_A``, ``lora_B``) are trained. The reference policy of the KL term is the same object with
the adapters switched off (``with model.disable_adapter():``), so there is no second copy of the model.

Everything outside the update wants a plain transformers model: the in-process rollout engine (sampling through a
merged model avoids the per-layer adapter matmuls of every decode step), the Hugging Face folder of a checkpoint
(what the PolicyService's ``LoadWeights`` and ``searchrl eval`` read) and the weights pushed to a remote policy.
:class:`MergedPolicy` keeps one such model: a copy of the base model whose adapted projections are overwritten by
``W + (lora_alpha / r) * B @ A`` (peft's ``get_delta_weight``, the same update ``merge_and_unload`` applies) after
every optimizer step.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from searchrl.errors import InvalidRequest
from searchrl.trainer.config import ModelConfig

ADAPTER = "default"  # peft's name of the one adapter


def is_lora(model: Any) -> bool:
    """Whether ``model`` is a peft model (the policy of a ``model.lora_rank > 0`` run)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def add_adapters(model: Any, cfg: ModelConfig) -> Any:
    """Wraps ``model`` (a transformers causal LM, modified in place) with freshly initialised LoRA adapters.

    ``lora_A`` is drawn from torch's global RNG (peft's Kaiming init) and ``lora_B`` is zero, so the adapted model
    starts equal to the base model. Every base parameter is frozen.

    Raises:
        InvalidRequest: none of ``cfg.lora_target_modules`` exists in the model.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise InvalidRequest(f"cannot add LoRA adapters: {exc}") from None


def load_adapters(model: Any, adapter_dir: str | Path) -> Any:
    """Wraps ``model`` with the trainable adapters saved by ``PeftModel.save_pretrained`` in ``adapter_dir``.

    Raises:
        InvalidRequest: ``adapter_dir`` holds no adapter.
    """
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise InvalidRequest(f"no LoRA adapter in {adapter_dir}")
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates: every one for full fine-tuning, the adapters' with LoRA (model order)."""
    return [p for p in model.parameters() if p.requires_grad]


def _lora_layers(model: Any) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    return [(name, m) for name, m in base.named_modules() if isinstance(m, LoraLayer)]


class MergedPolicy:
    """A plain transformers copy of a LoRA policy with the adapters merged into its weights.

    Args:
        model: the :class:`peft.PeftModel` being trained; its base weights are copied once (one model's worth of
            memory), the adapted projections are rewritten by :meth:`refresh`.
    """

    def __init__(self, model: Any) -> None:
        self.source = model
        self._layers = _lora_layers(model)
        if not self._layers:
            raise InvalidRequest("the LoRA policy has no LoRA layers")
        base = model.get_base_model()
        # A deep copy of the wrapped model with each LoRA layer replaced by its base linear layer.
        plain = copy.deepcopy(base)
        for name, _layer in self._layers:
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name) if parent_name else plain
            setattr(parent, child, getattr(parent, child).base_layer)
        self.model = plain.eval().requires_grad_(False)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> Any:
        """Writes ``W_base + scale * B @ A`` of every adapted projection into :attr:`model`; returns the model."""
        for name, layer in self._layers:
            target = self.model.get_submodule(name)
            weight = layer.base_layer.weight
            if ADAPTER in layer.lora_A:
                delta = layer.get_delta_weight(ADAPTER)
                target.weight.copy_(weight + delta.to(weight.dtype))
            else:
                target.weight.copy_(weight)
        return self.model
