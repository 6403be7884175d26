"""Every op's forward and backward against float64 PyTorch, mid-graph, on each device.

Each case feeds seeded random inputs chosen for the op's domain (see tests/harness.py for how
the op is placed mid-graph and differentiated against a random upstream gradient).
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from meganeura import functional as mf
from tests.harness import (
    DEVICES,
    away_from_zero,
    check_against_torch,
    normal,
    quantized,
    uniform,
)


def rng_for(*key) -> np.random.Generator:
    """A generator seeded by the test case, so every case draws its own inputs."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def positive(rng, shape):
    return uniform(rng, shape, 0.2, 3.0)


def shape_id(value) -> str:
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


# -- elementwise: binary ----------------------------------------------------------------------

# Both directions of broadcasting, size-1 dims, rank differences and 0-d operands.
BROADCAST_PAIRS = [
    ((3, 5), (3, 5)),
    ((4, 1, 5), (3, 1)),
    ((1,), (2, 3)),
    ((2, 3, 1), (1, 7)),
    ((1, 1), (1, 1)),
    ((2, 17), ()),
    ((), (5, 1)),
]

# name: (meganeura fn, torch fn, sampler for a, sampler for b)
BINARY = {
    "add": (lambda a, b: a + b, None, normal, normal),
    "sub": (lambda a, b: a - b, None, normal, normal),
    "mul": (lambda a, b: a * b, None, normal, normal),
    "div": (lambda a, b: a / b, None, normal, away_from_zero),
    "pow": (lambda a, b: a**b, None, positive, lambda r, s: uniform(r, s, -2.0, 2.0)),
    # Quantized inputs make ties common: both libraries split the gradient evenly on a tie.
    "maximum": (mf.maximum, lambda a, b: torch.maximum(a, b), quantized, quantized),
    "minimum": (mf.minimum, lambda a, b: torch.minimum(a, b), quantized, quantized),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", BROADCAST_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
@pytest.mark.parametrize("op", BINARY)
def test_binary(op, shapes, device):
    fn, torch_fn, sample_a, sample_b = BINARY[op]
    rng = rng_for(op, shapes)
    arrays = {"a": sample_a(rng, shapes[0]), "b": sample_b(rng, shapes[1])}
    check_against_torch(fn, arrays, device, torch_fn)


SCALAR_FORMS = {
    "x+s": lambda x: x + 1.5,
    "s+x": lambda x: 1.5 + x,
    "x-s": lambda x: x - 0.75,
    "s-x": lambda x: 2 - x,
    "x*s": lambda x: x * -0.5,
    "s*x": lambda x: 3 * x,
    "x/s": lambda x: x / 4.0,
    "s/x": lambda x: 3.0 / x,
    "x**2": lambda x: x**2.0,
    "x**3": lambda x: x**3.0,
    "x**-1": lambda x: x**-1.0,
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", SCALAR_FORMS)
def test_binary_with_python_scalar(form, device):
    # Signed bases: x ** 2.0 must not go through log(x).
    x = away_from_zero(rng_for(form), (3, 7), 0.25, 2.0)
    check_against_torch(SCALAR_FORMS[form], {"x": x}, device)


@pytest.mark.parametrize("device", DEVICES)
def test_pow_of_negative_base_with_integral_exponent_tensor(device):
    rng = rng_for("pow-int")
    arrays = {
        "a": away_from_zero(rng, (3, 8), 0.5, 1.5),
        "b": rng.integers(-3, 4, (8,)).astype(np.float32),
    }
    # d/db needs log(a), which is NaN for negative a: only a is differentiated.
    check_against_torch(lambda a, b: a**b, arrays, device, wrt=["a"])


@pytest.mark.parametrize("device", DEVICES)
def test_pow_of_positive_base_with_fractional_exponent(device):
    x = positive(rng_for("sqrt-pow"), (2, 9))
    check_against_torch(lambda x: x**0.5, {"x": x}, device)


# -- elementwise: unary -----------------------------------------------------------------------

UNARY = {
    "neg": (lambda x: -x, None, normal),
    "exp": (mf.exp, lambda x: torch.exp(x), lambda r, s: uniform(r, s, -4.0, 4.0)),
    "log": (mf.log, lambda x: torch.log(x), positive),
    "sqrt": (mf.sqrt, lambda x: torch.sqrt(x), positive),
    "rsqrt": (lambda x: x.rsqrt(), None, positive),
    "abs": (lambda x: x.abs(), None, quantized),  # exact zeros: both take sign(0) = 0
    "relu": (mf.relu, lambda x: F.relu(x), quantized),  # exact zeros: gradient 0 in both
    "sigmoid": (mf.sigmoid, lambda x: torch.sigmoid(x), lambda r, s: normal(r, s, 3.0)),
    "tanh": (mf.tanh, lambda x: torch.tanh(x), lambda r, s: uniform(r, s, -20.0, 20.0)),
    "gelu": (lambda x: mf.gelu(x), lambda x: F.gelu(x), lambda r, s: normal(r, s, 2.0)),
    "gelu_tanh": (
        lambda x: x.gelu(approximate="tanh"),
        lambda x: F.gelu(x, approximate="tanh"),
        lambda r, s: normal(r, s, 2.0),
    ),
}

UNARY_SHAPES = [(2, 37), (1,), (3, 1, 17), ()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", UNARY_SHAPES, ids=shape_id)
@pytest.mark.parametrize("op", UNARY)
def test_unary(op, shape, device):
    fn, torch_fn, sample = UNARY[op]
    check_against_torch(fn, {"x": sample(rng_for(op, shape), shape)}, device, torch_fn)


@pytest.mark.parametrize("device", DEVICES)
def test_tanh_saturates_for_large_inputs(device):
    x = np.array([[-90.0, -30.0, -15.5, 15.5, 30.0, 90.0]], np.float32)
    check_against_torch(mf.tanh, {"x": x}, device, torch.tanh)


# -- where, comparisons, cast -----------------------------------------------------------------

WHERE_SHAPES = [
    ((3, 1), (3, 4), (4,)),
    ((2, 3, 4), (2, 3, 4), (2, 3, 4)),
    ((5,), (1,), (2, 5)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", WHERE_SHAPES, ids=str)
def test_where(shapes, device):
    rng = rng_for("where", shapes)
    arrays = {
        "cond": rng.random(shapes[0]) < 0.5,
        "a": normal(rng, shapes[1]),
        "b": normal(rng, shapes[2]),
    }
    check_against_torch(mf.where, arrays, device, lambda cond, a, b: torch.where(cond, a, b))


@pytest.mark.parametrize("device", DEVICES)
def test_where_on_a_comparison_and_a_scalar(device):
    rng = rng_for("where-cmp")
    arrays = {"a": normal(rng, (4, 6)), "b": normal(rng, (6,))}
    check_against_torch(
        lambda a, b: mf.where(a > b, a * b, 0.0) + mf.where(a <= 0.25, 1.0, b),
        arrays,
        device,
        lambda a, b: torch.where(a > b, a * b, 0.0) + torch.where(a <= 0.25, 1.0, b),
    )


COMPARISONS = {
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "eq": lambda a, b: a.eq(b),
    "ne": lambda a, b: a.ne(b),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", [((3, 4), (4,)), ((2, 1, 3), (5, 1)), ((1,), ())], ids=str)
@pytest.mark.parametrize("op", COMPARISONS)
def test_comparison(op, shapes, device):
    rng = rng_for(op, shapes)
    arrays = {"a": quantized(rng, shapes[0], 2), "b": quantized(rng, shapes[1], 2)}
    check_against_torch(COMPARISONS[op], arrays, device)


@pytest.mark.parametrize("device", DEVICES)
def test_comparison_with_scalar_and_int_inputs(device):
    rng = rng_for("cmp-int")
    arrays = {"x": quantized(rng, (3, 5)), "i": rng.integers(-3, 4, (3, 5)).astype(np.int32)}
    check_against_torch(lambda x, i: (x > 0.5).ne(i.eq(1)), arrays, device)


def to_torch_dtype(dtype: str):
    return {"f32": torch.float32, "i32": torch.int32, "u32": torch.uint32, "bool": torch.bool}[
        dtype
    ]


CASTS = [
    ("f32", "i32", lambda r, s: uniform(r, s, -5.0, 5.0)),  # truncates toward zero
    ("f32", "u32", lambda r, s: uniform(r, s, 0.0, 9.0)),
    ("f32", "bool", quantized),
    ("i32", "f32", lambda r, s: r.integers(-1000, 1000, s).astype(np.int32)),
    ("bool", "f32", lambda r, s: r.random(s) < 0.5),
    ("bool", "i32", lambda r, s: r.random(s) < 0.5),
    ("i32", "bool", lambda r, s: r.integers(-2, 3, s).astype(np.int32)),
    ("f32", "f32", normal),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("src,dst,sample", CASTS, ids=[f"{c[0]}-{c[1]}" for c in CASTS])
def test_cast(src, dst, sample, device):
    x = sample(rng_for("cast", src, dst), (3, 7))

    def torch_cast(x):
        out = x.to(to_torch_dtype(dst))
        return out.to(torch.float64) if dst == "f32" else out

    check_against_torch(lambda x: x.astype(dst), {"x": x}, device, torch_cast)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_stops_at_an_integer_cast(device):
    x = uniform(rng_for("cast-stop"), (2, 5), -5.0, 5.0)
    out = check_against_torch(
        lambda x: x.astype("i32").astype("f32") * x,
        {"x": x},
        device,
        lambda x: x.to(torch.int32).to(torch.float64) * x,
    )
    assert np.any(out.grads["x"] != 0)


def test_cast_through_f16_rounds_like_torch():
    # f16 needs the shader-f16 feature on WebGPU devices, so this runs on the NumPy executor.
    x = normal(rng_for("f16"), (4, 9), 3.0)
    check_against_torch(
        lambda x: x.astype("f16").astype("f32"),
        {"x": x},
        "cpu",
        lambda x: x.to(torch.float16).to(torch.float64),
    )


# -- matmul -----------------------------------------------------------------------------------

MATMUL_SHAPES = [
    ((5, 7), (7, 3)),
    ((1, 1), (1, 1)),
    ((1, 17), (17, 1)),
    ((13, 33), (33, 9)),
    ((2, 5, 7), (2, 7, 3)),
    ((2, 1, 5, 7), (3, 7, 4)),
    ((5, 7), (2, 7, 3)),
    ((2, 5, 7), (7, 3)),
    ((7,), (7, 3)),
    ((5, 7), (7,)),
    ((7,), (7,)),
    ((7,), (2, 7, 3)),
    ((2, 5, 7), (7,)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=lambda p: f"{p[0]}@{p[1]}")
def test_matmul(shapes, device):
    rng = rng_for("matmul", shapes)
    arrays = {"a": normal(rng, shapes[0]), "b": normal(rng, shapes[1])}
    check_against_torch(lambda a, b: a @ b, arrays, device)


# (batch of a, batch of b, m, k, n)
TRANSPOSED_DIMS = [((2,), (), 5, 7, 3), ((), (), 17, 65, 19), ((3, 1), (2,), 1, 4, 6)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("dims", TRANSPOSED_DIMS, ids=str)
def test_matmul_transposed_operands(dims, trans_a, trans_b, device):
    batch_a, batch_b, m, k, n = dims
    rng = rng_for("matmul-t", dims, trans_a, trans_b)
    arrays = {
        "a": normal(rng, batch_a + ((k, m) if trans_a else (m, k))),
        "b": normal(rng, batch_b + ((n, k) if trans_b else (k, n))),
    }
    check_against_torch(
        lambda a, b: a.graph.apply("matmul", [a, b], trans_a=trans_a, trans_b=trans_b),
        arrays,
        device,
        lambda a, b: (a.mT if trans_a else a) @ (b.mT if trans_b else b),
    )


# -- shape ops --------------------------------------------------------------------------------

PERMUTES = [((2, 3, 4), (2, 0, 1)), ((2, 3, 4), (0, 2, 1)), ((5, 1, 3, 2), (3, 1, 0, 2))]
PERMUTES += [((2, 3, 4), (-1, 0, 1)), ((1, 7), (1, 0)), ((3,), (0,))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axes", PERMUTES, ids=str)
def test_permute(shape, axes, device):
    x = normal(rng_for("permute", shape, axes), shape)
    check_against_torch(lambda x: x.permute(axes), {"x": x}, device)


TRANSPOSES = {
    "last-two": (lambda x: x.transpose(), lambda x: x.transpose(-2, -1)),
    "0-2": (lambda x: x.transpose(0, 2), None),
    "negative": (lambda x: x.transpose(-3, 1), None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", TRANSPOSES)
def test_transpose(form, device):
    fn, torch_fn = TRANSPOSES[form]
    check_against_torch(fn, {"x": normal(rng_for("T", form), (2, 3, 5))}, device, torch_fn)


@pytest.mark.parametrize("device", DEVICES)
def test_T_property(device):
    check_against_torch(lambda x: x.T, {"x": normal(rng_for("T"), (4, 9))}, device)


RESHAPES = [
    ((2, 3, 5), (3, -1)),
    ((2, 3, 5), (-1,)),
    ((2, 3, 5), (2, 3, 1, 5)),
    ((6,), (1, 6, 1)),
    ((1,), ()),
    ((), (1, 1)),
    ((4, 1, 3), (-1, 2)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,target", RESHAPES, ids=str)
def test_reshape(shape, target, device):
    x = normal(rng_for("reshape", shape, target), shape)
    check_against_torch(lambda x: x.reshape(target), {"x": x}, device)


@pytest.mark.parametrize("device", DEVICES)
def test_reshape_of_a_permuted_tensor(device):
    x = normal(rng_for("reshape-permute"), (2, 3, 4))
    check_against_torch(lambda x: x.permute(2, 0, 1).reshape(-1, 3).exp(), {"x": x}, device)


BROADCASTS = [
    ((3, 1), (2, 3, 4)),
    ((1,), (5,)),
    ((4,), (3, 4)),
    ((2, 1, 3), (2, 5, 3)),
    ((), (2, 3)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,target", BROADCASTS, ids=str)
def test_broadcast_to(shape, target, device):
    x = normal(rng_for("broadcast", shape, target), shape)
    check_against_torch(lambda x: x.broadcast_to(target), {"x": x}, device)


# -- reductions -------------------------------------------------------------------------------


def torch_reduce(op, x, axis, keepdims):
    dims = tuple(range(x.ndim)) if axis is None else axis
    fn = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax}[op]
    return fn(x, dim=dims, keepdim=keepdims)


REDUCE_CASES = [
    ((3, 4, 5), None),
    ((3, 4, 5), 0),
    ((3, 4, 5), -1),
    ((3, 4, 5), (0, 2)),
    ((3, 4, 5), (-1, -3)),
    ((3, 4, 5), (0, 1, 2)),
    ((2, 1, 3), 1),
    ((1,), None),
    ((2, 65), 1),
    ((3, 257), -1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("shape,axis", REDUCE_CASES, ids=str)
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_reduce(op, shape, axis, keepdims, device):
    rng = rng_for(op, shape, axis, keepdims)
    x = quantized(rng, shape) if op == "max" else normal(rng, shape)  # max: ties split evenly
    check_against_torch(
        lambda x: getattr(x, op)(axis=axis, keepdims=keepdims),
        {"x": x},
        device,
        lambda x: torch_reduce(op, x, axis, keepdims),
    )


# -- softmax, losses --------------------------------------------------------------------------

SOFTMAX_CASES = [((3, 4, 5), 0), ((3, 4, 5), 1), ((3, 4, 5), -1), ((1, 7), -1), ((2, 65), -1)]
SOFTMAX_CASES += [((4, 1), -1), ((9,), 0), ((3, 257), -1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,axis", SOFTMAX_CASES, ids=str)
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_softmax(op, shape, axis, device):
    x = normal(rng_for(op, shape, axis), shape, 3.0)
    check_against_torch(
        lambda x: getattr(mf, op)(x, axis=axis),
        {"x": x},
        device,
        lambda x: getattr(torch, op)(x, dim=axis),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_of_large_logits_is_stable(device):
    x = np.array([[1000.0, 0.0, -1000.0], [80.0, 90.0, 100.0]], np.float32)
    check_against_torch(lambda x: x.softmax(-1) + x.log_softmax(-1), {"x": x}, device)


# (logits shape, reduction, ignore_index); labels equal to ignore_index are ignored.
CROSS_ENTROPY_CASES = [
    ((6, 5), "mean", -100),
    ((6, 5), "sum", -100),
    ((6, 5), "none", -100),
    ((2, 3, 5), "mean", 2),
    ((2, 3, 5), "none", 2),
    ((1, 1), "mean", -100),
    ((7, 17), "sum", -100),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,reduction,ignore_index", CROSS_ENTROPY_CASES, ids=str)
def test_cross_entropy(shape, reduction, ignore_index, device):
    rng = rng_for("ce", shape, reduction, ignore_index)
    labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
    if ignore_index < 0 and labels.size > 1:
        labels.flat[rng.choice(labels.size, labels.size // 3, replace=False)] = ignore_index
    assert np.any(labels != ignore_index)

    def torch_ce(logits, labels):
        classes_second = logits.movedim(-1, 1)
        return F.cross_entropy(
            classes_second, labels, reduction=reduction, ignore_index=ignore_index
        )

    check_against_torch(
        lambda logits, labels: mf.cross_entropy(logits, labels, reduction, ignore_index),
        {"logits": normal(rng, shape, 2.0), "labels": labels},
        device,
        torch_ce,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss(reduction, device):
    rng = rng_for("mse", reduction)
    check_against_torch(
        lambda a, b: mf.mse_loss(a, b, reduction),
        {"a": normal(rng, (3, 7)), "b": normal(rng, (3, 7))},
        device,
        lambda a, b: F.mse_loss(a, b, reduction=reduction),
    )
