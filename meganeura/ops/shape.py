"""Shape ops. All are views: an index map folded into whatever kernel reads them."""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import TensorType, normalize_axis
from meganeura.ops import OpDef, register
from meganeura.ops.reduce import sum_to


def _reshape_normalize(types, attrs):
    x = types[0]
    shape = [int(d) for d in attrs["shape"]]
    if shape.count(-1) > 1:
        raise ValueError(f"reshape: at most one -1 allowed, got {shape}")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or x.size % known:
            raise ValueError(f"reshape: cannot reshape {x} into {shape}")
        shape[shape.index(-1)] = x.size // known
    if math.prod(shape) != x.size or any(d <= 0 for d in shape):
        raise ValueError(
            f"reshape: cannot reshape {x} ({x.size} elements) into {shape} "
            f"({math.prod(shape)} elements)"
        )
    return {"shape": tuple(shape)}


register(
    OpDef(
        "reshape",
        "view",
        lambda types, attrs: TensorType(attrs["shape"], types[0].dtype),
        lambda arrays, attrs: arrays[0].reshape(attrs["shape"]),
        lambda g, x, out, attrs: [g.reshape(x[0].shape)],
        normalize=_reshape_normalize,
    )
)


def _permute_normalize(types, attrs):
    x = types[0]
    axes = tuple(normalize_axis(a, x.ndim, "permute") for a in attrs["axes"])
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(
            f"permute: axes {list(attrs['axes'])} are not a permutation of {x.ndim} dims of {x}"
        )
    return {"axes": axes}


register(
    OpDef(
        "permute",
        "view",
        lambda types, attrs: TensorType(
            tuple(types[0].shape[a] for a in attrs["axes"]), types[0].dtype
        ),
        lambda arrays, attrs: np.asarray(np.transpose(arrays[0], attrs["axes"]), order="C"),
        lambda g, x, out, attrs: [g.permute(tuple(np.argsort(attrs["axes"])))],
        normalize=_permute_normalize,
    )
)


def _broadcast_infer(types, attrs):
    x, shape = types[0], tuple(int(d) for d in attrs["shape"])
    try:
        if np.broadcast_shapes(x.shape, shape) != shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"broadcast_to: cannot broadcast {x} to {list(shape)}") from None
    return TensorType(shape, x.dtype)


register(
    OpDef(
        "broadcast_to",
        "view",
        _broadcast_infer,
        lambda arrays, attrs: np.asarray(np.broadcast_to(arrays[0], attrs["shape"]), order="C"),
        lambda g, x, out, attrs: [sum_to(g, x[0].shape)],
        normalize=lambda types, attrs: {"shape": tuple(int(d) for d in attrs["shape"])},
    )
)
