"""Convolutions against torch.nn.functional: forward and gradients, the op mid-graph, on the
NumPy executor and on lavapipe; argument errors; the conv layers; a small CNN trained with SGD
step for step against PyTorch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from meganeura import Graph, build, grad, optim
from meganeura import functional as F
from meganeura.backends.wgsl.kernels import generate
from meganeura.lower.plan import plan
from meganeura.nn import Conv1d, Conv2d, ConvTranspose2d, Flatten, Linear, MaxPool2d
from tests.torch_parity import check_op

DEVICES = ["cpu", pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe)]


def lavapipe(*values):
    return pytest.param(*values, marks=pytest.mark.lavapipe)


def arrays(seed: int, **shapes) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in shapes.items()}


# -- conv2d -----------------------------------------------------------------------------------

# (N, C, H, W, O, kernel, stride, padding, dilation, groups, bias)
CONV2D = [
    (1, 1, 1, 1, 1, 1, 1, 0, 1, 1, False),
    (1, 1, 5, 5, 1, 3, 1, 0, 1, 1, False),
    (2, 3, 7, 9, 5, (3, 2), (2, 1), (1, 0), (1, 2), 1, True),
    (2, 4, 8, 8, 6, 3, 1, "same", 1, 2, True),
    (1, 2, 4, 6, 3, 2, 1, "same", (1, 2), 1, True),
    (3, 6, 9, 7, 6, 3, 2, 1, 1, 6, True),
    (2, 6, 9, 7, 12, 3, 2, 1, 1, 6, False),
    (1, 3, 6, 6, 4, (2, 4), 3, "valid", 1, 1, True),
    (2, 2, 10, 11, 70, 3, (2, 3), (2, 1), (2, 1), 1, True),
    (2, 4, 5, 5, 4, 5, 1, 2, 1, 1, True),
    (5, 3, 3, 3, 2, 1, 1, 0, 1, 1, True),
    (2, 3, 8, 7, 4, 2, 2, 0, 1, 1, False),
    (1, 40, 5, 4, 3, 3, 1, 1, 1, 1, True),
]
CONV2D_LAVAPIPE = [CONV2D[5], CONV2D[8]]


def conv2d_case(case, device, seed=0):
    n, c, h, w, o, kernel, stride, padding, dilation, groups, bias = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    shapes = {"x": (n, c, h, w), "w": (o, c // groups, kh, kw)}
    if bias:
        shapes["b"] = (o,)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_op(
        device,
        arrays(seed, **shapes),
        lambda x, w, b=None: F.conv2d(x, w, b, **geometry),
        lambda x, w, b=None: TF.conv2d(x, w, b, **geometry),
    )


@pytest.mark.parametrize("case", CONV2D)
def test_conv2d_cpu(case):
    conv2d_case(case, "cpu")


@pytest.mark.lavapipe
@pytest.mark.parametrize("case", CONV2D_LAVAPIPE)
def test_conv2d_lavapipe(case):
    conv2d_case(case, "vulkan-cpu")


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 3),
    groups=st.integers(1, 3),
    cg=st.integers(1, 3),
    og=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv2d_hypothesis(n, groups, cg, og, h, w, kh, kw, stride, padding, dilation, bias, seed):
    for size, k, p, d in zip((h, w), (kh, kw), padding, dilation, strict=True):
        assume(size + 2 * p >= d * (k - 1) + 1)
    case = (n, groups * cg, h, w, groups * og, (kh, kw), stride, padding, dilation, groups, bias)
    conv2d_case(case, "cpu", seed)


# -- conv1d -----------------------------------------------------------------------------------

# (N, C, L, O, kernel, stride, padding, dilation, groups, bias)
CONV1D = [
    (1, 1, 1, 1, 1, 1, 0, 1, 1, False),
    (2, 3, 11, 4, 3, 2, 1, 1, 1, True),
    (3, 4, 9, 8, 4, 1, "same", 2, 2, True),
    (2, 5, 13, 5, 5, 3, 2, 1, 5, False),
]


@pytest.mark.parametrize(
    "case, device", [(case, "cpu") for case in CONV1D] + [lavapipe(CONV1D[1], "vulkan-cpu")]
)
def test_conv1d(case, device):
    n, c, length, o, k, stride, padding, dilation, groups, bias = case
    shapes = {"x": (n, c, length), "w": (o, c // groups, k)}
    if bias:
        shapes["b"] = (o,)
    geometry = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    check_op(
        device,
        arrays(1, **shapes),
        lambda x, w, b=None: F.conv1d(x, w, b, **geometry),
        lambda x, w, b=None: TF.conv1d(x, w, b, **geometry),
    )


# -- conv_transpose2d -------------------------------------------------------------------------

# (N, C_in, H, W, C_out, kernel, stride, padding, output_padding, dilation, groups, bias)
CONV_TRANSPOSE2D = [
    (1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, False),
    (2, 3, 4, 5, 4, 3, 2, 1, 1, 1, 1, True),
    (2, 4, 5, 3, 6, (2, 3), (2, 3), (0, 1), (1, 2), 1, 2, True),
    (1, 2, 3, 4, 3, 3, 1, 2, 0, 2, 1, False),
    (2, 6, 4, 4, 6, 4, 3, 1, 2, 1, 6, True),
    (3, 2, 5, 5, 5, 2, 2, 0, 0, (2, 1), 1, True),
]


def conv_transpose2d_case(case, device):
    n, ci, h, w, co, kernel, stride, padding, output_padding, dilation, groups, bias = case
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    shapes = {"x": (n, ci, h, w), "w": (ci, co // groups, kh, kw)}
    if bias:
        shapes["b"] = (co,)
    geometry = dict(
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
    )
    check_op(
        device,
        arrays(2, **shapes),
        lambda x, w, b=None: F.conv_transpose2d(x, w, b, **geometry),
        lambda x, w, b=None: TF.conv_transpose2d(x, w, b, **geometry),
    )


@pytest.mark.parametrize("case", CONV_TRANSPOSE2D)
def test_conv_transpose2d_cpu(case):
    conv_transpose2d_case(case, "cpu")


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 2),
    groups=st.integers(1, 2),
    cg=st.integers(1, 3),
    og=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    output_padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    bias=st.booleans(),
)
def test_conv_transpose2d_hypothesis(
    n, groups, cg, og, h, w, kernel, stride, padding, output_padding, dilation, bias
):
    dims = zip((h, w), kernel, stride, padding, output_padding, dilation, strict=True)
    for size, k, s, p, e, d in dims:
        assume(e < max(s, d) and (size - 1) * s + d * (k - 1) + 1 + e - 2 * p >= 1)
    case = (n, groups * cg, h, w, groups * og, kernel, stride, padding, output_padding, dilation)
    conv_transpose2d_case((*case, groups, bias), "cpu")


@pytest.mark.lavapipe
@pytest.mark.parametrize("case", [CONV_TRANSPOSE2D[2]])
def test_conv_transpose2d_lavapipe(case):
    conv_transpose2d_case(case, "vulkan-cpu")


# -- the weight gradient summed over batch chunks -------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_weight_grad_splits_the_batch_into_chunks(device):
    """conv2d_weight_grad with splits=S gives the weight gradient of each of S batch chunks."""
    data = arrays(4, x=(6, 4, 7, 5), g=(6, 6, 4, 5))
    geometry = dict(stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2)
    graph = Graph()
    x, g = graph.input("x", data["x"].shape), graph.input("g", data["g"].shape)
    for splits in (1, 3):
        graph.output(
            f"dw{splits}",
            graph.apply(
                "conv2d_weight_grad", [x, g], kernel_size=(3, 2), splits=splits, **geometry
            ),
        )
    got = build(graph, device=device).run(data)
    chunks = []
    for part in range(3):
        tx = torch.tensor(data["x"][2 * part : 2 * part + 2], dtype=torch.float64)
        tg = torch.tensor(data["g"][2 * part : 2 * part + 2], dtype=torch.float64)
        tw = torch.zeros((6, 2, 3, 2), dtype=torch.float64, requires_grad=True)
        (TF.conv2d(tx, tw, **geometry) * tg).sum().backward()
        chunks.append(tw.grad.numpy())
    np.testing.assert_allclose(got["dw3"], np.stack(chunks), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["dw1"], sum(chunks), rtol=1e-5, atol=1e-5)


def test_large_batches_split_the_weight_gradient():
    graph = Graph()
    x, w = graph.input("x", (8, 2, 24, 24)), graph.input("w", (3, 2, 3, 3))
    grad(F.conv2d(x, w, padding=1).sum(), [w])
    (node,) = [n for n in graph.nodes if n.op == "conv2d_weight_grad"]
    assert node.attrs["splits"] == 4  # 8 * 24 * 24 pixels, about 1024 per chunk
    assert node.type.shape == (4, 3, 2, 3, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_with_split_weight_gradient(device):
    conv2d_case((4, 2, 24, 24, 3, 3, 1, 1, 1, 1, True), device)


# -- second order: the weight-gradient op's own VJP ----------------------------------------------


@pytest.mark.parametrize(
    "batch, side, device",
    [(2, 7, "cpu"), (8, 24, "cpu"), lavapipe(2, 7, "vulkan-cpu"), lavapipe(8, 24, "vulkan-cpu")],
)
def test_conv2d_double_backward(batch, side, device):
    """d/d(x, u) of <dL/dw, v>: exercises conv2d_weight_grad's VJP (a transposed conv and a
    conv, over batch chunks when the weight gradient is split), as a gradient penalty on a
    conv weight would."""
    shapes = dict(x=(batch, 4, side, side), w=(6, 2, 3, 2), u=(batch, 6, (side + 1) // 2, side))
    data = arrays(3, **shapes, v=(6, 2, 3, 2))
    geometry = dict(stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2)
    graph = Graph()
    x, w, u, v = (graph.input(name, a.shape) for name, a in data.items())
    (dw,) = grad((F.conv2d(x, w, **geometry) * u).sum(), [w])
    dx, du = grad((dw * v).sum(), [x, u])
    graph.output("dx", dx)
    graph.output("du", du)
    splits = [n.attrs["splits"] for n in graph.nodes if n.op == "conv2d_weight_grad"]
    assert splits == [1 if batch == 2 else 2]
    got = build(graph, device=device).run(data)

    tx, tw, tu = (torch.tensor(data[k], dtype=torch.float64, requires_grad=True) for k in "xwu")
    (tdw,) = torch.autograd.grad(
        (TF.conv2d(tx, tw, **geometry) * tu).sum(), [tw], create_graph=True
    )
    tdx, tdu = torch.autograd.grad(
        (tdw * torch.tensor(data["v"], dtype=torch.float64)).sum(), [tx, tu]
    )
    np.testing.assert_allclose(got["dx"], tdx.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["du"], tdu.numpy(), rtol=1e-4, atol=1e-4)


# -- lowering -------------------------------------------------------------------------------------


def test_conv_training_step_lowers_to_implicit_gemm_without_im2col():
    """Forward, input gradient and weight gradient are each one implicit-GEMM kernel, and no
    buffer the size of an im2col patch matrix is allocated."""
    graph = Graph()
    x = graph.input("x", (4, 8, 16, 16))
    w = graph.input("w", (16, 8, 3, 3))
    y = F.conv2d(x, w, padding=1)
    loss = (y * y).sum()
    dx, dw = grad(loss, [x, w])
    roots = [graph.output("dx", dx).id, graph.output("dw", dw).id]
    lowered = plan(graph, roots, {})
    ops = [graph.nodes[k.node].op for k in lowered.kernels]
    assert sorted(op for op in ops if "conv" in op) == [
        "conv2d",
        "conv2d_weight_grad",
        "conv_transpose2d",
    ]
    patches = 4 * 16 * 16 * 8 * 3 * 3 * 4  # bytes of an im2col matrix of x
    largest = max(b.nbytes for b in lowered.buffers if b.kind == "transient")
    assert largest < patches / 4
    for kernel in lowered.kernels:
        source = generate(lowered, kernel)
        if "conv" in graph.nodes[kernel.node].op:
            assert "var<workgroup> As" in source.wgsl  # tiled through workgroup memory


# -- errors ---------------------------------------------------------------------------------------


def conv_inputs(x_shape, w_shape):
    graph = Graph()
    return graph.input("x", x_shape), graph.input("w", w_shape)


@pytest.mark.parametrize(
    "x_shape, w_shape, kwargs, message",
    [
        ((1, 3, 4, 4), (2, 3, 5, 5), {}, r"conv2d: the kernel \[5, 5\].*larger than the padded"),
        ((1, 3, 4, 4), (2, 3, 3, 3), {"dilation": 2}, r"conv2d: the kernel.*dilation \[2, 2\]"),
        ((1, 3, 4, 4), (2, 1, 3, 3), {"groups": 2}, r"input channels \(3\).*groups \(2\)"),
        ((1, 4, 4, 4), (3, 2, 3, 3), {"groups": 2}, r"output channels.*\(3\).*groups \(2\)"),
        ((1, 4, 4, 4), (2, 3, 3, 3), {}, r"weight \[2, 3, 3, 3\] must have shape.*= 4"),
        ((1, 3, 4, 4), (2, 3, 3, 3), {"stride": 0}, r"conv2d: stride must be >= 1, got 0"),
        ((1, 3, 4, 4), (2, 3, 3, 3), {"stride": (1, -1)}, r"stride must be >= 1"),
        ((1, 3, 4, 4), (2, 3, 3, 3), {"padding": -1}, r"padding must be >= 0"),
        ((1, 3, 4, 4), (2, 3, 3, 3), {"padding": "full"}, r"'valid' or 'same', got 'full'"),
        ((1, 3, 4, 4), (2, 3, 3, 3), {"padding": "same", "stride": 2}, r"'same' needs stride 1"),
        ((1, 3, 4, 4), (2, 3, 3, 3), {"groups": 0}, r"groups must be a positive int, got 0"),
        ((3, 4, 4), (2, 3, 3), {}, r"conv2d: weight must be \[O, C / groups, kh, kw\]"),
        ((1, 1, 3, 4, 4), (2, 3, 3, 3), {}, r"conv2d: input must be \[N, C, H, W\]"),
    ],
)
def test_conv2d_errors(x_shape, w_shape, kwargs, message):
    x, w = conv_inputs(x_shape, w_shape)
    with pytest.raises(ValueError, match=message):
        F.conv2d(x, w, **kwargs)


def test_conv_errors_name_the_functional_op():
    x, w = conv_inputs((2, 3, 4), (2, 3, 5))
    with pytest.raises(ValueError, match=r"conv1d: the kernel \[5\]"):
        F.conv1d(x, w)
    x, w = conv_inputs((2, 4, 9), (4, 2, 3))
    with pytest.raises(ValueError, match=r"conv1d: input channels \(4\).*groups \(3\)"):
        F.conv1d(x, w, groups=3)
    x, w = conv_inputs((1, 3, 5, 5), (2, 3, 3, 3))
    b = x.graph.input("b", (3,))
    with pytest.raises(ValueError, match=r"conv2d: bias must have shape \[2\].*got \[3\]"):
        F.conv2d(x, w, b)
    x, w = conv_inputs((1, 3, 5, 5), (3, 2, 3, 3))
    with pytest.raises(
        ValueError, match=r"output_padding \[2, 2\] must be smaller than the stride"
    ):
        F.conv_transpose2d(x, w, stride=2, output_padding=2)
    x, w = conv_inputs((1, 3, 5, 5), (2, 2, 3, 3))
    with pytest.raises(
        ValueError, match=r"conv_transpose2d: weight \[2, 2, 3, 3\].*in_channels = 3"
    ):
        F.conv_transpose2d(x, w)
    x, w = conv_inputs((1, 3, 2, 2), (3, 2, 3, 3))
    with pytest.raises(ValueError, match=r"conv_transpose2d: output size \[-2, -2\]"):
        F.conv_transpose2d(x, w, padding=3)


# -- layers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, reference, shape",
    [
        (
            lambda g: Conv2d(g, "conv", 4, 6, 3, stride=2, padding=1, groups=2),
            torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
            (2, 4, 7, 8),
        ),
        (
            lambda g: Conv1d(g, "conv", 3, 5, 4, padding="same", bias=False),
            torch.nn.Conv1d(3, 5, 4, padding="same", bias=False),
            (2, 3, 9),
        ),
        (
            lambda g: ConvTranspose2d(g, "conv", 4, 6, 3, stride=2, padding=1, output_padding=1),
            torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1),
            (2, 4, 3, 5),
        ),
    ],
)
def test_conv_layers_match_torch(layer, reference, shape):
    graph = Graph()
    x = graph.input("x", shape)
    module = layer(graph)
    graph.output("y", module(x))
    session = build(graph, device="cpu", seed=4)
    params = session.parameters()
    state = reference.state_dict()
    assert sorted(params) == sorted(f"conv.{k}" for k in state)
    for name, value in state.items():
        ours = params[f"conv.{name}"]
        assert ours.shape == tuple(value.shape)
        # torch's default init: U(-b, b) with b = 1 / sqrt(fan_in), weight and bias alike.
        fan_in = (
            math.prod(value.shape[1:]) if name == "weight" else math.prod(state["weight"].shape[1:])
        )
        assert np.abs(ours).max() <= 1 / math.sqrt(fan_in) + 1e-7
        assert np.abs(ours).max() > 0.5 / math.sqrt(fan_in)
    reference.load_state_dict({k: torch.from_numpy(params[f"conv.{k}"]) for k in state})
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(
        session.run({"x": data})["y"],
        reference(torch.from_numpy(data)).detach().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )


def test_conv_layer_errors():
    graph = Graph()
    with pytest.raises(ValueError, match=r"Conv2d 'c': in_channels \(3\).*groups \(2\)"):
        Conv2d(graph, "c", 3, 4, 3, groups=2)
    with pytest.raises(ValueError, match=r"padding_mode='zeros'.*'reflect'"):
        Conv2d(graph, "d", 3, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match=r"Conv2d: kernel_size must be >= 1"):
        Conv2d(graph, "e", 3, 4, 0)


# -- a small CNN, trained ----------------------------------------------------------------------


class TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(TF.max_pool2d(TF.relu(self.conv(x)), 2).flatten(1))


@pytest.mark.parametrize("device", DEVICES)
def test_cnn_sgd_matches_torch(device):
    """conv2d -> relu -> max_pool2d -> linear on 8x8 images: five SGD steps give torch's
    parameters."""
    batch, steps = 16, 5
    graph = Graph()
    x = graph.input("x", (batch, 1, 8, 8))
    y = graph.input("y", (batch,), "i32")
    conv, fc = Conv2d(graph, "conv", 1, 6, 3, padding=1), Linear(graph, "fc", 96, 10)
    logits = fc(Flatten()(MaxPool2d(2)(F.relu(conv(x)))))
    session = build(graph, F.cross_entropy(logits, y), optim.SGD(lr=0.5, momentum=0.9), device)

    model = TorchCNN()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in session.parameters().items()})
    reference = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    rng = np.random.default_rng(5)
    for _ in range(steps):
        images = rng.uniform(0, 1, (batch, 1, 8, 8)).astype(np.float32)
        labels = rng.integers(0, 10, batch).astype(np.int32)
        session.step({"x": images, "y": labels})
        reference.zero_grad()
        TF.cross_entropy(
            model(torch.from_numpy(images)), torch.from_numpy(labels).long()
        ).backward()
        reference.step()
    for name, value in model.state_dict().items():
        ours = session.parameters()[name]
        np.testing.assert_allclose(
            ours, value.numpy(), rtol=1e-4, atol=1e-4 * np.abs(value.numpy()).max()
        )


@pytest.mark.parametrize("device", DEVICES)
def test_f16_storage_accumulates_in_f32(device):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 3, 7, 6)).astype(np.float16)
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float16)
    graph = Graph()
    y = F.conv2d(graph.input("x", x.shape, "f16"), graph.input("w", w.shape, "f16"), stride=2)
    graph.output("y", y)
    graph.output("pooled", F.max_pool2d(y, 2, ceil_mode=True))
    got = build(graph, device=device).run({"x": x, "w": w})
    want = TF.conv2d(torch.from_numpy(x).float(), torch.from_numpy(w).float(), stride=2)
    assert got["y"].dtype == np.float16
    np.testing.assert_allclose(got["y"], want.half().numpy(), rtol=1e-3, atol=1e-3)
    pooled = TF.max_pool2d(want.half().float(), 2, ceil_mode=True).half().numpy()
    np.testing.assert_array_equal(got["pooled"], pooled)
