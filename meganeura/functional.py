"""Functions over Tensors, named as in torch.nn.functional and NumPy."""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import Tensor, gelu, matmul
from meganeura.ops.attention import attention
from meganeura.ops.elementwise import where

__all__ = [
    "cross_entropy",
    "exp",
    "gelu",
    "log",
    "log_softmax",
    "matmul",
    "maximum",
    "minimum",
    "mse_loss",
    "relu",
    "scaled_dot_product_attention",
    "sigmoid",
    "softmax",
    "sqrt",
    "tanh",
    "where",
]

REDUCTIONS = ("mean", "sum", "none")


def relu(x: Tensor) -> Tensor:
    return x.relu()


def sigmoid(x: Tensor) -> Tensor:
    return x.sigmoid()


def tanh(x: Tensor) -> Tensor:
    return x.tanh()


def exp(x: Tensor) -> Tensor:
    return x.exp()


def log(x: Tensor) -> Tensor:
    return x.log()


def sqrt(x: Tensor) -> Tensor:
    return x.sqrt()


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    return x.softmax(axis)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    return x.log_softmax(axis)


def maximum(a: Tensor, b) -> Tensor:
    return a._binary("maximum", b)


def minimum(a: Tensor, b) -> Tensor:
    return a._binary("minimum", b)


def _check_reduction(op: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def cross_entropy(
    logits: Tensor, labels: Tensor, reduction: str = "mean", ignore_index: int = -100
) -> Tensor:
    """Cross-entropy of `logits[..., C]` (classes on the last axis) against integer `labels`.

    Like torch.nn.functional.cross_entropy: "mean" averages over the labels that are not
    `ignore_index`.
    """
    _check_reduction("cross_entropy", reduction)
    rows = logits.graph.apply("cross_entropy_rows", [logits, labels], ignore_index=ignore_index)
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = labels.ne(ignore_index).astype(logits.dtype).sum()
    return total / count


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    _check_reduction("mse_loss", reduction)
    if input.shape != target.shape:
        raise ValueError(
            f"mse_loss: input {list(input.shape)} and target {list(target.shape)} must match"
        )
    sq = (input - target) * (input - target)
    if reduction == "none":
        return sq
    return sq.sum() if reduction == "sum" else sq.mean()


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> Tensor:
    """torch.nn.functional.scaled_dot_product_attention over [..., heads, tokens, head_dim].

    Grouped-query and multi-query layouts need no flag (query heads a multiple of key/value
    heads). `attn_mask` is additive (float) or boolean (True = may attend), broadcastable to
    [..., q heads, q tokens, k tokens]. Unlike torch, `is_causal` aligns the mask
    bottom-right when there are fewer queries than keys (queries continuing a KV cache); the
    two agree when the counts are equal. `window` (sliding-window attention) and `softcap`
    (logit soft-capping, softcap * tanh(logits / softcap)) go beyond torch's arguments;
    see meganeura.ops.attention for their exact meaning.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.ndim < 3:
            raise ValueError(
                f"scaled_dot_product_attention: {name} must be [..., heads, tokens, head_dim], "
                f"got shape {list(t.shape)}"
            )
    mask = attn_mask
    if mask is not None and mask.dtype == "bool":
        mask = where(mask, 0.0, -np.inf).astype(query.dtype)
    lead = query.shape[:-3]
    if query.ndim == 4 or (query.ndim == 3 and key.ndim == 3 and value.ndim == 3):
        q, k, v = (t if t.ndim == 4 else t.reshape(1, *t.shape) for t in (query, key, value))
    else:
        if key.shape[:-3] != lead or value.shape[:-3] != lead:
            raise ValueError(
                "scaled_dot_product_attention: query, key and value need the same leading "
                f"dims, got {list(query.shape)}, {list(key.shape)}, {list(value.shape)}"
            )
        batch = math.prod(lead)
        q, k, v = (t.reshape(batch, *t.shape[-3:]) for t in (query, key, value))
        if mask is not None:
            full = (*lead, query.shape[-3], query.shape[-2], key.shape[-2])
            mask = mask.broadcast_to(full).reshape(batch, *full[-3:])
    out = attention(q, k, v, mask, scale=scale, causal=is_causal, window=window, softcap=softcap)
    return out.reshape(*lead, *out.shape[1:]) if query.ndim != 4 else out
