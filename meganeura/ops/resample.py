"""Resampling of NCHW tensors: nearest and bilinear upsampling, pixel (un)shuffle.

Source coordinates are computed exactly as PyTorch's CPU kernels compute them, in float32:
`scale` is 1/scale_factor when a scale factor was given, else in/out (align_corners=True
uses (in-1)/(out-1)). Nearest upsampling and pixel (un)shuffle are views, index maps fused
into whatever reads them; bilinear upsampling and every gradient lower to the "window"
archetype, each gradient gathering the outputs that read an input pixel (no atomics).
"""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import TensorType
from meganeura.ops import OpDef, register
from meganeura.ops.conv import FLOATS, spatial_tuple

# -- source coordinates, shared with the WGSL generator -------------------------------------------


def nearest_source(in_size: int, out_size: int, scale: float) -> np.ndarray:
    """Input row of each output row (torch's nearest_idx)."""
    o = np.arange(out_size)
    if out_size == in_size:
        return o
    if out_size == 2 * in_size:
        return o >> 1
    src = np.floor(o.astype(np.float32) * np.float32(scale)).astype(np.int64)
    return np.minimum(src, in_size - 1)


def linear_taps(in_size: int, out_size: int, scale: float, align_corners: bool):
    """(i0, i1, l0, l1) per output row: it reads l0 * x[i0] + l1 * x[i1]."""
    o = np.arange(out_size, dtype=np.float32)
    s = np.float32(scale)
    src = s * o if align_corners else np.maximum(s * (o + np.float32(0.5)) - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    l1 = np.clip(src - i0, 0, 1).astype(np.float32)
    return i0, i0 + (i0 < in_size - 1), np.float32(1) - l1, l1


def _matrix(in_size: int, out_size: int, attrs, axis: int, bilinear: bool) -> np.ndarray:
    """[out, in]: the weights each output row gives each input row along one axis."""
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    scale = attrs["scale"][axis]
    if bilinear:
        i0, i1, l0, l1 = linear_taps(in_size, out_size, scale, attrs["align_corners"])
        np.add.at(m, (rows, i0), l0)
        np.add.at(m, (rows, i1), l1)
    else:
        m[rows, nearest_source(in_size, out_size, scale)] = 1.0
    return m


def _separable(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return rows @ (x.astype(np.float64) @ cols.T)


# -- nearest and bilinear upsampling ---------------------------------------------------------------


def _normalize_resample(op: str, bilinear: bool):
    def normalize(types, attrs):
        size = spatial_tuple(op, "size", attrs["size"], 2, 1)
        scale = tuple(float(s) for s in attrs["scale"])
        if len(scale) != 2 or not all(math.isfinite(s) and s >= 0 for s in scale):
            raise ValueError(f"{op}: scale must be 2 finite numbers >= 0, got {attrs['scale']!r}")
        out = {"size": size, "scale": tuple(float(np.float32(s)) for s in scale)}
        if bilinear:
            out["align_corners"] = bool(attrs.get("align_corners", False))
        if "input_size" in attrs:
            out["input_size"] = tuple(int(n) for n in attrs["input_size"])
        return out

    return normalize


def _check_input(op: str, x: TensorType) -> None:
    if x.ndim != 4:
        raise ValueError(f"{op}: input must be 4-D (N, C, H, W), got {x}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{op}: input must be f32 or f16, got {x}")


def _resample_infer(op: str):
    def infer(types, attrs):
        _check_input(op, types[0])
        return TensorType((*types[0].shape[:2], *attrs["size"]), types[0].dtype)

    return infer


def _resample_grad_infer(op: str):
    def infer(types, attrs):
        g = types[0]
        _check_input(op, g)
        if tuple(g.shape[2:]) != attrs["size"]:
            raise ValueError(f"{op}: gradient {g} must have spatial size {list(attrs['size'])}")
        return TensorType((*g.shape[:2], *attrs["input_size"]), g.dtype)

    return infer


def _forward_attrs(attrs) -> dict:
    return {k: v for k, v in attrs.items() if k != "input_size"}


def _nearest_ref(arrays, attrs):
    x = arrays[0]
    (h, w), (ho, wo) = x.shape[2:], attrs["size"]
    iy = nearest_source(h, ho, attrs["scale"][0])
    ix = nearest_source(w, wo, attrs["scale"][1])
    return x[:, :, iy[:, None], ix[None, :]]


def _resample_grad_ref(bilinear: bool):
    def run(arrays, attrs):
        g = arrays[0]
        (h, w), (ho, wo) = attrs["input_size"], attrs["size"]
        rows = _matrix(h, ho, attrs, 0, bilinear)
        cols = _matrix(w, wo, attrs, 1, bilinear)
        return _separable(g, rows.T, cols.T).astype(g.dtype)

    return run


def _bilinear_ref(arrays, attrs):
    x = arrays[0]
    (h, w), (ho, wo) = x.shape[2:], attrs["size"]
    rows, cols = _matrix(h, ho, attrs, 0, True), _matrix(w, wo, attrs, 1, True)
    return _separable(x, rows, cols).astype(x.dtype)


def _vjp_to(op: str):
    def vjp(g, inputs, out, attrs):
        return [g.graph.apply(op, [g], input_size=inputs[0].shape[2:], **attrs)]

    return vjp


def _adjoint_vjp(op: str):
    def vjp(g, inputs, out, attrs):
        return [g.graph.apply(op, [g], **_forward_attrs(attrs))]

    return vjp


register(
    OpDef(
        "upsample_nearest2d",
        "view",
        _resample_infer("upsample_nearest2d"),
        _nearest_ref,
        _vjp_to("upsample_nearest2d_grad"),
        normalize=_normalize_resample("upsample_nearest2d", False),
        doc="nearest-neighbour resampling to `size` (a view: an index map)",
    )
)
register(
    OpDef(
        "upsample_nearest2d_grad",
        "window",
        _resample_grad_infer("upsample_nearest2d_grad"),
        _resample_grad_ref(False),
        _adjoint_vjp("upsample_nearest2d"),
        normalize=_normalize_resample("upsample_nearest2d_grad", False),
        doc="dx of upsample_nearest2d: the sum of the outputs each input pixel fed",
    )
)
register(
    OpDef(
        "upsample_bilinear2d",
        "window",
        _resample_infer("upsample_bilinear2d"),
        _bilinear_ref,
        _vjp_to("upsample_bilinear2d_grad"),
        normalize=_normalize_resample("upsample_bilinear2d", True),
        doc="bilinear resampling to `size`, align_corners as in torch",
    )
)
register(
    OpDef(
        "upsample_bilinear2d_grad",
        "window",
        _resample_grad_infer("upsample_bilinear2d_grad"),
        _resample_grad_ref(True),
        _adjoint_vjp("upsample_bilinear2d"),
        normalize=_normalize_resample("upsample_bilinear2d_grad", True),
        doc="dx of upsample_bilinear2d (its adjoint)",
    )
)


# -- pixel shuffle --------------------------------------------------------------------------------


def _factor(op: str, attrs) -> dict:
    r = attrs["factor"]
    if not isinstance(r, (int, np.integer)) or r < 1:
        raise ValueError(f"{op}: the factor must be a positive int, got {r!r}")
    return {"factor": int(r)}


def _shuffle_infer(types, attrs):
    x, r = types[0], attrs["factor"]
    if x.ndim < 3 or x.shape[-3] % (r * r):
        raise ValueError(
            f"pixel_shuffle: input must be [..., C * {r * r}, H, W] (channels divisible by "
            f"upscale_factor**2 = {r * r}), got {x}"
        )
    *lead, c, h, w = x.shape
    return TensorType((*lead, c // (r * r), h * r, w * r), x.dtype)


def _unshuffle_infer(types, attrs):
    x, r = types[0], attrs["factor"]
    if x.ndim < 3 or x.shape[-2] % r or x.shape[-1] % r:
        raise ValueError(
            f"pixel_unshuffle: input must be [..., C, H, W] with H and W divisible by "
            f"downscale_factor = {r}, got {x}"
        )
    *lead, c, h, w = x.shape
    return TensorType((*lead, c * r * r, h // r, w // r), x.dtype)


def _shuffle_ref(arrays, attrs):
    x, r = arrays[0], attrs["factor"]
    *lead, c, h, w = x.shape
    y = x.reshape(-1, c // (r * r), r, r, h, w).transpose(0, 1, 4, 2, 5, 3)
    return np.ascontiguousarray(y).reshape(*lead, c // (r * r), h * r, w * r)


def _unshuffle_ref(arrays, attrs):
    x, r = arrays[0], attrs["factor"]
    *lead, c, h, w = x.shape
    y = x.reshape(-1, c, h // r, r, w // r, r).transpose(0, 1, 3, 5, 2, 4)
    return np.ascontiguousarray(y).reshape(*lead, c * r * r, h // r, w // r)


register(
    OpDef(
        "pixel_shuffle",
        "view",
        _shuffle_infer,
        _shuffle_ref,
        lambda g, inputs, out, attrs: [g.graph.apply("pixel_unshuffle", [g], **attrs)],
        normalize=lambda types, attrs: _factor("pixel_shuffle", attrs),
        doc="[..., C*r*r, H, W] -> [..., C, H*r, W*r] (depth to space)",
    )
)
register(
    OpDef(
        "pixel_unshuffle",
        "view",
        _unshuffle_infer,
        _unshuffle_ref,
        lambda g, inputs, out, attrs: [g.graph.apply("pixel_shuffle", [g], **attrs)],
        normalize=lambda types, attrs: _factor("pixel_unshuffle", attrs),
        doc="[..., C, H*r, W*r] -> [..., C*r*r, H, W] (space to depth)",
    )
)
