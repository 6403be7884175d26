"""silu, swiglu, softplus, clamp, sin, cos and erf: forward and backward against PyTorch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import meganeura as mn
from meganeura import functional as F
from tests.torch_check import DEVICES, check, normal

SHAPES = [(3, 7), (1,), (2, 1, 5)]

UNARY = {
    "silu": (F.silu, TF.silu, 3.0),
    "sin": (F.sin, torch.sin, 4.0),
    "cos": (F.cos, torch.cos, 4.0),
    "erf": (F.erf, torch.erf, 1.5),
    "softplus": (F.softplus, TF.softplus, 5.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_matches_torch(name, device):
    fn, torch_fn, scale = UNARY[name]
    shapes = SHAPES if device == "cpu" else SHAPES[:1]
    for n, shape in enumerate(shapes):
        x = normal(np.random.default_rng(n), *shape, scale=scale)
        check(fn, torch_fn, {"x": x}, device)


@pytest.mark.parametrize("device", DEVICES)
def test_sin_and_cos_stay_accurate_for_large_angles(device):
    # Angles as large as RoPE's (positions up to tens of thousands).
    x = np.random.default_rng(1).uniform(-3e4, 3e4, (4, 33)).astype(np.float32)
    both = lambda x: [F.sin(x), F.cos(x)]  # noqa: E731
    check(both, lambda x: [torch.sin(x), torch.cos(x)], {"x": x}, device, rtol=0, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("beta", "threshold"), [(1.0, 20.0), (2.0, 3.0), (0.5, 1.0)])
def test_softplus_beta_and_threshold(beta, threshold, device):
    # Values on both sides of the threshold, large negative ones included.
    x = np.linspace(-30, 12, 43, dtype=np.float32).reshape(1, 43)
    check(
        lambda x: F.softplus(x, beta, threshold),
        lambda x: TF.softplus(x, beta, threshold),
        {"x": x},
        device,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("gate_shape", "up_shape"), [((4, 9), (4, 9)), ((2, 3, 5), (5,)), ((1,), (3, 1))]
)
def test_swiglu_matches_torch(gate_shape, up_shape, device):
    rng = np.random.default_rng(2)
    check(
        F.swiglu,
        lambda gate, up: TF.silu(gate) * up,
        {"gate": normal(rng, *gate_shape, scale=3), "up": normal(rng, *up_shape)},
        device,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("low", "high"), [(-0.5, 1.0), (None, 0.25), (-1.0, None), (1.0, -1.0)])
def test_clamp_matches_torch(low, high, device):
    # Quarter steps put values exactly on the bounds, where the gradient still passes.
    x = np.random.default_rng(3).integers(-8, 9, (5, 6)).astype(np.float32) / 4
    check(lambda x: F.clamp(x, low, high), lambda x: torch.clamp(x, low, high), {"x": x}, device)


@pytest.mark.parametrize("device", DEVICES)
def test_clamp_of_integers(device):
    graph = mn.Graph()
    x = graph.input("x", (7,), "i32")
    graph.output("y", x.clamp(-2, 3))
    values = np.arange(-5, 2, dtype=np.int32) * 2
    got = mn.build(graph, device=device).run({"x": values})["y"]
    np.testing.assert_array_equal(got, np.clip(values, -2, 3))


def test_clamp_needs_a_bound_and_integral_bounds_for_integers():
    graph = mn.Graph()
    with pytest.raises(ValueError, match="clamp: at least one of min and max"):
        graph.input("x", (3,)).clamp()
    with pytest.raises(ValueError, match=r"clamp: min=0.5 is not an integer; i32\[3\]"):
        graph.input("i", (3,), "i32").clamp(0.5)


def test_softplus_rejects_zero_beta_and_float_ops_reject_integers():
    graph = mn.Graph()
    with pytest.raises(ValueError, match="softplus: beta must not be 0"):
        graph.input("x", (3,)).softplus(beta=0.0)
    with pytest.raises(TypeError, match="silu: dtype i32 is not supported; valid: f32, f16"):
        graph.input("i", (3,), "i32").silu()
    with pytest.raises(TypeError, match="swiglu: inputs must share one dtype"):
        F.swiglu(graph.input("a", (3,)), graph.input("b", (3,), "i32"))


def test_pointwise_chain_is_one_kernel():
    from meganeura.lower.plan import plan

    graph = mn.Graph()
    x = graph.input("x", (4, 8))
    y = graph.output("y", F.swiglu(x.sin(), x.erf().softplus()).clamp(-1, 1).silu())
    kernels = plan(graph, [y.id], {}).kernels
    assert [k.kind for k in kernels] == ["pointwise"]


@pytest.mark.lavapipe
def test_half_precision_kernels_match_the_reference():
    # f16 tensors compute in f32 inside the kernels; the NumPy references compute in float64.
    graph = mn.Graph()
    x = graph.input("x", (2, 2, 3, 8), "f16")
    positions = graph.input("p", (3,), "i32")
    w = graph.input("w", (8,), "f16")
    outputs = {
        "silu": F.silu(x),
        "sin": F.sin(x),
        "erf": F.erf(x),
        "softplus": F.softplus(x),
        "swiglu": F.swiglu(x, x),
        "clamp": x.clamp(-0.5, 0.5),
        "rms_norm": F.rms_norm(x, w),
        "layer_norm": F.layer_norm(x, w, w),
        "rope": F.rope(x, positions),
        "pad": F.pad(x, (1, 1)),
        "concat": F.cat([x, -x], 3),
    }
    for name, value in outputs.items():
        graph.output(name, value)
    rng = np.random.default_rng(4)
    feeds = {
        "x": rng.standard_normal((2, 2, 3, 8)).astype(np.float16),
        "p": np.array([0, 5, 9], np.int32),
        "w": rng.standard_normal(8).astype(np.float16),
    }
    expected = mn.build(graph, device="cpu").run(feeds)
    got = mn.build(graph, device="vulkan-cpu").run(feeds)
    for name in outputs:
        assert got[name].dtype == np.float16
        np.testing.assert_allclose(
            got[name].astype(np.float32),
            expected[name].astype(np.float32),
            rtol=2e-3,
            atol=2e-3,
            err_msg=name,
        )
