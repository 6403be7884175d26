"""Elementwise ops: NumPy broadcasting between inputs, one fused kernel per pointwise DAG."""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import TensorType, broadcast_shapes, numpy_dtype
from meganeura.ops import OpDef, register
from meganeura.ops.reduce import sum_to

FLOATS = ("f32", "f16")
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 (Numerical Recipes' erfc, relative error < 1.2e-7); NumPy has none."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.5 * z)
    poly = (
        -z * z
        - 1.26551223
        + t
        * (
            1.00002368
            + t
            * (
                0.37409196
                + t
                * (
                    0.09678418
                    + t
                    * (
                        -0.18628806
                        + t
                        * (
                            0.27886807
                            + t
                            * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))
                        )
                    )
                )
            )
        )
    )
    r = t * np.exp(poly)
    return np.where(x >= 0, 1.0 - r, r - 1.0)


# -- type rules ---------------------------------------------------------------------------


def _same_dtype(op: str, types: list[TensorType]) -> str:
    dtypes = {t.dtype for t in types}
    if len(dtypes) != 1:
        listed = ", ".join(str(t) for t in types)
        raise TypeError(
            f"{op}: inputs must share one dtype, got {listed}; use .astype() to convert"
        )
    return types[0].dtype


def _arith(op: str, allowed=("f32", "f16", "i32", "u32")):
    def infer(types, attrs):
        dtype = _same_dtype(op, types)
        if dtype not in allowed:
            raise TypeError(f"{op}: dtype {dtype} is not supported; valid: {', '.join(allowed)}")
        return TensorType(broadcast_shapes(op, *types), dtype)

    return infer


def _compare(op: str):
    def infer(types, attrs):
        _same_dtype(op, types)
        return TensorType(broadcast_shapes(op, *types), "bool")

    return infer


def _f(reference):
    """Wrap a float reference so it computes in the input dtype and returns that dtype."""

    def run(arrays, attrs):
        out = reference(*arrays)
        return np.asarray(out, dtype=arrays[0].dtype)

    return run


# -- registration helpers -------------------------------------------------------------------


def _unary(name, reference, wgsl, vjp, allowed=FLOATS, doc=""):
    register(
        OpDef(name, "pointwise", _arith(name, allowed), _f(reference), vjp, wgsl=wgsl, doc=doc)
    )


def _binary(name, reference, wgsl, vjp, allowed=("f32", "f16", "i32", "u32"), doc=""):
    register(
        OpDef(name, "pointwise", _arith(name, allowed), _f(reference), vjp, wgsl=wgsl, doc=doc)
    )


def _wgsl_fn(fn: str):
    return lambda args, types, out, attrs: f"{fn}({', '.join(args)})"


def _wgsl_infix(symbol: str):
    return lambda args, types, out, attrs: f"({args[0]} {symbol} {args[1]})"


def _literal(value: float, dtype: str) -> str:
    if dtype == "f16":
        return f"f16({value!r})"
    return f"f32({value!r})"


# -- arithmetic ---------------------------------------------------------------------------


def _int_div(a, b):
    if a.dtype.kind == "f":
        return a / b
    return np.trunc(a / b)


_binary(
    "add",
    np.add,
    _wgsl_infix("+"),
    lambda g, x, out, at: [sum_to(g, x[0].shape), sum_to(g, x[1].shape)],
)
_binary(
    "sub",
    np.subtract,
    _wgsl_infix("-"),
    lambda g, x, out, at: [sum_to(g, x[0].shape), sum_to(-g, x[1].shape)],
)
_binary(
    "mul",
    np.multiply,
    _wgsl_infix("*"),
    lambda g, x, out, at: [sum_to(g * x[1], x[0].shape), sum_to(g * x[0], x[1].shape)],
)
_binary(
    "div",
    _int_div,
    _wgsl_infix("/"),
    lambda g, x, out, at: [sum_to(g / x[1], x[0].shape), sum_to(-g * out / x[1], x[1].shape)],
)


def _pow_vjp(g, x, out, attrs):
    a, b = x
    da = sum_to(g * b * (a ** (b - 1.0)), a.shape)
    db = sum_to(g * out * a.log(), b.shape)
    return [da, db]


def _pow_wgsl(args, types, out, attrs):
    # WGSL's pow is undefined for negative bases; NumPy and torch define integral exponents.
    a, b = args
    magnitude = f"pow(abs({a}), {b})"
    signed = f"select({magnitude}, -{magnitude}, fract({b} * 0.5) != 0.0)"
    return f"select(pow({a}, {b}), {signed}, {a} < 0.0 && {b} == round({b}))"


_binary("pow", np.power, _pow_wgsl, _pow_vjp, allowed=FLOATS)


def _minmax_vjp(pick_first):
    def vjp(g, x, out, attrs):
        a, b = x
        first = pick_first(a, b)
        tie = a.eq(b)
        half = g * 0.5
        ga = where(first, g, where(tie, half, 0.0))
        gb = where(first, 0.0, where(tie, half, g))
        return [sum_to(ga, a.shape), sum_to(gb, b.shape)]

    return vjp


_binary("maximum", np.maximum, _wgsl_fn("max"), _minmax_vjp(lambda a, b: a > b))
_binary("minimum", np.minimum, _wgsl_fn("min"), _minmax_vjp(lambda a, b: a < b))

_unary(
    "neg",
    np.negative,
    lambda a, t, o, at: f"(-{a[0]})",
    lambda g, x, out, at: [-g],
    ("f32", "f16", "i32"),
)
_unary("exp", np.exp, _wgsl_fn("exp"), lambda g, x, out, at: [g * out])
_unary("log", np.log, _wgsl_fn("log"), lambda g, x, out, at: [g / x[0]])
_unary("sqrt", np.sqrt, _wgsl_fn("sqrt"), lambda g, x, out, at: [g * 0.5 / out])
_unary(
    "rsqrt",
    lambda a: 1.0 / np.sqrt(a),
    _wgsl_fn("inverseSqrt"),
    lambda g, x, out, at: [g * -0.5 * out / x[0]],
)
_unary(
    "abs",
    np.abs,
    _wgsl_fn("abs"),
    lambda g, x, out, at: [g * x[0].graph.apply("sign", [x[0]])],
    ("f32", "f16", "i32"),
)
_unary("sign", np.sign, _wgsl_fn("sign"), lambda g, x, out, at: [None], ("f32", "f16", "i32"))


def _relu_ref(a):
    return np.maximum(a, 0)


_unary(
    "relu",
    _relu_ref,
    lambda a, t, o, at: f"max({a[0]}, {_literal(0.0, o.dtype)})",
    # The mask reads the output, not the input: relu(x) > 0 exactly when x > 0, and then the
    # input is needed by relu alone and fuses into it instead of being stored.
    lambda g, x, out, at: [where(out > 0.0, g, 0.0)],
)


def _sigmoid_ref(a):
    return 1.0 / (1.0 + np.exp(-a.astype(np.float64)))


_unary(
    "sigmoid",
    _sigmoid_ref,
    lambda a, t, o, at: f"(1.0 / (1.0 + exp(-{a[0]})))",
    lambda g, x, out, at: [g * out * (1.0 - out)],
)
# tanh is clamped: some drivers compute it as a quotient of exponentials that overflows.
_unary(
    "tanh",
    np.tanh,
    lambda a, t, o, at: f"tanh(clamp({a[0]}, -15.0, 15.0))",
    lambda g, x, out, at: [g * (1.0 - out * out)],
)


# GELU, erf form (PyTorch's default) and tanh form, with exact derivative ops of their own.
def _gelu_ref(a):
    a64 = a.astype(np.float64)
    return 0.5 * a64 * (1.0 + erf(a64 * INV_SQRT_2))


def _gelu_grad_ref(a):
    a64 = a.astype(np.float64)
    return 0.5 * (1.0 + erf(a64 * INV_SQRT_2)) + a64 * INV_SQRT_2PI * np.exp(-0.5 * a64 * a64)


def _gelu_tanh_parts(a64):
    inner = SQRT_2_OVER_PI * (a64 + 0.044715 * a64**3)
    return inner, np.tanh(inner)


def _gelu_tanh_ref(a):
    a64 = a.astype(np.float64)
    _, th = _gelu_tanh_parts(a64)
    return 0.5 * a64 * (1.0 + th)


def _gelu_tanh_grad_ref(a):
    a64 = a.astype(np.float64)
    _, th = _gelu_tanh_parts(a64)
    dinner = SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * a64 * a64)
    return 0.5 * (1.0 + th) + 0.5 * a64 * (1.0 - th * th) * dinner


_unary(
    "gelu",
    _gelu_ref,
    _wgsl_fn("mn_gelu"),
    lambda g, x, out, at: [g * x[0].graph.apply("gelu_grad", [x[0]])],
)
_unary("gelu_grad", _gelu_grad_ref, _wgsl_fn("mn_gelu_grad"), None)
_unary(
    "gelu_tanh",
    _gelu_tanh_ref,
    _wgsl_fn("mn_gelu_tanh"),
    lambda g, x, out, at: [g * x[0].graph.apply("gelu_tanh_grad", [x[0]])],
)
_unary("gelu_tanh_grad", _gelu_tanh_grad_ref, _wgsl_fn("mn_gelu_tanh_grad"), None)


# -- comparisons, select, cast ---------------------------------------------------------------

for _name, _ref, _sym in (
    ("lt", np.less, "<"),
    ("le", np.less_equal, "<="),
    ("gt", np.greater, ">"),
    ("ge", np.greater_equal, ">="),
    ("eq", np.equal, "=="),
    ("ne", np.not_equal, "!="),
):
    register(
        OpDef(
            _name,
            "pointwise",
            _compare(_name),
            lambda arrays, attrs, _ref=_ref: _ref(arrays[0], arrays[1]),
            lambda g, x, out, at: [None, None],
            wgsl=_wgsl_infix(_sym),
        )
    )


def _where_infer(types, attrs):
    cond, a, b = types
    if cond.dtype != "bool":
        raise TypeError(f"where: condition must be bool, got {cond}")
    dtype = _same_dtype("where", [a, b])
    return TensorType(broadcast_shapes("where", cond, a, b), dtype)


def _where_vjp(g, x, out, attrs):
    cond, a, b = x
    return [None, sum_to(where(cond, g, 0.0), a.shape), sum_to(where(cond, 0.0, g), b.shape)]


register(
    OpDef(
        "where",
        "pointwise",
        _where_infer,
        lambda arrays, attrs: np.where(arrays[0], arrays[1], arrays[2]),
        _where_vjp,
        wgsl=lambda a, t, o, at: f"select({a[2]}, {a[1]}, {a[0]})",
    )
)


def where(cond, a, b):
    """Select `a` where `cond` is true, else `b`; scalars take the other operand's dtype."""
    from meganeura.graph import Tensor

    ref = next(v for v in (a, b, cond) if isinstance(v, Tensor))
    if not isinstance(a, Tensor):
        a = ref.graph.constant(np.asarray(a), b.dtype if isinstance(b, Tensor) else "f32")
    if not isinstance(b, Tensor):
        b = ref.graph.constant(np.asarray(b), a.dtype)
    return ref.graph.apply("where", [cond, a, b])


def _cast_infer(types, attrs):
    from meganeura.graph import check_dtype

    return TensorType(types[0].shape, check_dtype(attrs["dtype"], "cast"))


def _cast_wgsl(args, types, out, attrs):
    src, dst = types[0].dtype, out.dtype
    if dst == "bool":
        zero = {"f32": "0.0", "f16": "f16(0.0)", "i32": "0i", "u32": "0u", "bool": "false"}[src]
        return f"({args[0]} != {zero})"
    if src == "bool":
        one, zero = {
            "f32": ("1.0", "0.0"),
            "f16": ("f16(1.0)", "f16(0.0)"),
            "i32": ("1i", "0i"),
            "u32": ("1u", "0u"),
        }[dst]
        return f"select({zero}, {one}, {args[0]})"
    return f"{dst}({args[0]})"


def _cast_vjp(g, x, out, attrs):
    if x[0].dtype in FLOATS and out.dtype in FLOATS:
        return [g.astype(x[0].dtype)]
    return [None]


register(
    OpDef(
        "cast",
        "pointwise",
        _cast_infer,
        lambda arrays, attrs: arrays[0].astype(numpy_dtype(attrs["dtype"])),
        _cast_vjp,
        wgsl=_cast_wgsl,
    )
)
