"""Property-based differential tests: random shapes, axes, permutations and elementwise DAGs,
forward and backward against float64 PyTorch (see tests/harness.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, mutually_broadcastable_shapes

from meganeura import functional as mf
from tests.harness import check_against_torch, normal, quantized

CPU = settings(max_examples=40, deadline=None)
LAVAPIPE = settings(max_examples=5, deadline=None)

seeds = st.integers(0, 2**32 - 1)


# -- broadcasting binary ops ------------------------------------------------------------------

BINARY = {
    "add": (lambda a, b: a + b, None),
    "sub": (lambda a, b: a - b, None),
    "mul": (lambda a, b: a * b, None),
    "div": (lambda a, b: a / (b.abs() + 0.5), None),
    "maximum": (mf.maximum, lambda a, b: torch.maximum(a, b)),
    "where": (lambda a, b: mf.where(a < b, a, b), lambda a, b: torch.where(a < b, a, b)),
}


def check_broadcast_binary(shapes, op, seed, device):
    fn, torch_fn = BINARY[op]
    rng = np.random.default_rng(seed)
    a, b = (quantized(rng, s) if op in ("maximum", "where") else normal(rng, s) for s in shapes)
    check_against_torch(fn, {"a": a, "b": b}, device, torch_fn)


broadcast_pairs = mutually_broadcastable_shapes(num_shapes=2, max_dims=4, max_side=5)


@CPU
@given(broadcast_pairs, st.sampled_from(sorted(BINARY)), seeds)
def test_binary_ops_broadcast_random_shape_pairs(shapes, op, seed):
    check_broadcast_binary(shapes.input_shapes, op, seed, "cpu")


@pytest.mark.lavapipe
@LAVAPIPE
@given(broadcast_pairs, st.sampled_from(sorted(BINARY)), seeds)
def test_binary_ops_broadcast_random_shape_pairs_on_lavapipe(shapes, op, seed):
    check_broadcast_binary(shapes.input_shapes, op, seed, "vulkan-cpu")


# -- reductions, permutations, reshapes, softmax, matmul --------------------------------------


def torch_reduce(op, x, axes, keepdims):
    fn = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax}[op]
    return fn(x, dim=axes, keepdim=keepdims)


@CPU
@given(array_shapes(min_dims=1, max_dims=4, max_side=5), st.data())
def test_reductions_over_random_axes(shape, data):
    ndim = len(shape)
    axes = tuple(
        data.draw(
            st.lists(
                st.integers(-ndim, ndim - 1),
                min_size=1,
                max_size=ndim,
                unique_by=lambda a: a % ndim,
            ),
            label="axes",
        )
    )
    op = data.draw(st.sampled_from(["sum", "mean", "max"]), label="op")
    keepdims = data.draw(st.booleans(), label="keepdims")
    rng = np.random.default_rng(data.draw(seeds, label="seed"))
    x = quantized(rng, shape) if op == "max" else normal(rng, shape)
    check_against_torch(
        lambda x: getattr(x, op)(axis=axes, keepdims=keepdims),
        {"x": x},
        "cpu",
        lambda x: torch_reduce(op, x, axes, keepdims),
    )


@CPU
@given(array_shapes(min_dims=0, max_dims=5, max_side=4), st.data())
def test_random_permutations(shape, data):
    axes = tuple(data.draw(st.permutations(range(len(shape))), label="axes"))
    x = normal(np.random.default_rng(data.draw(seeds, label="seed")), shape)
    check_against_torch(lambda x: x.permute(axes) * 1.5, {"x": x}, "cpu")


def prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors


@st.composite
def reshape_targets(draw, size: int):
    """A shape of `size` elements: its prime factors shuffled and grouped, with 1s between,
    and sometimes one dim written as -1."""
    factors = draw(st.permutations(prime_factors(size)))
    cuts = sorted(draw(st.sets(st.integers(1, max(len(factors) - 1, 1)), max_size=3)))
    groups = [factors[a:b] for a, b in zip([0, *cuts], [*cuts, len(factors)], strict=True) if a < b]
    dims = [math.prod(g) for g in groups]
    for _ in range(draw(st.integers(0, 2))):
        dims.insert(draw(st.integers(0, len(dims))), 1)
    if dims and draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))] = -1
    return tuple(dims)


@CPU
@given(array_shapes(min_dims=1, max_dims=4, max_side=6), st.data())
def test_random_permute_then_reshape(shape, data):
    axes = tuple(data.draw(st.permutations(range(len(shape))), label="axes"))
    target = data.draw(reshape_targets(math.prod(shape)), label="target")
    x = normal(np.random.default_rng(data.draw(seeds, label="seed")), shape)
    check_against_torch(lambda x: x.permute(axes).reshape(target).tanh(), {"x": x}, "cpu")


@CPU
@given(array_shapes(min_dims=1, max_dims=4, max_side=6), st.data())
def test_softmax_over_random_axes(shape, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    op = data.draw(st.sampled_from(["softmax", "log_softmax"]), label="op")
    x = normal(np.random.default_rng(data.draw(seeds, label="seed")), shape, 3.0)
    check_against_torch(
        lambda x: getattr(x, op)(axis),
        {"x": x},
        "cpu",
        lambda x: getattr(torch, op)(x, dim=axis),
    )


@CPU
@given(
    mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3),
    st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    st.booleans(),
    st.booleans(),
    seeds,
)
def test_matmul_random_shapes(batches, mkn, trans_a, trans_b, seed):
    (batch_a, batch_b), (m, k, n) = batches.input_shapes, mkn
    rng = np.random.default_rng(seed)
    arrays = {
        "a": normal(rng, batch_a + ((k, m) if trans_a else (m, k))),
        "b": normal(rng, batch_b + ((n, k) if trans_b else (k, n))),
    }
    check_against_torch(
        lambda a, b: a.graph.apply("matmul", [a, b], trans_a=trans_a, trans_b=trans_b),
        arrays,
        "cpu",
        lambda a, b: (a.mT if trans_a else a) @ (b.mT if trans_b else b),
    )


# -- random elementwise DAGs ------------------------------------------------------------------

# Each entry works on meganeura Tensors and torch tensors alike, unless a torch form is given.
# All are defined on every real input, so any composition is too.
DAG_UNARY = {
    "neg": (lambda x: -x, None),
    "tanh": (mf.tanh, torch.tanh),
    "sigmoid": (mf.sigmoid, torch.sigmoid),
    "relu": (mf.relu, F.relu),
    "abs": (lambda x: x.abs(), None),
    "gelu": (mf.gelu, F.gelu),
    "exp_of_tanh": (lambda x: x.tanh().exp(), None),
    "log_of_abs_plus_1": (lambda x: (x.abs() + 1.0).log(), None),
    "rsqrt_of_square_plus_1": (lambda x: (x * x + 1.0).rsqrt(), None),
}
DAG_BINARY = {
    "add": (lambda a, b: a + b, None),
    "sub": (lambda a, b: a - b, None),
    "mul": (lambda a, b: a * b, None),
    "div_by_abs_plus_1": (lambda a, b: a / (b.abs() + 1.0), None),
    "maximum": (mf.maximum, torch.maximum),
    "minimum": (mf.minimum, torch.minimum),
    "where_gt": (
        lambda a, b: mf.where(a > b, a, b * 0.5),
        lambda a, b: torch.where(a > b, a, b * 0.5),
    ),
}


@st.composite
def elementwise_programs(draw):
    """Input shapes (mutually broadcastable) and steps (op, argument indices); step k may use
    any input or earlier step, so values are shared and the graph is a DAG."""
    count = draw(st.integers(1, 3))
    shapes = draw(mutually_broadcastable_shapes(num_shapes=count, max_dims=3, max_side=4))
    steps = []
    for k in range(draw(st.integers(1, 6))):
        pick = st.integers(0, count + k - 1)
        if draw(st.booleans()):
            steps.append((draw(st.sampled_from(sorted(DAG_UNARY))), (draw(pick),)))
        else:
            steps.append((draw(st.sampled_from(sorted(DAG_BINARY))), (draw(pick), draw(pick))))
    return shapes.input_shapes, steps


def interpret(steps, torch_form: bool):
    def run(**inputs):
        values = [inputs[f"x{i}"] for i in range(len(inputs))]
        for op, args in steps:
            fn, torch_fn = (DAG_UNARY if len(args) == 1 else DAG_BINARY)[op]
            fn = (torch_fn or fn) if torch_form else fn
            values.append(fn(*(values[i] for i in args)))
        return values[-1]

    return run


def check_program(program, seed, device):
    shapes, steps = program
    rng = np.random.default_rng(seed)
    arrays = {f"x{i}": normal(rng, shape) for i, shape in enumerate(shapes)}
    check_against_torch(interpret(steps, False), arrays, device, interpret(steps, True))


@CPU
@given(elementwise_programs(), seeds)
def test_random_elementwise_dags(program, seed):
    check_program(program, seed, "cpu")


@pytest.mark.lavapipe
@LAVAPIPE
@given(elementwise_programs(), seeds)
def test_random_elementwise_dags_on_lavapipe(program, seed):
    check_program(program, seed, "vulkan-cpu")
