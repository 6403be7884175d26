"""argmax: the index of the largest value along an axis (int32), as torch.argmax.

Ties take the first index; a NaN counts as larger than any number (the first NaN wins), as
in torch and NumPy. Not differentiable: its gradient is None, like an integer tensor's.
Language models take the next token of greedy decoding with it on the device.
"""

from __future__ import annotations

import numpy as np

from meganeura.graph import TensorType, normalize_axis
from meganeura.ops import OpDef, register


def _normalize(types, attrs):
    return {"axis": normalize_axis(attrs.get("axis", -1), types[0].ndim, "argmax")}


def _infer(types, attrs):
    x = types[0]
    if x.dtype not in ("f32", "f16"):
        raise TypeError(f"argmax: needs a float tensor, got {x}")
    shape = x.shape[: attrs["axis"]] + x.shape[attrs["axis"] + 1 :]
    return TensorType(shape, "i32")


def _reference(arrays, attrs):
    return np.argmax(arrays[0], axis=attrs["axis"]).astype(np.int32)


register(
    OpDef(
        "argmax",
        "argmax",
        _infer,
        _reference,
        lambda g, x, out, attrs: [None],
        normalize=_normalize,
        doc="index of the largest value along an axis (first on ties, NaN largest); int32",
    )
)
