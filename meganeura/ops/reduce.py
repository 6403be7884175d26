"""Reductions over any set of axes, with keepdims."""

from __future__ import annotations

import numpy as np

from meganeura.graph import TensorType, normalize_axis
from meganeura.ops import OpDef, register


def _normalize(op):
    def normalize(types, attrs):
        x = types[0]
        axes = attrs.get("axes")
        if axes is None:
            axes = tuple(range(x.ndim))
        elif isinstance(axes, int):
            axes = (axes,)
        axes = tuple(sorted({normalize_axis(a, x.ndim, op) for a in axes}))
        return {"axes": axes, "keepdims": bool(attrs.get("keepdims", False))}

    return normalize


def reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool) -> tuple[int, ...]:
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _infer(op):
    def infer(types, attrs):
        x = types[0]
        if op != "max" and x.dtype == "bool":
            raise TypeError(f"{op}: cannot reduce a bool tensor; use .astype('f32') first")
        return TensorType(reduced_shape(x.shape, attrs["axes"], attrs["keepdims"]), x.dtype)

    return infer


def _expand_back(g, x_shape, axes):
    """Broadcast a reduced gradient back to the input shape."""
    return g.reshape(reduced_shape(x_shape, axes, True)).broadcast_to(x_shape)


def _sum_vjp(g, x, out, attrs):
    return [_expand_back(g, x[0].shape, attrs["axes"])]


def _mean_vjp(g, x, out, attrs):
    count = int(np.prod([x[0].shape[a] for a in attrs["axes"]]))
    return [_expand_back(g * (1.0 / count), x[0].shape, attrs["axes"])]


def _max_vjp(g, x, out, attrs):
    # Ties share the gradient evenly, as torch.amax does.
    from meganeura.ops.elementwise import where

    axes = attrs["axes"]
    keep = reduced_shape(x[0].shape, axes, True)
    hit = x[0].eq(out.reshape(keep).broadcast_to(x[0].shape))
    mask = where(hit, 1.0, 0.0)
    count = mask.sum(axes, keepdims=True)
    return [mask * (g.reshape(keep) / count)]


def _reference(fn):
    def run(arrays, attrs):
        x = arrays[0]
        out = fn(x, axis=attrs["axes"], keepdims=attrs["keepdims"])
        return np.asarray(out, dtype=x.dtype)

    return run


def _float_mean(x, axis, keepdims):
    return np.mean(
        x, axis=axis, keepdims=keepdims, dtype=np.float64 if x.dtype.kind == "f" else None
    )


def _float_sum(x, axis, keepdims):
    return np.sum(
        x, axis=axis, keepdims=keepdims, dtype=np.float64 if x.dtype.kind == "f" else None
    )


for _name, _fn, _vjp in (
    ("sum", _float_sum, _sum_vjp),
    ("mean", _float_mean, _mean_vjp),
    ("max", np.max, _max_vjp),
):
    register(
        OpDef(_name, "reduce", _infer(_name), _reference(_fn), _vjp, normalize=_normalize(_name))
    )


def sum_to(g, shape: tuple[int, ...]):
    """Sum a broadcast gradient back down to `shape` (the inverse of broadcasting)."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    # Leading axes of size 1 (a batch of one) need no sum: the reshape drops them.
    axes = [i for i in range(lead) if g.shape[i] != 1]
    axes += [lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1]
    out = g.sum(tuple(axes), keepdims=True) if axes else g
    return out.reshape(tuple(shape))
