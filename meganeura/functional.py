"""Functions over Tensors, named as in torch.nn.functional and NumPy."""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import Tensor, gelu, matmul
from meganeura.ops.conv import conv_attrs, conv_shape, spatial_tuple
from meganeura.ops.elementwise import where

__all__ = [
    "adaptive_avg_pool2d",
    "avg_pool2d",
    "conv1d",
    "conv2d",
    "conv_transpose2d",
    "cross_entropy",
    "exp",
    "gelu",
    "interpolate",
    "log",
    "log_softmax",
    "matmul",
    "max_pool2d",
    "maximum",
    "minimum",
    "mse_loss",
    "pixel_shuffle",
    "pixel_unshuffle",
    "relu",
    "sigmoid",
    "softmax",
    "sqrt",
    "tanh",
    "upsample",
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
