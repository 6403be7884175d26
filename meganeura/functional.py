"""Functions over Tensors, named as in torch.nn.functional and NumPy."""

from __future__ import annotations

from meganeura.graph import Tensor, gelu, matmul
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
