"""Pooling over the last two axes of NCHW tensors: max, average and adaptive average.

The windows follow torch's rules exactly (output size, ceil_mode, the divisor of
count_include_pad and divisor_override). max_pool2d's gradient goes through the argmax of
each window (`max_pool2d_indices`, the first maximum in window order, as PyTorch picks it);
every gradient is an op of its own that gathers, for each input pixel, the windows that
read it, so no kernel needs atomics. They lower to the "window" archetype
(meganeura/backends/wgsl/window.py): one invocation per output element.
"""

from __future__ import annotations

import functools

import numpy as np

from meganeura.graph import TensorType
from meganeura.ops import OpDef, register
from meganeura.ops.conv import FLOATS, scatter_windows, spatial_tuple, window_source

# -- arguments --------------------------------------------------------------------------------


def pool_out_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool):
    """torch's pooling_output_shape: with ceil_mode the last window must start inside the
    input or its left padding."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _check_input(op: str, x: TensorType) -> None:
    if x.ndim != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), got {x}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{op}: input must be f32 or f16, got {x}")


def _normalize_pool(op: str, with_dilation: bool):
    def normalize(types, attrs):
        kernel = spatial_tuple(op, "kernel_size", attrs["kernel_size"], 2, 1)
        stride = attrs.get("stride")
        stride = kernel if stride is None else spatial_tuple(op, "stride", stride, 2, 1)
        padding = spatial_tuple(op, "padding", attrs.get("padding", 0), 2, 0)
        if any(p > k // 2 for p, k in zip(padding, kernel, strict=True)):
            raise ValueError(
                f"{op}: padding {list(padding)} must be at most half the kernel size "
                f"{list(kernel)} (rounded down)"
            )
        out = {
            "kernel_size": kernel,
            "stride": stride,
            "padding": padding,
            "ceil_mode": bool(attrs.get("ceil_mode", False)),
        }
        if with_dilation:
            out["dilation"] = spatial_tuple(op, "dilation", attrs.get("dilation", 1), 2, 1)
        else:
            out["count_include_pad"] = bool(attrs.get("count_include_pad", True))
            divisor = attrs.get("divisor_override") or 0
            if not isinstance(divisor, (int, np.integer)) or divisor < 0:
                raise ValueError(
                    f"{op}: divisor_override must be a positive int or None, got {divisor!r}"
                )
            out["divisor_override"] = int(divisor)
        if "input_size" in attrs:
            out["input_size"] = tuple(int(n) for n in attrs["input_size"])
        return out

    return normalize


def pool_output_shape(op: str, in_hw, attrs) -> tuple[int, int]:
    dilation = attrs.get("dilation", (1, 1))
    out = tuple(
        pool_out_size(n, k, s, p, d, attrs["ceil_mode"])
        for n, k, s, p, d in zip(
            in_hw, attrs["kernel_size"], attrs["stride"], attrs["padding"], dilation, strict=True
        )
    )
    if min(out) < 1:
        raise ValueError(
            f"{op}: the window (kernel {list(attrs['kernel_size'])}, dilation {list(dilation)}) "
            f"is larger than the padded input (input {list(in_hw)}, padding "
            f"{list(attrs['padding'])}), so the output would be {list(out)}"
        )
    return out


def _pool_infer(op: str, dtype: str | None = None):
    def infer(types, attrs):
        _check_input(op, types[0])
        x = types[0]
        out = pool_output_shape(op, x.shape[2:], attrs)
        return TensorType((*x.shape[:2], *out), dtype or x.dtype)

    return infer


def _pool_grad_infer(op: str):
    """Gradient ops: the upstream gradient (and indices) have the pool's output shape."""

    def infer(types, attrs):
        g = types[0]
        _check_input(op, g)
        in_hw = attrs["input_size"]
        expect = pool_output_shape(op, in_hw, attrs)
        for t in types:
            if tuple(t.shape[2:]) != expect or t.shape[:2] != g.shape[:2]:
                raise ValueError(
                    f"{op}: {t} must be [{g.shape[0]}, {g.shape[1]}, {expect[0]}, {expect[1]}] "
                    f"for input size {list(in_hw)}"
                )
        return TensorType((*g.shape[:2], *in_hw), g.dtype)

    return infer


def _pads(attrs):
    return tuple((p, p) for p in attrs["padding"])


# -- max pooling ------------------------------------------------------------------------------


def window_taps(x: np.ndarray, attrs, fill):
    """For each tap (ky, kx) of the pooling window, the [..., Ho, Wo] array of the values that
    tap reads (`fill` outside the input): a window reduction is then a reduction over a few
    whole arrays."""
    in_hw = x.shape[-2:]
    out_hw = pool_output_shape("pool", in_hw, attrs)
    (kh, kw), (sh, sw) = attrs["kernel_size"], attrs["stride"]
    dh, dw = attrs.get("dilation", (1, 1))
    extents = [
        (o - 1) * s + d * (k - 1) + 1
        for o, s, d, k in zip(out_hw, (sh, sw), (dh, dw), (kh, kw), strict=True)
    ]
    source = window_source(x, attrs["padding"], extents, fill)
    for ky in range(kh):
        for kx in range(kw):
            rows = slice(ky * dh, ky * dh + (out_hw[0] - 1) * sh + 1, sh)
            yield source[..., rows, kx * dw : kx * dw + (out_hw[1] - 1) * sw + 1 : sw]


def _max_ref(arrays, attrs):
    return functools.reduce(np.maximum, window_taps(arrays[0], attrs, -np.inf))


def _max_indices_ref(arrays, attrs):
    """The flat H*W index of each window's first maximum; a window whose in-bounds values are
    all -inf gives its first in-bounds tap, as in PyTorch."""
    x = arrays[0]
    h, w = x.shape[2:]
    positions = window_taps(np.arange(h * w).reshape(h, w), attrs, -1)
    best, index = None, None
    for values, where in zip(window_taps(x, attrs, -np.inf), positions, strict=True):
        if best is None:
            best, index = values, np.broadcast_to(where, values.shape)
            continue
        take = (where >= 0) & ((values > best) | (index < 0))
        best, index = np.where(take, values, best), np.where(take, where, index)
    return index.astype(np.int32)


def _max_vjp(g, inputs, out, attrs):
    x = inputs[0]
    indices = x.graph.apply("max_pool2d_indices", [x], **attrs)
    return [x.graph.apply("max_pool2d_grad", [g, indices], input_size=x.shape[2:], **attrs)]


def _max_grad_ref(arrays, attrs):
    g, indices = arrays
    n, c = g.shape[:2]
    h, w = attrs["input_size"]
    planes = np.arange(n * c).reshape(n, c, 1, 1) * (h * w)
    # A window lying wholly in the padding has no input tap (index -1): its maximum is -inf
    # and, as in PyTorch, it passes no gradient.
    taps = np.broadcast_to(planes + indices, g.shape)
    hit = np.broadcast_to(indices >= 0, g.shape)
    dx = np.bincount(taps[hit], weights=g[hit], minlength=n * c * h * w)
    return dx.reshape(n, c, h, w).astype(g.dtype)


def _indices_grad_infer(types, attrs):
    infer = _pool_grad_infer("max_pool2d_grad")
    if types[1].dtype != "i32":
        raise TypeError(f"max_pool2d_grad: indices must be i32, got {types[1]}")
    return infer(types[:1], attrs)


register(
    OpDef(
        "max_pool2d",
        "window",
        _pool_infer("max_pool2d"),
        _max_ref,
        _max_vjp,
        normalize=_normalize_pool("max_pool2d", True),
        doc="the maximum of each window; -inf padding",
    )
)
register(
    OpDef(
        "max_pool2d_indices",
        "window",
        _pool_infer("max_pool2d_indices", "i32"),
        _max_indices_ref,
        lambda g, inputs, out, attrs: [None],
        normalize=_normalize_pool("max_pool2d_indices", True),
        doc="the flat H*W index of each window's first maximum (torch's return_indices)",
    )
)
register(
    OpDef(
        "max_pool2d_grad",
        "window",
        _indices_grad_infer,
        _max_grad_ref,
        None,
        normalize=_normalize_pool("max_pool2d_grad", True),
        doc="dx of max_pool2d: each window's gradient to its argmax, summed per input pixel",
    )
)


# -- average pooling ----------------------------------------------------------------------------


def avg_divisors(in_size: int, out_size: int, kernel: int, stride: int, pad: int, include_pad):
    """Per output row: the window length torch divides by along one axis."""
    start = np.arange(out_size) * stride - pad
    end = np.minimum(start + kernel, in_size + pad)
    if include_pad:
        return end - start
    return np.minimum(end, in_size) - np.maximum(start, 0)


def _divisor(attrs, in_hw, out_hw) -> np.ndarray:
    if attrs["divisor_override"]:
        return np.full(out_hw, float(attrs["divisor_override"]))
    dy, dx = (
        avg_divisors(n, o, k, s, p, attrs["count_include_pad"])
        for n, o, k, s, p in zip(
            in_hw, out_hw, attrs["kernel_size"], attrs["stride"], attrs["padding"], strict=True
        )
    )
    return np.outer(dy, dx).astype(np.float64)


def _avg_ref(arrays, attrs):
    x = arrays[0]
    total = sum(window_taps(x.astype(np.float64), attrs, 0.0))
    return (total / _divisor(attrs, x.shape[2:], total.shape[2:])).astype(x.dtype)


def _avg_grad_ref(arrays, attrs):
    g = arrays[0]
    in_hw = attrs["input_size"]
    scaled = g.astype(np.float64) / _divisor(attrs, in_hw, g.shape[2:])
    cols = np.broadcast_to(scaled[..., None, None], (*g.shape, *attrs["kernel_size"]))
    return scatter_windows(cols, in_hw, attrs["stride"], _pads(attrs), (1, 1)).astype(g.dtype)


def _avg_attrs(attrs) -> dict:
    return {k: v for k, v in attrs.items() if k != "input_size"}


register(
    OpDef(
        "avg_pool2d",
        "window",
        _pool_infer("avg_pool2d"),
        _avg_ref,
        lambda g, inputs, out, attrs: [
            g.graph.apply("avg_pool2d_grad", [g], input_size=inputs[0].shape[2:], **attrs)
        ],
        normalize=_normalize_pool("avg_pool2d", False),
        doc="the mean of each window, with torch's divisor rules",
    )
)
register(
    OpDef(
        "avg_pool2d_grad",
        "window",
        _pool_grad_infer("avg_pool2d_grad"),
        _avg_grad_ref,
        lambda g, inputs, out, attrs: [g.graph.apply("avg_pool2d", [g], **_avg_attrs(attrs))],
        normalize=_normalize_pool("avg_pool2d_grad", False),
        doc="dx of avg_pool2d (its adjoint)",
    )
)


# -- adaptive average pooling -------------------------------------------------------------------


def adaptive_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in]: row o averages input rows floor(o*in/out) .. ceil((o+1)*in/out) - 1."""
    m = np.zeros((out_size, in_size))
    for o in range(out_size):
        start, end = (o * in_size) // out_size, -(-((o + 1) * in_size) // out_size)
        m[o, start:end] = 1.0 / (end - start)
    return m


def _adaptive_normalize(types, attrs):
    size = spatial_tuple("adaptive_avg_pool2d", "output_size", attrs["output_size"], 2, 1)
    out = {"output_size": size}
    if "input_size" in attrs:
        out["input_size"] = tuple(int(n) for n in attrs["input_size"])
    return out


def _adaptive_infer(types, attrs):
    _check_input("adaptive_avg_pool2d", types[0])
    return TensorType((*types[0].shape[:2], *attrs["output_size"]), types[0].dtype)


def _adaptive_grad_infer(types, attrs):
    _check_input("adaptive_avg_pool2d_grad", types[0])
    g = types[0]
    if tuple(g.shape[2:]) != attrs["output_size"]:
        raise ValueError(
            f"adaptive_avg_pool2d_grad: gradient {g} must have spatial size "
            f"{list(attrs['output_size'])}"
        )
    return TensorType((*g.shape[:2], *attrs["input_size"]), g.dtype)


def _separable(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """rows @ x @ cols.T over the last two axes of x."""
    return rows @ (x.astype(np.float64) @ cols.T)


def _adaptive_ref(arrays, attrs):
    x = arrays[0]
    (h, w), (ho, wo) = x.shape[2:], attrs["output_size"]
    out = _separable(x, adaptive_matrix(h, ho), adaptive_matrix(w, wo))
    return out.astype(x.dtype)


def _adaptive_grad_ref(arrays, attrs):
    g = arrays[0]
    (h, w), (ho, wo) = attrs["input_size"], attrs["output_size"]
    return _separable(g, adaptive_matrix(h, ho).T, adaptive_matrix(w, wo).T).astype(g.dtype)


register(
    OpDef(
        "adaptive_avg_pool2d",
        "window",
        _adaptive_infer,
        _adaptive_ref,
        lambda g, inputs, out, attrs: [
            g.graph.apply(
                "adaptive_avg_pool2d_grad",
                [g],
                input_size=inputs[0].shape[2:],
                output_size=attrs["output_size"],
            )
        ],
        normalize=_adaptive_normalize,
        doc="the mean over torch's adaptive windows of each output pixel",
    )
)
register(
    OpDef(
        "adaptive_avg_pool2d_grad",
        "window",
        _adaptive_grad_infer,
        _adaptive_grad_ref,
        lambda g, inputs, out, attrs: [
            g.graph.apply("adaptive_avg_pool2d", [g], output_size=attrs["output_size"])
        ],
        normalize=_adaptive_normalize,
        doc="dx of adaptive_avg_pool2d (its adjoint)",
    )
)
