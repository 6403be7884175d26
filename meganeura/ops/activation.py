"""Pointwise functions beyond arithmetic: SiLU and SwiGLU, softplus, clamp, sin, cos and erf.

Like every pointwise op they are fused into the kernels that read them. The transcendental
ones compute in f32 (f16 inputs are widened) through helpers of the WGSL prelude.
"""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import TensorType, broadcast_shapes
from meganeura.ops import OpDef, register
from meganeura.ops.elementwise import FLOATS, _arith, _f, _same_dtype, where
from meganeura.ops.reduce import sum_to

TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _in_f32(fn_of_x: str, arg: str, dtype: str) -> str:
    """`fn_of_x` (a template in `{x}`) applied to `arg`, computed in f32."""
    if dtype == "f16":
        return f"f16({fn_of_x.format(x=f'f32({arg})')})"
    return fn_of_x.format(x=arg)


def _unary(name, reference, wgsl_of_x, vjp, doc):
    register(
        OpDef(
            name,
            "pointwise",
            _arith(name, FLOATS),
            _f(reference),
            vjp,
            wgsl=lambda a, t, o, at: _in_f32(wgsl_of_x, a[0], o.dtype),
            doc=doc,
        )
    )


def _silu_ref(a):
    a64 = a.astype(np.float64)
    return a64 / (1.0 + np.exp(-a64))


def silu_grad(x):
    """d silu(x) / dx = s (1 + x (1 - s)) with s = sigmoid(x), as pointwise ops."""
    s = x.sigmoid()
    return s * (1.0 + x * (1.0 - s))


_unary(
    "silu",
    _silu_ref,
    "({x} / (1.0 + exp(-{x})))",
    lambda g, x, out, at: [g * silu_grad(x[0])],
    "x * sigmoid(x)",
)
_unary(
    "sin",
    np.sin,
    "sin(mn_wrap_angle({x}))",
    lambda g, x, out, at: [g * x[0].cos()],
    "sine, accurate for large arguments",
)
_unary(
    "cos",
    np.cos,
    "cos(mn_wrap_angle({x}))",
    lambda g, x, out, at: [-g * x[0].sin()],
    "cosine, accurate for large arguments",
)


def _erf_ref(a):
    from meganeura.ops.elementwise import erf

    return erf(a)


_unary(
    "erf",
    _erf_ref,
    "mn_erf({x})",
    lambda g, x, out, at: [g * (-(x[0] * x[0])).exp() * TWO_OVER_SQRT_PI],
    "the error function",
)


# -- swiglu -----------------------------------------------------------------------------------


def _swiglu_infer(types, attrs):
    dtype = _same_dtype("swiglu", types)
    if dtype not in FLOATS:
        raise TypeError(f"swiglu: needs float gate and up tensors, got {types[0]} and {types[1]}")
    return TensorType(broadcast_shapes("swiglu", *types), dtype)


def _swiglu_wgsl(args, types, out, attrs):
    gate, up = args
    if out.dtype == "f16":
        return f"f16(f32({gate}) / (1.0 + exp(-f32({gate})))) * {up}"
    return f"({gate} / (1.0 + exp(-{gate})) * {up})"


def _swiglu_vjp(g, x, out, attrs):
    gate, up = x
    return [sum_to(g * up * silu_grad(gate), gate.shape), sum_to(g * gate.silu(), up.shape)]


register(
    OpDef(
        "swiglu",
        "pointwise",
        _swiglu_infer,
        lambda arrays, attrs: np.asarray(
            _silu_ref(arrays[0]) * arrays[1].astype(np.float64), arrays[0].dtype
        ),
        _swiglu_vjp,
        wgsl=_swiglu_wgsl,
        doc="silu(gate) * up, the gated MLP activation of Llama-style models",
    )
)


# -- softplus ----------------------------------------------------------------------------------


def _softplus_normalize(types, attrs):
    beta, threshold = attrs.get("beta", 1.0), attrs.get("threshold", 20.0)
    for name, value in (("beta", beta), ("threshold", threshold)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"softplus: {name} must be a finite number, got {value!r}")
    if beta == 0:
        raise ValueError("softplus: beta must not be 0 (the function divides by beta)")
    return {"beta": float(beta), "threshold": float(threshold)}


def _softplus_ref(arrays, attrs):
    x = arrays[0].astype(np.float64)
    bx = x * attrs["beta"]
    soft = (np.maximum(bx, 0.0) + np.log1p(np.exp(-np.abs(bx)))) / attrs["beta"]
    return np.where(bx > attrs["threshold"], x, soft).astype(arrays[0].dtype)


def _softplus_wgsl(args, types, out, attrs):
    beta, threshold = attrs["beta"], attrs["threshold"]
    x = f"f32({args[0]})" if out.dtype == "f16" else args[0]
    bx = f"({x} * {beta!r})"
    soft = f"((max({bx}, 0.0) + mn_log1p(exp(-abs({bx})))) / {beta!r})"
    expr = f"select({soft}, {x}, {bx} > {threshold!r})"
    return f"f16({expr})" if out.dtype == "f16" else expr


def _softplus_vjp(g, x, out, attrs):
    bx = x[0] * attrs["beta"]
    return [where(bx > attrs["threshold"], g, g * bx.sigmoid())]


register(
    OpDef(
        "softplus",
        "pointwise",
        _arith("softplus", FLOATS),
        _softplus_ref,
        _softplus_vjp,
        normalize=_softplus_normalize,
        wgsl=_softplus_wgsl,
        doc="log(1 + exp(beta x)) / beta, linear where beta x > threshold (as in PyTorch)",
    )
)


# -- clamp --------------------------------------------------------------------------------------


def _clamp_normalize(types, attrs):
    x = types[0]
    lo, hi = attrs.get("min"), attrs.get("max")
    if lo is None and hi is None:
        raise ValueError(f"clamp: at least one of min and max must be given (input {x})")
    out = {}
    for name, value in (("min", lo), ("max", hi)):
        if value is None:
            out[name] = None
            continue
        if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
            raise TypeError(f"clamp: {name} must be a number or None, got {value!r}")
        if x.dtype in ("i32", "u32"):
            if float(value) != int(value):
                raise ValueError(f"clamp: {name}={value!r} is not an integer; {x} is integer")
            out[name] = int(value)
        else:
            out[name] = float(value)
    return out


def _clamp_ref(arrays, attrs):
    x = arrays[0]
    if attrs["min"] is not None:
        x = np.maximum(x, np.asarray(attrs["min"]).astype(x.dtype))
    if attrs["max"] is not None:
        x = np.minimum(x, np.asarray(attrs["max"]).astype(x.dtype))
    return x


def _clamp_wgsl(args, types, out, attrs):
    from meganeura.backends.wgsl.emit import literal

    expr = args[0]
    if attrs["min"] is not None:
        expr = f"max({expr}, {literal(attrs['min'], out.dtype)})"
    if attrs["max"] is not None:
        expr = f"min({expr}, {literal(attrs['max'], out.dtype)})"
    return expr


def _clamp_vjp(g, x, out, attrs):
    # As in PyTorch, the gradient passes where min <= x <= max (so nowhere when min > max).
    inside = g
    if attrs["max"] is not None:
        inside = where(x[0] <= attrs["max"], inside, 0.0)
    if attrs["min"] is not None:
        inside = where(x[0] >= attrs["min"], inside, 0.0)
    return [inside]


register(
    OpDef(
        "clamp",
        "pointwise",
        _arith("clamp", ("f32", "f16", "i32", "u32")),
        _clamp_ref,
        _clamp_vjp,
        normalize=_clamp_normalize,
        wgsl=_clamp_wgsl,
        doc="min(max(x, min), max); either bound may be None",
    )
)
