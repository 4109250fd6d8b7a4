"""Re-batching a transformers ``DynamicCache``: the running batch of :class:`TransformersEngine` and its prefix cache.

Rows join (:func:`merge`) and leave (:func:`drop`) a batch between decode steps. Each row is left-padded: its
attention mask hides the padding and its position ids skip it. This module reaches into transformers' cache
internals (``DynamicCache.layers[i].keys/.values``, shape [B, H, T, D]); :func:`cache_layers` refuses layer kinds it
cannot re-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

Row = TypeVar("Row")


@dataclass(eq=False)
class Batch(Generic[Row]):
    """Rows decoding together.

    Attributes:
        rows: one request per row.
        mask: attention mask [B, T] (0 on the left padding).
        cache: the ``DynamicCache`` of the rows ([B, H, T, D] per layer).
        model: the model that computed the cache (rows of different models never share a batch).
        last_logits: next-token logits of each row [B, V].
    """

    rows: list[Row]
    mask: Any
    cache: Any
    model: Any
    last_logits: Any = None


def model_device(model: Any) -> Any:
    """The ``torch.device`` of ``model``'s parameters: where its inputs, KV cache and samplers must live."""
    import torch

    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return param.device if param is not None else torch.device("cpu")


def cache_layers(cache: Any) -> list[Any]:
    """The per-layer K/V holders of a transformers ``DynamicCache`` (``.keys``/``.values`` of shape [B, H, T, D]).

    Raises:
        RuntimeError: a cache kind whose layers cannot be re-batched (e.g. sliding-window layers).
    """
    layers = list(getattr(cache, "layers", []))
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    for layer in layers:
        if not isinstance(layer, DynamicLayer) or isinstance(layer, DynamicSlidingWindowLayer):
            raise RuntimeError(f"cache layer {type(layer).__name__} cannot be re-batched")
    return layers


def drop(batch: Batch[Row], rows: set[int]) -> Batch[Row] | None:
    """Removes ``rows`` from the batch (KV cache and mask) and trims all-padding columns on the left.

    Returns:
        The batch, or ``None`` when no row is left.
    """
    if not rows:
        return batch
    keep = [i for i in range(len(batch.rows)) if i not in rows]
    if not keep:
        return None
    import torch

    idx = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
    batch.rows = [batch.rows[i] for i in keep]
    batch.mask = batch.mask[idx]
    batch.last_logits = batch.last_logits[idx]
    for layer in cache_layers(batch.cache):
        layer.keys = layer.keys[idx]
        layer.values = layer.values[idx]
    # Columns that are padding in every remaining row carry no information: drop them.
    real_cols = batch.mask.any(dim=0).nonzero()
    first = int(real_cols[0]) if len(real_cols) else 0
    if first > 0:
        batch.mask = batch.mask[:, first:]
        for layer in cache_layers(batch.cache):
            layer.keys = layer.keys[:, :, first:, :]
            layer.values = layer.values[:, :, first:, :]
    return batch


def merge(a: Batch[Row] | None, b: Batch[Row] | None) -> Batch[Row] | None:
    """Appends the rows of ``b`` to ``a`` (either may be ``None``), left-padding the shorter one's mask and KV cache.

    Raises:
        RuntimeError: the two batches were decoded by different models.
    """
    if a is None or b is None:
        return b if a is None else a
    import torch

    if a.model is not b.model:
        raise RuntimeError("cannot merge rows decoded by different models")
    la, lb = a.mask.shape[1], b.mask.shape[1]
    width = max(la, lb)

    def pad(t: Any, n: int, dim: int) -> Any:  # n zero columns on the left of dimension dim
        if not n:
            return t
        shape = list(t.shape)
        shape[dim] = n
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for layer_a, layer_b in zip(cache_layers(a.cache), cache_layers(b.cache), strict=True):
        layer_a.keys = torch.cat([pad(layer_a.keys, width - la, 2), pad(layer_b.keys, width - lb, 2)], dim=0)
        layer_a.values = torch.cat([pad(layer_a.values, width - la, 2), pad(layer_b.values, width - lb, 2)], dim=0)
    a.mask = torch.cat([pad(a.mask, width - la, 1), pad(b.mask, width - lb, 1)], dim=0)
    a.rows = a.rows + b.rows
    a.last_logits = torch.cat([a.last_logits, b.last_logits], dim=0)
    return a


def common_prefix(seqs: list[list[int]]) -> int:
    """Length of the longest common prefix of token sequences."""
    first = seqs[0]
    n = min(len(x) for x in seqs)
    for i in range(n):
        if any(x[i] != first[i] for x in seqs[1:]):
            return i
    return n


class PrefixCache(NamedTuple):
    """The KV of one token prefix (e.g. the system prompt every episode shares), computed once for one model.

    Attributes:
        key: ``(id(model), version)`` of the weights that computed it; other weights make it stale.
        tokens: the prefix token ids [P].
        kv: ``(keys, values)`` per layer, each [1, H, P, D].
    """

    key: tuple[int, str]
    tokens: list[int]
    kv: list[tuple[Any, Any]]

    @classmethod
    def compute(cls, model: Any, key: tuple[int, str], tokens: list[int]) -> PrefixCache:
        """Runs ``model`` over ``tokens`` (one row, positions 0..P-1) and keeps its KV."""
        import torch
        from transformers import DynamicCache

        out = model(
            input_ids=torch.tensor([tokens], dtype=torch.long, device=model_device(model)),
            past_key_values=DynamicCache(config=model.config),
            use_cache=True,
        )
        return cls(key, list(tokens), [(layer.keys, layer.values) for layer in cache_layers(out.past_key_values)])

    def starts(self, prompt_ids: list[int]) -> bool:
        """Whether ``prompt_ids`` is the prefix followed by at least one more token."""
        n = len(self.tokens)
        return len(prompt_ids) > n and prompt_ids[:n] == self.tokens

    def expand(self, rows: int, config: Any) -> Any:
        """A ``DynamicCache`` holding the prefix KV for ``rows`` rows (expanded views, no copy)."""
        from transformers import DynamicCache

        data = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.kv]
        return DynamicCache(data, config=config)
