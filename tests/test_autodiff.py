"""Every VJP rule against central finite differences, and the behaviour of `grad` itself.

Finite differences run in float64 through the ops' NumPy references (tests/harness.py,
`check_finite_differences`): the op sits mid-graph, inputs have a batch dimension and the
loss contracts the op's output with a random upstream gradient.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import meganeura as mn
from meganeura import functional as mf
from meganeura.ops import all_ops
from tests.harness import (
    away_from_zero,
    check_against_torch,
    check_finite_differences,
    normal,
    op_graph,
    uniform,
)


def positive(rng, shape):
    return uniform(rng, shape, 0.5, 2.0)


def labels_with_ignored(rng, shape, classes):
    labels = rng.integers(0, classes, shape).astype(np.int32)
    labels.flat[0] = -100
    return labels


def indices(rng, shape, size):
    return rng.integers(0, size, shape).astype(np.int32)


def layer_norm(x):
    centered = x - x.mean(-1, keepdims=True)
    return centered * ((centered * centered).mean(-1, keepdims=True) + 1e-5).rsqrt()


def mm(trans_a, trans_b):
    return lambda a, b: a.graph.apply("matmul", [a, b], trans_a=trans_a, trans_b=trans_b)


# name: (fn, {input: (sampler, shape)}, options for check_finite_differences)
FD_CASES = {
    "add": (lambda a, b: a + b, {"a": (normal, (2, 1, 3)), "b": (normal, (4, 3))}, {}),
    "sub": (lambda a, b: a - b, {"a": (normal, (3,)), "b": (normal, (2, 3))}, {}),
    "mul": (lambda a, b: a * b, {"a": (normal, (2, 3)), "b": (normal, (2, 1))}, {}),
    "div": (lambda a, b: a / b, {"a": (normal, (2, 3)), "b": (away_from_zero, (3,))}, {}),
    "pow": (lambda a, b: a**b, {"a": (positive, (2, 3)), "b": (normal, (2, 1))}, {}),
    "maximum": (mf.maximum, {"a": (normal, (3, 4)), "b": (normal, (4,))}, {}),
    "minimum": (mf.minimum, {"a": (normal, (3, 1)), "b": (normal, (3, 4))}, {}),
    "neg": (lambda x: -x, {"x": (normal, (2, 3))}, {}),
    "exp": (mf.exp, {"x": (normal, (2, 3))}, {}),
    "log": (mf.log, {"x": (positive, (2, 3))}, {}),
    "sqrt": (mf.sqrt, {"x": (positive, (2, 3))}, {}),
    "rsqrt": (lambda x: x.rsqrt(), {"x": (positive, (2, 3))}, {}),
    "abs": (lambda x: x.abs(), {"x": (away_from_zero, (2, 3))}, {}),
    "relu": (mf.relu, {"x": (away_from_zero, (2, 5))}, {}),
    "sigmoid": (mf.sigmoid, {"x": (normal, (2, 3))}, {}),
    "tanh": (mf.tanh, {"x": (normal, (2, 3))}, {}),
    "gelu": (mf.gelu, {"x": (normal, (2, 5))}, {}),
    "gelu_tanh": (lambda x: mf.gelu(x, "tanh"), {"x": (normal, (2, 5))}, {}),
    "where": (
        lambda a, b: mf.where(a > b, a * a, b),
        {"a": (normal, (2, 4)), "b": (normal, (4,))},
        {},
    ),
    "cast": (lambda x: x.astype("f32") * x, {"x": (normal, (2, 3))}, {}),
    # A matmul's loss is linear in each operand, so central differences are exact for any
    # step; a large one keeps the reference's float32 accumulation out of the quotient.
    "matmul": (lambda a, b: a @ b, {"a": (normal, (2, 3, 4)), "b": (normal, (4, 5))}, {"eps": 1.0}),
    "matmul_ta": (mm(True, False), {"a": (normal, (4, 3)), "b": (normal, (2, 4, 5))}, {"eps": 1.0}),
    "matmul_tb": (mm(False, True), {"a": (normal, (2, 3, 4)), "b": (normal, (5, 4))}, {"eps": 1.0}),
    "matmul_tab": (mm(True, True), {"a": (normal, (2, 4, 3)), "b": (normal, (5, 4))}, {"eps": 1.0}),
    "matmul_vector": (
        lambda a, b: a @ b,
        {"a": (normal, (4,)), "b": (normal, (2, 4, 3))},
        {"eps": 1.0},
    ),
    "permute": (lambda x: x.permute(2, 0, 1).exp(), {"x": (normal, (2, 3, 4))}, {}),
    "reshape": (lambda x: x.reshape(3, -1).tanh(), {"x": (normal, (2, 3, 2))}, {}),
    "broadcast_to": (lambda x: x.broadcast_to((2, 3, 4)).tanh(), {"x": (normal, (3, 1))}, {}),
    "sum": (lambda x: x.sum((0, 2), keepdims=True).tanh(), {"x": (normal, (2, 3, 4))}, {}),
    "mean": (lambda x: x.mean(-1).tanh(), {"x": (normal, (2, 3, 4))}, {}),
    "max": (lambda x: x.max(1), {"x": (normal, (2, 5, 3))}, {}),
    "max_all": (lambda x: x.max(), {"x": (normal, (3, 4))}, {}),
    "softmax": (lambda x: x.softmax(0), {"x": (normal, (3, 4))}, {}),
    "log_softmax": (lambda x: x.log_softmax(-1), {"x": (normal, (2, 5))}, {}),
    "cross_entropy": (
        lambda logits, labels: mf.cross_entropy(logits, labels),
        {"logits": (normal, (5, 4)), "labels": (lambda r, s: labels_with_ignored(r, s, 4), (5,))},
        {},
    ),
    "cross_entropy_rows": (
        lambda logits, labels: mf.cross_entropy(logits, labels, reduction="none"),
        {
            "logits": (normal, (2, 3, 4)),
            "labels": (lambda r, s: labels_with_ignored(r, s, 4), (2, 3)),
        },
        {},
    ),
    "mse_loss": (mf.mse_loss, {"input": (normal, (3, 4)), "target": (normal, (3, 4))}, {}),
    "layer_norm": (layer_norm, {"x": (normal, (3, 5))}, {}),
    "silu": (mf.silu, {"x": (normal, (2, 3))}, {}),
    "swiglu": (mf.swiglu, {"gate": (normal, (2, 3)), "up": (normal, (3,))}, {}),
    "softplus": (lambda x: mf.softplus(x, 2.0, 1.0), {"x": (normal, (2, 5))}, {}),
    "clamp": (lambda x: mf.clamp(x, -0.5, 0.5), {"x": (normal, (3, 3))}, {}),
    "sin": (mf.sin, {"x": (normal, (2, 3))}, {}),
    "cos": (mf.cos, {"x": (normal, (2, 3))}, {}),
    "erf": (mf.erf, {"x": (normal, (2, 3))}, {}),
    "slice": (lambda x: x[1:, ::2], {"x": (normal, (3, 5))}, {}),
    "flip": (lambda x: x.flip(1), {"x": (normal, (2, 3))}, {}),
    "pad": (lambda x: mf.pad(x, (1, -1, 2, 0), value=3.0), {"x": (normal, (2, 3))}, {}),
    "concat": (lambda a, b: mf.cat([a, b], 1), {"a": (normal, (2, 1)), "b": (normal, (2, 3))}, {}),
    "tile": (lambda x: x.repeat(2, 3), {"x": (normal, (2, 2))}, {}),
    "gather": (
        lambda x, index: x.gather(1, index),
        {"x": (normal, (2, 3)), "index": (lambda r, s: indices(r, s, 3), (2, 4))},
        {},
    ),
    "index_select": (
        lambda x, index: x.index_select(0, index),
        {"x": (normal, (3, 2)), "index": (lambda r, s: indices(r, s, 3), (5,))},
        {},
    ),
    "embedding": (
        mf.embedding,
        {"table": (normal, (4, 3)), "ids": (lambda r, s: indices(r, s, 4), (2, 3))},
        {},
    ),
    # The gradients of gather and index_select have VJPs of their own.
    "scatter_add": (
        lambda src, index: src.graph.apply("scatter_add", [src, index], axis=1, shape=(2, 3)),
        {"src": (normal, (2, 4)), "index": (lambda r, s: indices(r, s, 3), (2, 4))},
        {},
    ),
    "index_add": (
        lambda src, index: src.graph.apply("index_add", [src, index], axis=0, size=3),
        {"src": (normal, (4, 2)), "index": (lambda r, s: indices(r, s, 3), (4,))},
        {},
    ),
    "rms_norm": (
        lambda x, w: mf.rms_norm(x, w, 1e-5),
        {"x": (normal, (3, 4)), "w": (normal, (4,))},
        {},
    ),
    "layer_norm_op": (
        mf.layer_norm,
        {"x": (normal, (3, 4)), "weight": (normal, (4,)), "bias": (normal, (4,))},
        {},
    ),
    "rope": (
        lambda x, positions: mf.rope(x, positions, rotary_dim=4, interleaved=True),
        {"x": (normal, (1, 2, 3, 6)), "positions": (lambda r, s: indices(r, s, 9), (3,))},
        {},
    ),
}

# Ops whose VJP is zero almost everywhere (the rule returns no gradient).
ZERO_GRADIENT_OPS = {"lt", "le", "gt", "ge", "eq", "ne", "sign"}


def case_arrays(name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return {key: sample(rng, shape) for key, (sample, shape) in FD_CASES[name][1].items()}


@pytest.mark.parametrize("name", FD_CASES)
def test_vjp_matches_finite_differences(name):
    fn, _, options = FD_CASES[name]
    check_finite_differences(fn, case_arrays(name), **options)


def test_finite_difference_cases_cover_every_vjp():
    covered = set()
    for name, (fn, _, _) in FD_CASES.items():
        opg = op_graph(fn, case_arrays(name))
        covered |= {node.op for node in opg.graph.nodes[: opg.out.id + 1]}
    # The core families; each other family's test module checks its own coverage.
    modules = tuple(
        f"meganeura.ops.{m}" for m in ("elementwise", "linalg", "nn", "reduce", "shape")
    )
    with_vjp = {
        name
        for name, op in all_ops().items()
        if op.vjp is not None and op.vjp.__module__ in modules
    }
    assert with_vjp - ZERO_GRADIENT_OPS - covered == set()


def test_finite_differences_catch_a_wrong_vjp(monkeypatch):
    op = all_ops()["tanh"]
    monkeypatch.setattr(op, "vjp", lambda g, x, out, attrs: [g * (1.0 - out)])
    with pytest.raises(AssertionError, match="gradient of 'x'"):
        check_finite_differences(mf.tanh, {"x": normal(np.random.default_rng(0), (2, 3))})


# -- grad itself ------------------------------------------------------------------------------


@pytest.mark.parametrize("check", ["torch", "finite-differences"])
def test_gradient_accumulates_when_a_tensor_is_used_more_than_once(check):
    rng = np.random.default_rng(1)
    arrays = {"x": normal(rng, (2, 3)), "y": normal(rng, (3,))}

    def fn(x, y):
        return x * x + x.exp() * y + (x + x) - (y / (x * x + 1.0))

    if check == "torch":
        check_against_torch(fn, arrays, "cpu")
    else:
        check_finite_differences(fn, arrays)


def test_unused_tensors_get_zero_gradients():
    graph = mn.Graph()
    x = graph.input("x", (2, 3))
    w = graph.parameter("w", (3, 4), init="normal")
    unused = graph.parameter("unused", (5, 1), init="normal")
    scalar = graph.parameter("scalar", (), init="normal")
    unused_input = graph.input("unused_input", (2,), "f32")
    loss = (x @ w).tanh().sum()
    grads = mn.grad(loss, [w, unused, scalar, unused_input])
    for name, g in zip(["w", "unused", "scalar", "unused_input"], grads, strict=True):
        graph.output(f"grad_{name}", g)
    values = mn.build(graph, device="cpu").run({"x": np.ones((2, 3), np.float32)})
    assert np.any(values["grad_w"] != 0)
    for name, shape in [("unused", (5, 1)), ("scalar", ()), ("unused_input", (2,))]:
        assert values[f"grad_{name}"].shape == shape
        assert values[f"grad_{name}"].dtype == np.float32
        np.testing.assert_array_equal(values[f"grad_{name}"], 0.0)


def test_gradient_of_a_tensor_built_after_the_loss_is_zero():
    graph = mn.Graph()
    x = graph.input("x", (3,))
    loss = x.exp().sum()
    later = x * 2.0
    (g,) = mn.grad(loss, [later])
    graph.output("g", g)
    np.testing.assert_array_equal(mn.build(graph, device="cpu").run({})["g"], np.zeros(3))


def test_gradient_with_respect_to_an_intermediate_tensor():
    rng = np.random.default_rng(2)
    x_value = normal(rng, (2, 4))
    graph = mn.Graph()
    x = graph.input("x", (2, 4))
    hidden = x.tanh()
    loss = (hidden * hidden.exp()).sum()
    g_hidden, g_x = mn.grad(loss, [hidden, x])
    graph.output("g_hidden", g_hidden)
    graph.output("g_x", g_x)
    values = mn.build(graph, device="cpu").run({"x": x_value})

    xt = torch.tensor(x_value, dtype=torch.float64, requires_grad=True)
    ht = xt.tanh()
    ht.retain_grad()
    (ht * ht.exp()).sum().backward()
    np.testing.assert_allclose(values["g_hidden"], ht.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values["g_x"], xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_seed_is_the_upstream_gradient_of_a_non_scalar_loss():
    rng = np.random.default_rng(3)
    x_value, seed_value = normal(rng, (3, 4)), normal(rng, (3,))
    graph = mn.Graph()
    x = graph.input("x", (3, 4))
    seed = graph.input("seed", (3,))
    (g,) = mn.grad(x.sigmoid().sum(-1), [x], seed=seed)
    graph.output("g", g)
    values = mn.build(graph, device="cpu").run({"x": x_value, "seed": seed_value})

    xt = torch.tensor(x_value, dtype=torch.float64, requires_grad=True)
    xt.sigmoid().sum(-1).backward(torch.tensor(seed_value, dtype=torch.float64))
    np.testing.assert_allclose(values["g"], xt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_second_order_gradients_match_torch():
    rng = np.random.default_rng(4)
    x_value, y_value, v_value = normal(rng, (2, 3)), normal(rng, (3,)), normal(rng, (2, 3))
    graph = mn.Graph()
    x, y, v = graph.input("x", (2, 3)), graph.input("y", (3,)), graph.input("v", (2, 3))
    (gx,) = mn.grad((x.tanh() * y + x * x * x).sum(), [x])
    ggx, ggy = mn.grad((gx * v).sum(), [x, y])
    graph.output("ggx", ggx)
    graph.output("ggy", ggy)
    values = mn.build(graph, device="cpu").run({"x": x_value, "y": y_value, "v": v_value})

    xt = torch.tensor(x_value, dtype=torch.float64, requires_grad=True)
    yt = torch.tensor(y_value, dtype=torch.float64, requires_grad=True)
    (gxt,) = torch.autograd.grad((xt.tanh() * yt + xt**3).sum(), [xt], create_graph=True)
    (gxt * torch.tensor(v_value, dtype=torch.float64)).sum().backward()
    np.testing.assert_allclose(values["ggx"], xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(values["ggy"], yt.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_gradients_with_respect_to_parameters_match_torch():
    rng = np.random.default_rng(5)
    w_value, b_value = normal(rng, (5, 3)), normal(rng, (3,))
    x_value, target = normal(rng, (4, 5)), normal(rng, (4, 3))
    graph = mn.Graph()
    x, t = graph.input("x", (4, 5)), graph.input("target", (4, 3))
    w = graph.parameter("w", (5, 3), init=w_value)
    b = graph.parameter("b", (3,), init=b_value)
    loss = mf.mse_loss(mf.gelu(x @ w + b), t)
    gw, gb = mn.grad(loss, [w, b])
    graph.output("gw", gw)
    graph.output("gb", gb)
    values = mn.build(graph, device="cpu").run({"x": x_value, "target": target})

    wt = torch.tensor(w_value, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b_value, dtype=torch.float64, requires_grad=True)
    xt, tt = torch.tensor(x_value, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    torch.nn.functional.mse_loss(torch.nn.functional.gelu(xt @ wt + bt), tt).backward()
    np.testing.assert_allclose(values["gw"], wt.grad.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(values["gb"], bt.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_grad_of_a_non_scalar_loss_needs_a_seed():
    graph = mn.Graph()
    x = graph.input("x", (2, 3))
    with pytest.raises(ValueError, match=r"loss must be a scalar, got shape \[2, 3\].*seed"):
        mn.grad(x.exp(), [x])


def test_grad_rejects_a_seed_of_the_wrong_shape():
    graph = mn.Graph()
    x = graph.input("x", (2, 3))
    seed = graph.input("seed", (3,))
    with pytest.raises(ValueError, match=r"seed \[3\] must match loss \[2, 3\]"):
        mn.grad(x.exp(), [x], seed=seed)


def test_grad_names_an_op_without_a_vjp():
    graph = mn.Graph()
    x = graph.input("x", (3,))
    (g,) = mn.grad(mf.gelu(x).sum(), [x])
    with pytest.raises(NotImplementedError, match="gelu_grad"):
        mn.grad(g.sum(), [x])
