"""Functions over Tensors, named as in torch.nn.functional and NumPy."""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import Tensor, gelu, matmul
from meganeura.ops.attention import attention
from meganeura.ops.conv import conv_attrs, conv_shape, spatial_tuple
from meganeura.ops.elementwise import where
from meganeura.ops.norm import layer_norm, rms_norm
from meganeura.ops.rope import rope
from meganeura.ops.views import chunk, concat, expand, flip, pad, repeat, split, stack, tile

__all__ = [
    "adaptive_avg_pool2d",
    "avg_pool2d",
    "batch_norm",
    "binary_cross_entropy_with_logits",
    "cat",
    "chunk",
    "clamp",
    "concat",
    "conv1d",
    "conv2d",
    "conv_transpose2d",
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
    "interpolate",
    "l1_loss",
    "layer_norm",
    "log",
    "log_softmax",
    "matmul",
    "max_pool2d",
    "maximum",
    "minimum",
    "mse_loss",
    "nll_loss",
    "pad",
    "pixel_shuffle",
    "pixel_unshuffle",
    "relu",
    "repeat",
    "rms_norm",
    "rope",
    "scaled_dot_product_attention",
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
    "upsample",
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


def argmax(x: Tensor, dim: int = -1) -> Tensor:
    """Index of the largest value along `dim` as int32 (the first on ties; NaN counts as the
    largest), as torch.argmax with a dim. Not differentiable."""
    return x.graph.apply("argmax", [x], axis=dim)


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


# -- convolution and pooling (NCHW; an unbatched input [C, H, W] is treated as a batch of 1) ------


def _batched(op: str, x: Tensor, spatial: int) -> tuple[Tensor, bool]:
    """x with a batch dim, and whether one was added (torch accepts unbatched inputs)."""
    if x.ndim == spatial + 1:
        return x.reshape(1, *x.shape), True
    if x.ndim != spatial + 2:
        dims = "N, C, L" if spatial == 1 else "N, C, H, W"
        raise ValueError(f"{op}: input must be [{dims}] or unbatched, got {list(x.shape)}")
    return x, False


def _unbatched(y: Tensor, added: bool) -> Tensor:
    return y.reshape(y.shape[1:]) if added else y


def _add_bias(op: str, y: Tensor, bias: Tensor | None) -> Tensor:
    if bias is None:
        return y
    if bias.shape != (y.shape[1],):
        raise ValueError(
            f"{op}: bias must have shape [{y.shape[1]}] (one per output channel), "
            f"got {list(bias.shape)}"
        )
    return y + bias.reshape(y.shape[1], 1, 1)


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> Tensor:
    """torch.nn.functional.conv2d: input [N, C, H, W], weight [O, C / groups, kh, kw].

    padding is an int, a pair, ((top, bottom), (left, right)), "valid" or "same".
    """
    x, added = _batched("conv2d", input, 2)
    if weight.ndim != 4:
        raise ValueError(f"conv2d: weight must be [O, C / groups, kh, kw], got {weight.type}")
    y = x.graph.apply(
        "conv2d", [x, weight], stride=stride, padding=padding, dilation=dilation, groups=groups
    )
    return _unbatched(_add_bias("conv2d", y, bias), added)


def conv1d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> Tensor:
    """torch.nn.functional.conv1d: input [N, C, L], weight [O, C / groups, k]; computed as a
    conv2d over a height of 1."""
    x, added = _batched("conv1d", input, 1)
    if weight.ndim != 3:
        raise ValueError(f"conv1d: weight must be [O, C / groups, k], got {weight.type}")
    attrs = conv_attrs(
        "conv1d",
        weight.shape[2:],
        {"stride": stride, "padding": padding, "dilation": dilation, "groups": groups},
    )
    conv_shape("conv1d", x.shape, weight.shape, attrs)
    n, c, length = x.shape
    y = x.graph.apply(
        "conv2d",
        [x.reshape(n, c, 1, length), weight.reshape(*weight.shape[:2], 1, weight.shape[2])],
        stride=(1, *attrs["stride"]),
        padding=((0, 0), *attrs["padding"]),
        dilation=(1, *attrs["dilation"]),
        groups=attrs["groups"],
    )
    y = _add_bias("conv1d", y, bias)
    return _unbatched(y.reshape(y.shape[0], y.shape[1], y.shape[3]), added)


def conv_transpose2d(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    output_padding=0,
    groups: int = 1,
    dilation=1,
) -> Tensor:
    """torch.nn.functional.conv_transpose2d: input [N, C_in, H, W], weight
    [C_in, C_out / groups, kh, kw]; the gradient of conv2d with respect to its input."""
    op = "conv_transpose2d"
    x, added = _batched(op, input, 2)
    stride = spatial_tuple(op, "stride", stride, 2, 1)
    dilation = spatial_tuple(op, "dilation", dilation, 2, 1)
    pads = spatial_tuple(op, "padding", padding, 2, 0)
    extra = spatial_tuple(op, "output_padding", output_padding, 2, 0)
    for e, s, d in zip(extra, stride, dilation, strict=True):
        if e >= s and e >= d:
            raise ValueError(
                f"{op}: output_padding {list(extra)} must be smaller than the stride "
                f"{list(stride)} or the dilation {list(dilation)}"
            )
    y = x.graph.apply(
        op,
        [x, weight],
        stride=stride,
        padding=tuple((p, p - e) for p, e in zip(pads, extra, strict=True)),
        dilation=dilation,
        groups=groups,
    )
    return _unbatched(_add_bias(op, y, bias), added)


def max_pool2d(
    input: Tensor,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
):
    """torch.nn.functional.max_pool2d. With return_indices, also the flat H*W index (i32) of
    each window's first maximum, as torch returns it."""
    x, added = _batched("max_pool2d", input, 2)
    attrs = dict(
        kernel_size=kernel_size,
        stride=None if stride in (None, (), []) else stride,
        padding=padding,
        dilation=dilation,
        ceil_mode=ceil_mode,
    )
    y = _unbatched(x.graph.apply("max_pool2d", [x], **attrs), added)
    if not return_indices:
        return y
    return y, _unbatched(x.graph.apply("max_pool2d_indices", [x], **attrs), added)


def avg_pool2d(
    input: Tensor,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
    divisor_override: int | None = None,
) -> Tensor:
    """torch.nn.functional.avg_pool2d."""
    x, added = _batched("avg_pool2d", input, 2)
    y = x.graph.apply(
        "avg_pool2d",
        [x],
        kernel_size=kernel_size,
        stride=None if stride in (None, (), []) else stride,
        padding=padding,
        ceil_mode=ceil_mode,
        count_include_pad=count_include_pad,
        divisor_override=divisor_override,
    )
    return _unbatched(y, added)


def adaptive_avg_pool2d(input: Tensor, output_size) -> Tensor:
    """torch.nn.functional.adaptive_avg_pool2d; a None in output_size keeps that input size.
    Global average pooling (output_size 1) is a mean over H and W."""
    x, added = _batched("adaptive_avg_pool2d", input, 2)
    sizes = (output_size,) * 2 if isinstance(output_size, int) else tuple(output_size)
    if len(sizes) != 2:
        raise ValueError(
            f"adaptive_avg_pool2d: output_size must be an int or (h, w), got {output_size!r}"
        )
    sizes = tuple(n if s is None else s for s, n in zip(sizes, x.shape[2:], strict=True))
    if sizes == (1, 1):
        y = x.mean((2, 3), keepdims=True)
    else:
        y = x.graph.apply("adaptive_avg_pool2d", [x], output_size=sizes)
    return _unbatched(y, added)


def _resample_scales(
    op: str, in_hw, size, scale_factor, recompute_scale_factor
) -> tuple[tuple[int, ...], tuple[float | None, ...]]:
    """(output size, the scale factors torch hands its kernels: None where in/out is used)."""
    if (size is None) == (scale_factor is None):
        raise ValueError(f"{op}: give exactly one of size and scale_factor")
    if size is not None:
        out = spatial_tuple(op, "size", size, 2, 1)
        return out, (None, None)
    factors = (scale_factor,) * 2 if isinstance(scale_factor, (int, float)) else scale_factor
    factors = tuple(float(f) for f in factors)
    if len(factors) != 2 or not all(math.isfinite(f) and f > 0 for f in factors):
        raise ValueError(f"{op}: scale_factor must be 2 positive numbers, got {scale_factor!r}")
    out = tuple(math.floor(n * f) for n, f in zip(in_hw, factors, strict=True))
    if min(out) < 1:
        raise ValueError(
            f"{op}: scale_factor {scale_factor!r} gives an empty output {list(out)} for input "
            f"size {list(in_hw)}"
        )
    return out, (None, None) if recompute_scale_factor else factors


def interpolate(
    input: Tensor,
    size=None,
    scale_factor=None,
    mode: str = "nearest",
    align_corners: bool | None = None,
    recompute_scale_factor: bool | None = None,
) -> Tensor:
    """torch.nn.functional.interpolate over [N, C, H, W] for modes "nearest" and "bilinear",
    with torch's source coordinates (scale factors given are used as given)."""
    op = "interpolate"
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"{op}: mode must be 'nearest' or 'bilinear', got {mode!r}")
    if mode == "nearest" and align_corners is not None:
        raise ValueError(f"{op}: align_corners can only be set with mode='bilinear'")
    if input.ndim != 4:
        raise ValueError(f"{op}: input must be 4-D [N, C, H, W], got {list(input.shape)}")
    in_hw = input.shape[2:]
    out, factors = _resample_scales(op, in_hw, size, scale_factor, recompute_scale_factor)
    if mode == "bilinear" and align_corners:
        scale = tuple(
            float((np.float32(n) - 1) / np.float32(o - 1)) if o > 1 else 0.0
            for n, o in zip(in_hw, out, strict=True)
        )
    else:
        scale = tuple(
            float(np.float32(n) / np.float32(o)) if f is None else float(np.float32(1.0 / f))
            for n, o, f in zip(in_hw, out, factors, strict=True)
        )
    if mode == "nearest":
        return input.graph.apply("upsample_nearest2d", [input], size=out, scale=scale)
    return input.graph.apply(
        "upsample_bilinear2d", [input], size=out, scale=scale, align_corners=bool(align_corners)
    )


upsample = interpolate


def pixel_shuffle(input: Tensor, upscale_factor: int) -> Tensor:
    """[..., C * r * r, H, W] -> [..., C, H * r, W * r], a view read in place."""
    return input.graph.apply("pixel_shuffle", [input], factor=upscale_factor)


def pixel_unshuffle(input: Tensor, downscale_factor: int) -> Tensor:
    """[..., C, H * r, W * r] -> [..., C * r * r, H, W] (space to depth), a view read in place."""
    return input.graph.apply("pixel_unshuffle", [input], factor=downscale_factor)


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
