"""Pooling, upsampling and pixel (un)shuffle against torch.nn.functional: forward and
gradients with the op mid-graph, on the NumPy executor and on lavapipe; argument errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meganeura import Graph, build, grad
from meganeura import functional as F
from meganeura.lower.plan import plan
from meganeura.nn import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from tests.torch_parity import check_op


def lavapipe(*values):
    return pytest.param(*values, marks=pytest.mark.lavapipe)


def image(shape, seed=0, ties=False) -> dict[str, np.ndarray]:
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    # Rounded to a coarse grid, most windows hold several equal maxima.
    return {"x": np.round(x * 1.5) / 1.5 if ties else x}


def with_devices(cases, on_lavapipe):
    """Every case on cpu; the cases numbered in on_lavapipe also on lavapipe."""
    return [(case, "cpu") for case in cases] + [
        lavapipe(cases[i], "vulkan-cpu") for i in on_lavapipe
    ]


# -- max_pool2d ----------------------------------------------------------------------------------

# (shape, kernel, stride, padding, dilation, ceil_mode)
MAX_POOL = [
    ((1, 1, 1, 1), 1, None, 0, 1, False),
    ((2, 3, 8, 8), 2, None, 0, 1, False),
    ((2, 2, 7, 9), 3, 2, 1, 1, False),
    ((1, 3, 9, 7), (3, 2), (2, 1), (1, 0), (2, 1), False),
    ((2, 2, 7, 6), 3, 2, 1, 1, True),
    ((1, 2, 10, 11), (2, 4), 3, (1, 2), (3, 1), True),
    ((3, 1, 5, 5), 5, 1, 2, 1, False),
]


@pytest.mark.parametrize("case, device", with_devices(MAX_POOL, [2, 4]))
@pytest.mark.parametrize("ties", [False, True])
def test_max_pool2d(case, device, ties):
    shape, kernel, stride, padding, dilation, ceil_mode = case
    args = dict(
        kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode
    )
    check_op(
        device,
        image(shape, 1, ties),
        lambda x: F.max_pool2d(x, **args),
        lambda x: TF.max_pool2d(x, **args),
    )


@pytest.mark.parametrize("case, device", with_devices(MAX_POOL, [3]))
def test_max_pool2d_indices_match_torch(case, device):
    """The argmax of tied windows is the first maximum in window order, as in PyTorch."""
    shape, kernel, stride, padding, dilation, ceil_mode = case
    args = dict(
        kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode
    )
    x = image(shape, 2, ties=True)["x"]
    x[..., :2, :] = -np.inf  # windows of -inf still point at their first in-bounds tap
    graph = Graph()
    values, indices = F.max_pool2d(graph.input("x", shape), **args, return_indices=True)
    graph.output("values", values)
    graph.output("indices", indices)
    got = build(graph, device=device).run({"x": x})
    want, want_indices = TF.max_pool2d(torch.from_numpy(x), **args, return_indices=True)
    np.testing.assert_array_equal(got["values"], want.numpy())
    np.testing.assert_array_equal(got["indices"], want_indices.numpy())


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 3),
    h=st.integers(1, 10),
    w=st.integers(1, 10),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    ceil_mode=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_max_pool2d_hypothesis(n, c, h, w, kernel, stride, padding, dilation, ceil_mode, seed):
    for size, k, p, d, s in zip((h, w), kernel, padding, dilation, stride, strict=True):
        assume(2 * p <= k and size + 2 * p >= d * (k - 1) + 1)
        # PyTorch's gradient for a window wholly in the padding goes to a tap outside the
        # window; that case has its own test above.
        starts = range(0, size + 2 * p - d * (k - 1), s)
        assume(all(any(0 <= o - p + j * d < size for j in range(k)) for o in starts))
    args = dict(
        kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode
    )
    check_op(
        "cpu",
        image((n, c, h, w), seed, ties=seed % 2 == 0),
        lambda x: F.max_pool2d(x, **args),
        lambda x: TF.max_pool2d(x, **args),
    )


# -- avg_pool2d ----------------------------------------------------------------------------------

# (shape, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
AVG_POOL = [
    ((1, 1, 1, 1), 1, None, 0, False, True, None),
    ((2, 3, 8, 8), 2, None, 0, False, True, None),
    ((2, 2, 7, 9), 3, 2, 1, False, True, None),
    ((2, 2, 7, 9), 3, 2, 1, False, False, None),
    ((1, 3, 9, 6), (3, 2), (2, 1), (1, 1), True, False, None),
    ((2, 2, 7, 6), 3, 2, 1, True, True, None),
    ((1, 2, 6, 7), (2, 3), 2, (1, 0), False, True, 5),
]


@pytest.mark.parametrize("case, device", with_devices(AVG_POOL, [3, 4]))
def test_avg_pool2d(case, device):
    shape, kernel, stride, padding, ceil_mode, include, divisor = case
    args = dict(
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        ceil_mode=ceil_mode,
        count_include_pad=include,
        divisor_override=divisor,
    )
    check_op(
        device,
        image(shape, 3),
        lambda x: F.avg_pool2d(x, **args),
        lambda x: TF.avg_pool2d(x, **args),
    )


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(1, 10),
    w=st.integers(1, 10),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    ceil_mode=st.booleans(),
    include=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_avg_pool2d_hypothesis(h, w, kernel, stride, padding, ceil_mode, include, seed):
    for size, k, p in zip((h, w), kernel, padding, strict=True):
        assume(2 * p <= k and size + 2 * p >= k)
    args = dict(
        kernel_size=kernel,
        stride=stride,
        padding=padding,
        ceil_mode=ceil_mode,
        count_include_pad=include,
    )
    check_op(
        "cpu",
        image((2, 2, h, w), seed),
        lambda x: F.avg_pool2d(x, **args),
        lambda x: TF.avg_pool2d(x, **args),
    )


# -- adaptive_avg_pool2d ---------------------------------------------------------------------------

ADAPTIVE = [
    ((2, 3, 7, 5), 1),
    ((2, 3, 7, 5), (3, 2)),
    ((1, 2, 8, 8), 4),
    ((2, 2, 3, 4), (5, 7)),
    ((1, 2, 6, 9), (None, 4)),
]


@pytest.mark.parametrize("case, device", with_devices(ADAPTIVE, [0, 1, 3]))
def test_adaptive_avg_pool2d(case, device):
    shape, size = case
    check_op(
        device,
        image(shape, 4),
        lambda x: F.adaptive_avg_pool2d(x, size),
        lambda x: TF.adaptive_avg_pool2d(x, size),
    )


# -- interpolate -----------------------------------------------------------------------------------

# (shape, size, scale_factor, mode, align_corners)
INTERPOLATE = [
    ((2, 3, 4, 5), None, 2, "nearest", None),
    ((1, 2, 3, 4), (7, 5), None, "nearest", None),
    ((1, 2, 5, 6), None, (1.5, 0.5), "nearest", None),
    ((1, 1, 7, 9), (3, 4), None, "nearest", None),
    ((2, 2, 4, 5), None, 2, "bilinear", False),
    ((1, 2, 3, 4), (7, 5), None, "bilinear", False),
    ((1, 2, 3, 4), (7, 5), None, "bilinear", True),
    ((1, 2, 9, 8), (4, 3), None, "bilinear", False),
    ((1, 2, 5, 6), None, (2.5, 0.75), "bilinear", False),
    ((1, 2, 4, 3), (1, 6), None, "bilinear", True),
    ((1, 1, 1, 1), (3, 2), None, "bilinear", False),
    ((1, 2, 2, 3), None, 3, "bilinear", True),
]


@pytest.mark.parametrize("case, device", with_devices(INTERPOLATE, [0, 2, 5, 6]))
def test_interpolate(case, device):
    shape, size, scale_factor, mode, align = case
    args = dict(size=size, scale_factor=scale_factor, mode=mode, align_corners=align)
    check_op(
        device,
        image(shape, 5),
        lambda x: F.interpolate(x, **args),
        lambda x: TF.interpolate(x, **args),
    )


def test_nearest_upsample_is_a_view_fused_into_its_reader():
    graph = Graph()
    x = graph.input("x", (1, 2, 4, 4))
    y = graph.output("y", F.interpolate(x, scale_factor=2) * 3.0)
    kernels = plan(graph, [y.id], {}).kernels
    assert [graph.nodes[k.node].op for k in kernels] == ["mul"]


# -- pixel shuffle ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, factor, device",
    [
        ((2, 8, 3, 5), 2, "cpu"),
        ((1, 9, 2, 2), 3, "cpu"),
        ((3, 4, 1, 1), 1, "cpu"),
        ((2, 3, 12, 3, 2), 2, "cpu"),
        lavapipe((2, 8, 3, 5), 2, "vulkan-cpu"),
    ],
)
def test_pixel_shuffle(shape, factor, device):
    check_op(
        device,
        image(shape, 6),
        lambda x: F.pixel_shuffle(x, factor),
        lambda x: TF.pixel_shuffle(x, factor),
    )


@pytest.mark.parametrize(
    "shape, factor, device",
    [
        ((2, 3, 4, 6), 2, "cpu"),
        ((1, 2, 9, 3), 3, "cpu"),
        ((2, 2, 3, 4, 8), 2, "cpu"),
        lavapipe((2, 3, 4, 6), 2, "vulkan-cpu"),
    ],
)
def test_pixel_unshuffle(shape, factor, device):
    check_op(
        device,
        image(shape, 7),
        lambda x: F.pixel_unshuffle(x, factor),
        lambda x: TF.pixel_unshuffle(x, factor),
    )


@pytest.mark.parametrize("device", ["cpu", pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe)])
def test_space_to_depth_connector(device):
    """SmolVLM2's connector: [B, T, D] patch features to [B, T / r^2, D * r^2] by
    pixel_unshuffle over the patch grid, then a projection; the unshuffle is read in place."""
    b, side, d, r, out = 2, 4, 3, 2, 5
    rng = np.random.default_rng(8)
    feats = rng.normal(size=(b, side * side, d)).astype(np.float32)
    proj = rng.normal(size=(d * r * r, out)).astype(np.float32)
    graph = Graph()
    x = graph.input("x", feats.shape)
    w = graph.input("w", proj.shape)
    grid = x.permute(0, 2, 1).reshape(b, d, side, side)
    tokens = F.pixel_unshuffle(grid, r).reshape(b, d * r * r, -1).permute(0, 2, 1)
    y = graph.output("y", tokens @ w)
    dx, dw = grad((y * y).sum(), [x, w])
    graph.output("dx", dx)
    graph.output("dw", dw)
    got = build(graph, device=device).run({"x": feats, "w": proj})

    tx = torch.tensor(feats, dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(proj, dtype=torch.float64, requires_grad=True)
    tgrid = tx.permute(0, 2, 1).reshape(b, d, side, side)
    ty = TF.pixel_unshuffle(tgrid, r).reshape(b, d * r * r, -1).permute(0, 2, 1) @ tw
    (ty * ty).sum().backward()
    np.testing.assert_allclose(got["y"], ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["dx"], tx.grad.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got["dw"], tw.grad.numpy(), rtol=1e-5, atol=1e-4)


def test_pixel_unshuffle_fuses_into_a_pointwise_reader():
    graph = Graph()
    x = graph.input("x", (1, 2, 4, 4))
    y = graph.output("y", F.pixel_unshuffle(x, 2).relu())
    assert [graph.nodes[k.node].op for k in plan(graph, [y.id], {}).kernels] == ["relu"]


# -- layers ----------------------------------------------------------------------------------------


def test_pool_layers_match_functional():
    data = image((2, 3, 7, 6), 9)["x"]
    graph = Graph()
    x = graph.input("x", data.shape)
    graph.output("max", MaxPool2d(3, 2, 1)(x))
    graph.output("avg", AvgPool2d(2, ceil_mode=True, count_include_pad=False)(x))
    graph.output("adaptive", AdaptiveAvgPool2d((2, 3))(x))
    got = build(graph, device="cpu").run({"x": data})
    t = torch.from_numpy(data)
    np.testing.assert_array_equal(got["max"], torch.nn.MaxPool2d(3, 2, 1)(t).numpy())
    avg = torch.nn.AvgPool2d(2, ceil_mode=True, count_include_pad=False)(t).numpy()
    np.testing.assert_allclose(got["avg"], avg, rtol=1e-6, atol=1e-6)
    adaptive = torch.nn.AdaptiveAvgPool2d((2, 3))(t).numpy()
    np.testing.assert_allclose(got["adaptive"], adaptive, rtol=1e-6, atol=1e-6)


# -- errors ----------------------------------------------------------------------------------------


def x_of(shape):
    return Graph().input("x", shape)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: F.max_pool2d(x_of((1, 1, 4, 4)), 3, padding=2),
            r"padding \[2, 2\] must be at most",
        ),
        (lambda: F.max_pool2d(x_of((1, 1, 2, 2)), 3), r"max_pool2d: the window.*larger than the"),
        (lambda: F.max_pool2d(x_of((1, 1, 4, 4)), 2, stride=0), r"max_pool2d: stride must be >= 1"),
        (lambda: F.max_pool2d(x_of((1, 1, 4, 4)), 0), r"max_pool2d: kernel_size must be >= 1"),
        (lambda: F.max_pool2d(x_of((4, 4)), 2), r"max_pool2d: input must be \[N, C, H, W\]"),
        (lambda: F.avg_pool2d(x_of((1, 1, 4, 4)), 2, divisor_override=-1), r"divisor_override"),
        (lambda: F.adaptive_avg_pool2d(x_of((1, 1, 4, 4)), (1, 2, 3)), r"output_size must be"),
        (lambda: F.adaptive_avg_pool2d(x_of((1, 1, 4, 4)), 0), r"output_size must be >= 1"),
        (lambda: F.interpolate(x_of((1, 1, 4, 4))), r"exactly one of size and scale_factor"),
        (lambda: F.interpolate(x_of((1, 1, 4, 4)), 3, mode="bicubic"), r"'nearest' or 'bilinear'"),
        (lambda: F.interpolate(x_of((1, 1, 4, 4)), 3, align_corners=True), r"align_corners"),
        (lambda: F.interpolate(x_of((1, 1, 4, 4)), scale_factor=0.1), r"empty output \[0, 0\]"),
        (lambda: F.interpolate(x_of((1, 4, 4)), 3), r"input must be 4-D"),
        (lambda: F.pixel_shuffle(x_of((1, 6, 2, 2)), 2), r"channels divisible by.*= 4"),
        (lambda: F.pixel_unshuffle(x_of((1, 1, 5, 4)), 2), r"divisible by downscale_factor = 2"),
        (lambda: F.pixel_shuffle(x_of((1, 4, 2, 2)), 0), r"factor must be a positive int, got 0"),
    ],
)
def test_pool_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("device", ["cpu", pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe)])
def test_max_pool2d_window_wholly_in_padding_passes_no_gradient(device):
    # Dilation 2 over a height of 1 with padding 1: the window's taps are rows -1 and 1, so
    # its maximum is -inf (exp makes it 0) and it gives the input no gradient.
    attrs = dict(kernel_size=(2, 1), stride=(1, 1), padding=(1, 0), dilation=(2, 1))
    check_op(
        device,
        image((1, 1, 1, 3)),
        lambda x: F.max_pool2d(x, **attrs).exp(),
        lambda x: TF.max_pool2d(x, **attrs).exp(),
    )
