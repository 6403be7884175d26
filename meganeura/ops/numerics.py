"""Numeric checks: `isfinite`, used by loss scaling to detect overflowing gradients."""

from __future__ import annotations

import numpy as np

from meganeura.graph import TensorType
from meganeura.ops import OpDef, register


def _isfinite_infer(types, attrs):
    if types[0].dtype not in ("f32", "f16"):
        raise TypeError(f"isfinite: needs a float tensor, got {types[0]}")
    return TensorType(types[0].shape, "bool")


# WGSL lets compilers assume that no value is inf or NaN, so a float comparison could be
# folded away; the exponent bits of the f32 value cannot.
register(
    OpDef(
        "isfinite",
        "pointwise",
        _isfinite_infer,
        lambda arrays, attrs: np.isfinite(arrays[0]),
        lambda g, x, out, attrs: [None],
        wgsl=lambda args, types, out, attrs: (
            f"((bitcast<u32>(f32({args[0]})) & 0x7f800000u) != 0x7f800000u)"
        ),
        doc="true where the value is neither inf nor NaN",
    )
)
