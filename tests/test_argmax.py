"""argmax against torch.argmax: the NumPy executor and lavapipe, ties, NaN, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meganeura import Graph, build, grad
from meganeura import functional as F

DEVICES = ["cpu", pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe)]


def run_argmax(x: np.ndarray, dim: int, device: str) -> np.ndarray:
    g = Graph()
    g.output("y", F.argmax(g.input("x", x.shape, "f16" if x.dtype == np.float16 else "f32"), dim))
    return build(g, device=device).run({"x": x})["y"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("shape", "dim"),
    [((3, 5000), -1), ((4, 7, 3), 1), ((1,), 0), ((2, 300), 0), ((5, 1), -1), ((2, 3, 1030), 2)],
)
def test_argmax_matches_torch(device, shape, dim):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    got = run_argmax(x, dim, device)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, torch.argmax(torch.tensor(x), dim).numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_ties_take_the_first_index_and_nan_is_largest(device):
    x = np.zeros((4, 700), np.float32)
    x[0, [5, 300, 699]] = 2.0  # a tie of the largest: the first
    x[1, :] = -np.inf  # all -inf: index 0
    x[2, [10, 600]] = np.nan  # NaN beats 2.0, the first NaN wins
    x[2, 3] = 2.0
    x[3, 650] = np.inf
    got = run_argmax(x, -1, device)
    np.testing.assert_array_equal(got, torch.argmax(torch.tensor(x), -1).numpy())
    np.testing.assert_array_equal(got, [5, 0, 10, 650])


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.integers(1, 9), min_size=1, max_size=3),
    st.integers(0, 2),
    st.integers(0, 2**31),
)
def test_argmax_random_shapes_cpu(shape, dim, seed):
    dim = dim % len(shape)
    x = np.random.default_rng(seed).integers(-3, 4, shape).astype(np.float32)  # many ties
    got = run_argmax(x, dim, "cpu")
    np.testing.assert_array_equal(got, torch.argmax(torch.tensor(x), dim).numpy())


@pytest.mark.lavapipe
def test_argmax_of_f16_and_of_a_fused_input_on_lavapipe():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 257)).astype(np.float16)
    np.testing.assert_array_equal(
        run_argmax(x, -1, "vulkan-cpu"), torch.argmax(torch.tensor(x).float(), -1).numpy()
    )
    w = rng.standard_normal((6, 40)).astype(np.float32)
    g = Graph()
    g.output("y", F.argmax(g.input("w", w.shape) * -2.0 + 1.0, -1))  # read through the DAG
    got = build(g, device="vulkan-cpu").run({"w": w})["y"]
    np.testing.assert_array_equal(got, np.argmax(w * -2.0 + 1.0, -1))


def test_argmax_has_no_gradient():
    g = Graph()
    x = g.parameter("x", (3, 4), init="normal")
    y = (x * 2.0).sum() + F.argmax(x, -1).astype("f32").sum()
    (gx,) = grad(y, [x])
    g.output("gx", gx)
    np.testing.assert_allclose(build(g, device="cpu").run({})["gx"], np.full((3, 4), 2.0))


@pytest.mark.parametrize(
    ("shape", "dtype", "dim", "message"),
    [
        ((3, 4), "f32", 2, "argmax"),
        ((3, 4), "i32", -1, r"argmax: needs a float tensor"),
        ((), "f32", -1, "argmax"),
    ],
)
def test_bad_argmax_is_rejected_at_build_time(shape, dtype, dim, message):
    g = Graph()
    with pytest.raises((ValueError, TypeError), match=message):
        F.argmax(g.input("x", shape, dtype), dim)
