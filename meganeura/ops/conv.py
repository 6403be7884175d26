"""Convolutions over NCHW tensors: conv2d, conv_transpose2d and conv2d_weight_grad.

The three are one computation seen from its three operands: with x the conv's input, w its
weight [O, C/groups, kh, kw] and y its output,

    y[n, g*Og + o, oy, ox] = sum over c, ky, kx of
        x[n, g*Cg + c, oy*sh + ky*dh - pt, ox*sw + kx*dw - pl] * w[g*Og + o, c, ky, kx]

with zeros read outside x. conv2d computes y from (x, w); conv_transpose2d computes x from
(y, w), the adjoint; conv2d_weight_grad computes w from (x, y). Each VJP is another of the
three, so the backward pass never builds an im2col matrix, and each lowers to the implicit
GEMM archetype (meganeura/backends/wgsl/conv.py). The weight gradient reduces over every
output pixel of the batch; with `splits` it returns one partial sum per batch chunk, which
gives a GPU enough workgroups (the VJP sums them).

Padding is held as (begin, end) pairs per spatial dim. An end may be negative: the input's
last rows are then never read, which is how a gradient whose input size leaves a remainder
over the stride is expressed. conv1d is conv2d over a height of 1 (see meganeura.functional).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from meganeura.graph import Tensor, TensorType
from meganeura.ops import OpDef, register

FLOATS = ("f32", "f16")


# -- arguments ------------------------------------------------------------------------------


def spatial_tuple(op: str, name: str, value, ndim: int, minimum: int) -> tuple[int, ...]:
    """An int or a tuple of `ndim` ints, each >= minimum, as a tuple; else a ValueError."""
    items = (value,) * ndim if isinstance(value, (int, np.integer)) else tuple(value)
    if len(items) != ndim or not all(isinstance(v, (int, np.integer)) for v in items):
        raise ValueError(f"{op}: {name} must be an int or a tuple of {ndim} ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in items)


def padding_pairs(op: str, padding, kernel: Sequence[int], stride, dilation):
    """Padding as ((begin, end), ...) per spatial dim from an int, a tuple of ints (one per
    dim, both sides), a tuple of (begin, end) pairs, "valid" or "same" (as torch: stride 1;
    an odd total puts the extra row at the end)."""
    ndim = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * ndim
        if padding != "same":
            raise ValueError(f"{op}: padding string must be 'valid' or 'same', got {padding!r}")
        if any(s != 1 for s in stride):
            raise ValueError(f"{op}: padding='same' needs stride 1, got stride {tuple(stride)}")
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return tuple((t // 2, t - t // 2) for t in totals)
    if isinstance(padding, (int, np.integer)) or all(
        isinstance(p, (int, np.integer)) for p in padding
    ):
        flat = spatial_tuple(op, "padding", padding, ndim, 0)
        return tuple((p, p) for p in flat)
    pairs = tuple(tuple(p) for p in padding)
    if len(pairs) != ndim or any(len(p) != 2 for p in pairs):
        raise ValueError(
            f"{op}: padding must be an int, {ndim} ints or {ndim} (begin, end) pairs, "
            f"got {padding!r}"
        )
    if any(p[0] < 0 for p in pairs):
        raise ValueError(f"{op}: padding must not start below 0, got {padding!r}")
    return tuple((int(b), int(e)) for b, e in pairs)


def conv_out_size(size: int, kernel: int, stride: int, pad: tuple[int, int], dilation: int):
    return (size + pad[0] + pad[1] - dilation * (kernel - 1) - 1) // stride + 1


def end_pad(in_size: int, out_size: int, kernel: int, stride: int, begin: int, dilation: int):
    """The end padding that makes a conv over `in_size` rows give exactly `out_size` rows."""
    return (out_size - 1) * stride + dilation * (kernel - 1) + 1 - begin - in_size


def conv_attrs(op: str, kernel: Sequence[int], attrs: dict) -> dict:
    """stride, padding (pairs), dilation and groups checked and normalized for len(kernel)
    spatial dims."""
    nd = len(kernel)
    stride = spatial_tuple(op, "stride", attrs.get("stride", 1), nd, 1)
    dilation = spatial_tuple(op, "dilation", attrs.get("dilation", 1), nd, 1)
    groups = attrs.get("groups", 1)
    if not isinstance(groups, (int, np.integer)) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    return {
        "stride": stride,
        "padding": padding_pairs(op, attrs.get("padding", 0), kernel, stride, dilation),
        "dilation": dilation,
        "groups": int(groups),
    }


def _normalize_conv(op: str):
    def normalize(types, attrs):
        if op == "conv2d_weight_grad":
            kernel = spatial_tuple(op, "kernel_size", attrs["kernel_size"], 2, 1)
            splits = attrs.get("splits", 1)
            if not isinstance(splits, (int, np.integer)) or splits < 1:
                raise ValueError(f"{op}: splits must be a positive int, got {splits!r}")
            return {**conv_attrs(op, kernel, attrs), "kernel_size": kernel, "splits": int(splits)}
        weight = types[1]
        return conv_attrs(op, weight.shape[2:] if weight.ndim == 4 else (1, 1), attrs)

    return normalize


def _check_operands(op: str, types, names=("input", "weight")) -> None:
    for t, name in zip(types, names, strict=True):
        if t.ndim != 4:
            raise ValueError(f"{op}: {name} must be 4-D (N, C, H, W), got {t}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{op}: {name} must be f32 or f16, got {t}")
    if types[0].dtype != types[1].dtype:
        raise TypeError(f"{op}: {names[0]} is {types[0]} but {names[1]} is {types[1]}")


def _divides(op: str, what: str, count: int, groups: int) -> int:
    if count % groups:
        raise ValueError(f"{op}: {what} ({count}) must be divisible by groups ({groups})")
    return count // groups


def conv_output_shape(op: str, in_hw, kernel, attrs) -> tuple[int, ...]:
    """Output spatial size, or a ValueError when the kernel overhangs the padded input."""
    out = tuple(
        conv_out_size(n, k, s, p, d)
        for n, k, s, p, d in zip(
            in_hw, kernel, attrs["stride"], attrs["padding"], attrs["dilation"], strict=True
        )
    )
    if min(out) < 1:
        extent = [d * (k - 1) + 1 for k, d in zip(kernel, attrs["dilation"], strict=True)]
        padded = [n + p[0] + p[1] for n, p in zip(in_hw, attrs["padding"], strict=True)]
        raise ValueError(
            f"{op}: the kernel {list(kernel)} (dilation {list(attrs['dilation'])}, extent "
            f"{extent}) is larger than the padded input {padded} (input {list(in_hw)}, padding "
            f"{[list(p) for p in attrs['padding']]}); use a smaller kernel or more padding"
        )
    return out


def conv_shape(op: str, x: Sequence[int], w: Sequence[int], attrs) -> tuple[int, ...]:
    """The output shape of a conv of input shape x [N, C, *spatial] with weight shape w, or a
    ValueError naming `op` and what would be valid."""
    groups = attrs["groups"]
    cg = _divides(op, "input channels", x[1], groups)
    _divides(op, "output channels (weight.shape[0])", w[0], groups)
    if w[1] != cg:
        spatial = ", ".join(f"k{i}" for i in range(len(w) - 2))
        raise ValueError(
            f"{op}: weight {list(w)} must have shape [out_channels, in_channels / groups = "
            f"{cg}, {spatial}] for input {list(x)} with groups={groups}"
        )
    return (x[0], w[0], *conv_output_shape(op, x[2:], w[2:], attrs))


def _conv2d_infer(types, attrs):
    _check_operands("conv2d", types)
    return TensorType(conv_shape("conv2d", types[0].shape, types[1].shape, attrs), types[0].dtype)


def _conv_transpose2d_infer(types, attrs):
    x, w = types
    _check_operands("conv_transpose2d", types)
    groups = attrs["groups"]
    if w.shape[0] != x.shape[1]:
        raise ValueError(
            f"conv_transpose2d: weight {list(w.shape)} must have shape [in_channels = "
            f"{x.shape[1]}, out_channels / groups, kh, kw] for input {list(x.shape)}"
        )
    _divides("conv_transpose2d", "input channels", x.shape[1], groups)
    size = []
    for n, k, s, p, d in zip(
        x.shape[2:], w.shape[2:], attrs["stride"], attrs["padding"], attrs["dilation"], strict=True
    ):
        size.append((n - 1) * s + d * (k - 1) + 1 - p[0] - p[1])
    if min(size) < 1:
        raise ValueError(
            f"conv_transpose2d: output size {size} is not positive (input {list(x.shape)}, "
            f"kernel {list(w.shape[2:])}, padding {[list(p) for p in attrs['padding']]}); "
            "use less padding"
        )
    return TensorType((x.shape[0], w.shape[1] * groups, *size), x.dtype)


def _weight_grad_infer(types, attrs):
    x, g = types
    op = "conv2d_weight_grad"
    _check_operands(op, types, ("input", "output gradient"))
    groups = attrs["groups"]
    cg = _divides(op, "input channels", x.shape[1], groups)
    _divides(op, "output channels", g.shape[1], groups)
    out_hw = conv_output_shape(op, x.shape[2:], attrs["kernel_size"], attrs)
    if x.shape[0] != g.shape[0] or tuple(g.shape[2:]) != out_hw:
        raise ValueError(
            f"{op}: output gradient {list(g.shape)} must be [{x.shape[0]}, out_channels, "
            f"{out_hw[0]}, {out_hw[1]}] for input {list(x.shape)}"
        )
    splits = attrs["splits"]
    if x.shape[0] % splits:
        raise ValueError(f"{op}: the batch ({x.shape[0]}) must be divisible by splits ({splits})")
    shape = (g.shape[1], cg, *attrs["kernel_size"])
    return TensorType(shape if splits == 1 else (splits, *shape), x.dtype)


# -- NumPy references -------------------------------------------------------------------------


def window_source(x: np.ndarray, begins, extents, fill=0.0) -> np.ndarray:
    """x's last len(begins) axes re-indexed so position j holds x[j - begin], `fill` outside,
    for j in [0, extent): padding and cropping in one step."""
    lead = x.ndim - len(begins)
    pads, crops = [(0, 0)] * lead, [slice(None)] * lead
    for n, begin, extent in zip(x.shape[lead:], begins, extents, strict=True):
        pads.append((max(begin, 0), max(extent - n - begin, 0)))
        crops.append(slice(max(-begin, 0), max(-begin, 0) + extent))
    return np.pad(x, pads, constant_values=fill)[tuple(crops)]


def windows(x: np.ndarray, kernel, stride, padding, dilation, out_hw, fill=0.0) -> np.ndarray:
    """[..., Ho, Wo, kh, kw] view of x's conv windows (last two axes spatial), `fill` outside."""
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilation, strict=True)]
    extents = [(o - 1) * s + span for o, s, span in zip(out_hw, stride, spans, strict=True)]
    source = window_source(x, [p[0] for p in padding], extents, fill)
    view = sliding_window_view(source, spans, axis=(-2, -1))
    (sh, sw), (dh, dw) = stride, dilation
    return view[..., ::sh, ::sw, ::dh, ::dw]


def scatter_windows(cols: np.ndarray, in_hw, stride, padding, dilation) -> np.ndarray:
    """The adjoint of `windows`: sum cols[..., oy, ox, ky, kx] into [..., H, W] at the
    positions those windows read."""
    *lead, ho, wo, kh, kw = cols.shape
    (sh, sw), (dh, dw) = stride, dilation
    full = np.zeros((*lead, (ho - 1) * sh + dh * (kh - 1) + 1, (wo - 1) * sw + dw * (kw - 1) + 1))
    for ky in range(kh):
        rows = slice(ky * dh, ky * dh + (ho - 1) * sh + 1, sh)
        for kx in range(kw):
            full[..., rows, kx * dw : kx * dw + (wo - 1) * sw + 1 : sw] += cols[..., ky, kx]
    return window_source(full, [-padding[0][0], -padding[1][0]], in_hw)


def _group_rows(a: np.ndarray, groups: int) -> np.ndarray:
    """[N, G*Cg, H, W] -> [G, N*H*W, Cg]: each group's channels as the columns of a matrix."""
    n, c, h, w = a.shape
    grouped = a.reshape(n, groups, c // groups, h, w).transpose(1, 0, 3, 4, 2)
    return grouped.reshape(groups, -1, c // groups)


def _ungroup_rows(m: np.ndarray, n: int, hw) -> np.ndarray:
    """The inverse of `_group_rows`."""
    groups, _, cg = m.shape
    return m.reshape(groups, n, *hw, cg).transpose(1, 0, 4, 2, 3).reshape(n, groups * cg, *hw)


def _patches(x: np.ndarray, kernel, attrs, out_hw) -> np.ndarray:
    """[G, N*Ho*Wo, Cg*kh*kw]: the input patch of every output pixel, per group."""
    n, c = x.shape[:2]
    g = attrs["groups"]
    win = windows(x, kernel, attrs["stride"], attrs["padding"], attrs["dilation"], out_hw)
    win = win.reshape(n, g, c // g, *out_hw, *kernel)
    return win.transpose(1, 0, 3, 4, 2, 5, 6).reshape(g, n * out_hw[0] * out_hw[1], -1)


def _conv2d_ref(arrays, attrs):
    x, w = arrays
    g = attrs["groups"]
    out_hw = conv_output_shape("conv2d", x.shape[2:], w.shape[2:], attrs)
    cols = _patches(x.astype(np.float32), w.shape[2:], attrs, out_hw)
    weight = w.astype(np.float32).reshape(g, w.shape[0] // g, -1)
    return _ungroup_rows(cols @ weight.transpose(0, 2, 1), x.shape[0], out_hw).astype(x.dtype)


def _conv_transpose2d_ref(arrays, attrs):
    x, w = arrays
    g = attrs["groups"]
    n, kernel = x.shape[0], w.shape[2:]
    out = _conv_transpose2d_infer([TensorType(x.shape), TensorType(w.shape)], attrs).shape
    weight = w.astype(np.float32).reshape(g, w.shape[0] // g, -1)
    cols = _group_rows(x.astype(np.float32), g) @ weight  # [G, N*H*W, Cg*kh*kw]
    cols = cols.reshape(g, n, *x.shape[2:], w.shape[1], *kernel)
    cols = cols.transpose(1, 0, 4, 2, 3, 5, 6).reshape(n, out[1], *x.shape[2:], *kernel)
    return scatter_windows(
        cols, out[2:], attrs["stride"], attrs["padding"], attrs["dilation"]
    ).astype(x.dtype)


def _weight_grad_ref(arrays, attrs):
    x, gy = arrays
    splits, kernel = attrs["splits"], attrs["kernel_size"]
    if splits > 1:  # each batch chunk is a group of its own (see split_batch)
        x, gy = (_split_batch_array(a, splits) for a in (x, gy))
    g = attrs["groups"] * splits
    cols = _patches(x.astype(np.float32), kernel, {**attrs, "groups": g}, gy.shape[2:])
    dw = _group_rows(gy.astype(np.float32), g).transpose(0, 2, 1) @ cols
    shape = (gy.shape[1] // splits, x.shape[1] // g, *kernel)
    return dw.reshape((splits, *shape) if splits > 1 else shape).astype(x.dtype)


def _split_batch_array(a: np.ndarray, splits: int) -> np.ndarray:
    n, c, h, w = a.shape
    return (
        a.reshape(splits, n // splits, c, h, w)
        .transpose(1, 0, 2, 3, 4)
        .reshape(-1, splits * c, h, w)
    )


# -- VJPs -------------------------------------------------------------------------------------


def _geometry(attrs) -> dict:
    return {k: attrs[k] for k in ("stride", "dilation", "groups")}


def _pads_for(in_hw, out_hw, kernel, attrs):
    """Padding that maps `in_hw` rows to exactly `out_hw` rows with the same begins."""
    return tuple(
        (p[0], end_pad(n, o, k, s, p[0], d))
        for n, o, k, s, p, d in zip(
            in_hw, out_hw, kernel, attrs["stride"], attrs["padding"], attrs["dilation"], strict=True
        )
    )


def weight_grad_splits(batch: int, out_pixels: int) -> int:
    """How many batch chunks a weight gradient sums separately: enough that each reduces over
    about 1024 output pixels or more (a GEMM whose K dim is the whole batch's pixels would
    otherwise run on a handful of workgroups), at most 64, and a divisor of the batch."""
    want = min(64, batch * out_pixels // 1024)
    return max((d for d in range(1, batch + 1) if batch % d == 0 and d <= want), default=1)


def weight_grad(x: Tensor, g: Tensor, attrs: dict, kernel) -> Tensor:
    """dL/dw of a conv with input x and output gradient g, the chunks summed."""
    splits = weight_grad_splits(x.shape[0], g.shape[2] * g.shape[3])
    dw = x.graph.apply(
        "conv2d_weight_grad",
        [x, g],
        padding=attrs["padding"],
        kernel_size=kernel,
        splits=splits,
        **_geometry(attrs),
    )
    return dw.sum(0) if splits > 1 else dw


def _conv2d_vjp(g, inputs, out, attrs):
    x, w = inputs
    # dx: the transposed conv of g, padded so that it yields exactly x's height and width.
    pads = _pads_for(x.shape[2:], g.shape[2:], w.shape[2:], attrs)
    dx = x.graph.apply("conv_transpose2d", [g, w], padding=pads, **_geometry(attrs))
    return [dx, weight_grad(x, g, attrs, w.shape[2:])]


def _conv_transpose2d_vjp(g, inputs, out, attrs):
    x, w = inputs
    dx = x.graph.apply("conv2d", [g, w], padding=attrs["padding"], **_geometry(attrs))
    return [dx, weight_grad(g, x, attrs, w.shape[2:])]


def split_batch(t, splits: int):
    """[N, C, H, W] -> [N / splits, splits * C, H, W]: batch chunk s becomes channel block s,
    so a conv with `splits` times the groups treats every chunk separately."""
    n, c, h, w = t.shape
    return (
        t.reshape(splits, n // splits, c, h, w)
        .permute(1, 0, 2, 3, 4)
        .reshape(n // splits, splits * c, h, w)
    )


def merge_batch(t, splits: int):
    """The inverse of split_batch."""
    n, c, h, w = t.shape
    return (
        t.reshape(n, splits, c // splits, h, w)
        .permute(1, 0, 2, 3, 4)
        .reshape(n * splits, c // splits, h, w)
    )


def _weight_grad_vjp(gw, inputs, out, attrs):
    x, gy = inputs
    graph, splits = x.graph, attrs["splits"]
    geometry = {**_geometry(attrs), "groups": attrs["groups"] * splits}
    if splits > 1:
        x, gy = split_batch(x, splits), split_batch(gy, splits)
        gw = gw.reshape(splits * gw.shape[1], *gw.shape[2:])
    pads = _pads_for(x.shape[2:], gy.shape[2:], attrs["kernel_size"], attrs)
    dx = graph.apply("conv_transpose2d", [gy, gw], padding=pads, **geometry)
    dgy = graph.apply("conv2d", [x, gw], padding=attrs["padding"], **geometry)
    if splits > 1:
        dx, dgy = merge_batch(dx, splits), merge_batch(dgy, splits)
    return [dx, dgy]


for _name, _infer, _ref, _vjp, _doc in (
    ("conv2d", _conv2d_infer, _conv2d_ref, _conv2d_vjp, "y = conv(x, w), NCHW"),
    (
        "conv_transpose2d",
        _conv_transpose2d_infer,
        _conv_transpose2d_ref,
        _conv_transpose2d_vjp,
        "the adjoint of conv2d in its input; weight [C_in, C_out / groups, kh, kw]",
    ),
    (
        "conv2d_weight_grad",
        _weight_grad_infer,
        _weight_grad_ref,
        _weight_grad_vjp,
        "the gradient of conv2d in its weight, from the input and the output gradient",
    ),
):
    register(
        OpDef(
            _name,
            "conv",
            _infer,
            _ref,
            _vjp,
            normalize=_normalize_conv(_name),
            strided_inputs=True,
            doc=_doc,
        )
    )
