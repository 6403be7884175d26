"""Functions over Tensors, named as in torch.nn.functional and NumPy."""

from __future__ import annotations

from meganeura.graph import Tensor, gelu, matmul
from meganeura.ops.elementwise import where
from meganeura.ops.norm import layer_norm, rms_norm
from meganeura.ops.rope import rope
from meganeura.ops.views import chunk, concat, expand, flip, pad, repeat, split, stack, tile

__all__ = [
    "batch_norm",
    "binary_cross_entropy_with_logits",
    "cat",
    "chunk",
    "clamp",
    "concat",
    "cos",
    "cross_entropy",
    "embedding",
    "erf",
    "exp",
    "expand",
    "flip",
    "gather",
    "gelu",
    "group_norm",
    "index_select",
    "l1_loss",
    "layer_norm",
    "log",
    "log_softmax",
    "matmul",
    "maximum",
    "minimum",
    "mse_loss",
    "nll_loss",
    "pad",
    "relu",
    "repeat",
    "rms_norm",
    "rope",
    "sigmoid",
    "silu",
    "sin",
    "smooth_l1_loss",
    "softmax",
    "softplus",
    "split",
    "sqrt",
    "stack",
    "swiglu",
    "tanh",
    "tile",
    "where",
]

cat = concat

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


def silu(x: Tensor) -> Tensor:
    return x.silu()


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up in one pointwise op (the gated MLP of Llama-style models)."""
    return gate.graph.apply("swiglu", [gate, up])


def softplus(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    return x.softplus(beta, threshold)


def clamp(x: Tensor, min: float | None = None, max: float | None = None) -> Tensor:
    return x.clamp(min, max)


def sin(x: Tensor) -> Tensor:
    return x.sin()


def cos(x: Tensor) -> Tensor:
    return x.cos()


def erf(x: Tensor) -> Tensor:
    return x.erf()


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


def l1_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    _check_pair("l1_loss", input, target)
    return _reduce("l1_loss", (input - target).abs(), reduction)


def smooth_l1_loss(
    input: Tensor, target: Tensor, reduction: str = "mean", beta: float = 1.0
) -> Tensor:
    """Quadratic (0.5 d^2 / beta) where |d| < beta, linear (|d| - beta / 2) beyond; beta = 0
    is the L1 loss. As torch.nn.functional.smooth_l1_loss."""
    _check_pair("smooth_l1_loss", input, target)
    if not beta >= 0:
        raise ValueError(f"smooth_l1_loss: beta must be >= 0, got {beta!r}")
    d = input - target
    if beta == 0:
        return _reduce("smooth_l1_loss", d.abs(), reduction)
    ad = d.abs()
    loss = where(ad < beta, d * d * (0.5 / beta), ad - 0.5 * beta)
    return _reduce("smooth_l1_loss", loss, reduction)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    """Sigmoid and binary cross-entropy in one numerically stable expression:
    (1 - t) x + (1 + (pos_weight - 1) t) softplus(-x), as in PyTorch."""
    _check_pair("binary_cross_entropy_with_logits", input, target)
    _check_reduction("binary_cross_entropy_with_logits", reduction)
    softplus_neg = (-input).softplus()
    if pos_weight is None:
        loss = (1.0 - target) * input + softplus_neg
    else:
        loss = (1.0 - target) * input + ((pos_weight - 1.0) * target + 1.0) * softplus_neg
    if weight is not None:
        loss = loss * weight
    if loss.shape != input.shape:
        raise ValueError(
            f"binary_cross_entropy_with_logits: weight or pos_weight changed the loss shape to "
            f"{list(loss.shape)}; they must broadcast to the input {list(input.shape)}"
        )
    return _reduce("binary_cross_entropy_with_logits", loss, reduction)


def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Negative log-likelihood of log-probabilities `input` ([N, C, ...] with classes on axis
    1, or [C]) at integer `target` ([N, ...] or []), as torch.nn.functional.nll_loss: class
    weights, ignore_index, and "mean" divides by the total weight of the counted targets."""
    _check_reduction("nll_loss", reduction)
    axis = 1 if input.ndim >= 2 else 0
    expected = input.shape[:axis] + input.shape[axis + 1 :]
    if input.ndim == 0 or target.shape != expected:
        raise ValueError(
            f"nll_loss: input {input.type} (classes on axis {axis}) needs a target of shape "
            f"{list(expected)}, got {target.type}"
        )
    if target.dtype not in ("i32", "u32"):
        raise TypeError(f"nll_loss: target must hold integer class indices, got {target.type}")
    classes = input.shape[axis]
    if weight is not None and (weight.shape != (classes,) or weight.dtype != input.dtype):
        raise ValueError(
            f"nll_loss: weight must be {input.dtype}[{classes}] (one per class), got {weight.type}"
        )
    valid = target.ne(ignore_index)
    safe = where(valid, target, 0)
    keep = (*target.shape[:axis], 1, *target.shape[axis:])
    picked = input.gather(axis, safe.reshape(keep)).reshape(target.shape)
    counted = valid.astype(input.dtype)
    if weight is not None:
        flat = safe.reshape(max(1, safe.type.size))
        counted = counted * weight.index_select(0, flat).reshape(target.shape)
    losses = -picked * counted
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / counted.sum()


def _check_pair(op: str, input: Tensor, target: Tensor) -> None:
    if input.shape != target.shape:
        raise ValueError(
            f"{op}: input {list(input.shape)} and target {list(target.shape)} must match"
        )


def _reduce(op: str, loss: Tensor, reduction: str) -> Tensor:
    _check_reduction(op, reduction)
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


# -- indexing ----------------------------------------------------------------------------------


def gather(x: Tensor, axis: int, index: Tensor) -> Tensor:
    """torch.gather: out[c] = x[c with c[axis] replaced by index[c]]."""
    return x.gather(axis, index)


def index_select(x: Tensor, axis: int, index: Tensor) -> Tensor:
    """torch.index_select: the slices of x along `axis` at the positions of 1-D `index`."""
    return x.index_select(axis, index)


def embedding(table: Tensor, ids: Tensor) -> Tensor:
    """Rows of `table` [V, D] at integer `ids` [...] -> [..., D] (note: table first, unlike
    torch.nn.functional.embedding). Its gradient sums the rows of each id deterministically."""
    if table.ndim != 2 or table.dtype not in ("f32", "f16"):
        raise ValueError(f"embedding: table must be a float [V, D] tensor, got {table.type}")
    if ids.dtype not in ("i32", "u32"):
        raise TypeError(f"embedding: ids must be i32 or u32, got {ids.type}")
    rows = table.index_select(0, ids.reshape(max(1, ids.type.size)))
    return rows.reshape((*ids.shape, table.shape[1]))


# -- normalization -----------------------------------------------------------------------------


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    """Where a per-channel [C] tensor broadcasts against x [N, C, *]."""
    return (x.shape[1],) + (1,) * (x.ndim - 2)


def _channel_affine(op: str, x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (x.shape[1],) or p.dtype != x.dtype):
            raise ValueError(
                f"{op}: {name} must be {x.dtype}[{x.shape[1]}] (one per channel of {x.type}), "
                f"got {p.type}"
            )
    if weight is not None:
        x = x * weight.reshape(_channel_shape(x))
    if bias is not None:
        x = x + bias.reshape(_channel_shape(x))
    return x


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.group_norm over x [N, C, *]: statistics per (sample, group of
    C / num_groups channels); one layer_norm row kernel, the affine fused into its reader."""
    if x.ndim < 2:
        raise ValueError(f"group_norm: x must be [N, C, *], got {x.type}")
    channels = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"group_norm: num_groups={num_groups!r} must be a positive divisor of the "
            f"{channels} channels of {x.type}"
        )
    rows = x.reshape(x.shape[0], num_groups, x.type.size // (x.shape[0] * num_groups))
    normalized = layer_norm(rows, eps=eps).reshape(x.shape)
    return _channel_affine("group_norm", normalized, weight, bias)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.batch_norm over x [N, C, *] (statistics per channel).

    Training normalizes with the batch statistics and, when running statistics (parameters)
    are given, updates them after each training step through graph.assign:
    running = (1 - momentum) running + momentum batch, with the unbiased variance, as PyTorch.
    Evaluation normalizes with the running statistics.
    """
    if x.ndim < 2:
        raise ValueError(f"batch_norm: x must be [N, C, *], got {x.type}")
    channels = x.shape[1]
    for name, stat in (("running_mean", running_mean), ("running_var", running_var)):
        if stat is not None and (stat.shape != (channels,) or stat.dtype != x.dtype):
            raise ValueError(
                f"batch_norm: {name} must be {x.dtype}[{channels}] (one per channel of "
                f"{x.type}), got {stat.type}"
            )
    axes = (0, *range(2, x.ndim))
    if training:
        count = x.type.size // channels
        if count < 2:
            raise ValueError(
                f"batch_norm: training needs more than one value per channel, {x.type} has {count}"
            )
        if momentum is None or not 0 <= momentum <= 1:
            raise ValueError(f"batch_norm: momentum must be in [0, 1], got {momentum!r}")
        mean = x.mean(axes, keepdims=True)
        centered = x - mean
        var = (centered * centered).mean(axes, keepdims=True)
        normalized = centered * (var + eps).rsqrt()
        graph = x.graph
        if running_mean is not None:
            batch_mean = mean.reshape(channels)
            graph.assign(running_mean, running_mean * (1.0 - momentum) + batch_mean * momentum)
        if running_var is not None:
            unbiased = var.reshape(channels) * (count / (count - 1))
            graph.assign(running_var, running_var * (1.0 - momentum) + unbiased * momentum)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: evaluation (training=False) needs running statistics")
        shape = _channel_shape(x)
        scale = (running_var + eps).rsqrt().reshape(shape)
        normalized = (x - running_mean.reshape(shape)) * scale
    return _channel_affine("batch_norm", normalized, weight, bias)
