"""Computed operands: a matmul, quantized matmul or attention reads an input that is neither a
buffer nor an affine view of one (SwiGLU, a transpose merged into rows, RoPE) through a
function evaluating it as it loads, instead of a launch storing it first."""

import math

import numpy as np
import pytest
import torch

import meganeura.functional as F
from meganeura import Graph, build, grad
from meganeura.lower.plan import COMPUTED_EVALUATIONS, plan
from meganeura.ops.quant import quantized_matmul, quantized_parameter
from tests.test_attention import forward_kernel
from tests.test_quant import quantized

LAVAPIPE = pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe)
DEVICES = ["cpu", LAVAPIPE]


def _kernel_ops(graph: Graph, roots) -> list[str]:
    return [
        graph.nodes[k.node if k.core is None else k.core].op for k in plan(graph, roots, {}).kernels
    ]


def _swiglu_graph(rows: int, hidden: int, out: int, also_store: bool = False):
    g = Graph()
    gate, up = g.input("gate", (rows, hidden)), g.input("up", (rows, hidden))
    w = g.input("w", (out, hidden))
    h = F.swiglu(gate, up)
    y = g.output("y", h @ w.T)
    if also_store:
        g.output("h", h)
    return g, y


def test_a_single_reader_swiglu_is_computed_by_the_matmul():
    g, y = _swiglu_graph(3, 40, 7)
    assert _kernel_ops(g, [y.id]) == ["matmul"]
    g, y = _swiglu_graph(3, 40, 7, also_store=True)  # stored anyway: read from its buffer
    assert sorted(_kernel_ops(g, [y.id, g.outputs["h"]])) == ["matmul", "swiglu"]


def test_computed_operands_are_few_rows_cheap_to_reevaluate():
    # Products of more rows load A in tiles of vec4s: there, A is stored first.
    g, y = _swiglu_graph(9, 40, 7)
    assert sorted(_kernel_ops(g, [y.id])) == ["matmul", "swiglu"]
    # Each GEMV workgroup (two output columns) evaluates the rows again.
    rows, hidden = 8, 4096
    out = 2 * math.ceil(COMPUTED_EVALUATIONS / (rows * hidden)) + 2
    g, y = _swiglu_graph(rows, hidden, out)
    assert sorted(_kernel_ops(g, [y.id])) == ["matmul", "swiglu"]
    g, y = _swiglu_graph(rows, hidden, out - 4)
    assert _kernel_ops(g, [y.id]) == ["matmul"]


def test_heads_merged_back_into_rows_are_read_in_place_by_the_projection():
    # [B, H, T, D] -> [B, T, H * D] is no affine view of the buffer: computed, not copied.
    g = Graph()
    x = g.input("x", (1, 3, 5, 8))
    w = g.input("w", (6, 24))
    y = g.output("y", x.permute(0, 2, 1, 3).reshape(1, 5, 24) @ w.T)
    assert _kernel_ops(g, [y.id]) == ["matmul"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("rows", "hidden", "out"),
    # one row and a few (GEMV), tiles with rows and columns past a tile's multiple
    [(1, 40, 7), (3, 33, 50), (37, 20, 70)],
)
def test_matmul_with_computed_operands_matches_torch(device, rows, hidden, out):
    g = Graph()
    gate, up = g.input("gate", (rows, hidden)), g.input("up", (rows, hidden))
    x = g.input("x", (2, rows, 5))  # merged to [rows, 10] through a transpose
    w, v = g.input("w", (out, hidden)), g.input("v", (10, out))
    g.output("y", F.swiglu(gate, up) @ w.T)
    g.output("z", x.permute(1, 0, 2).reshape(rows, 10) @ v)
    rng = np.random.default_rng(rows)
    feeds = {
        "gate": rng.normal(size=(rows, hidden)),
        "up": rng.normal(size=(rows, hidden)),
        "x": rng.normal(size=(2, rows, 5)),
        "w": rng.normal(size=(out, hidden)),
        "v": rng.normal(size=(10, out)),
    }
    feeds = {k: a.astype(np.float32) for k, a in feeds.items()}
    got = build(g, device=device).run(feeds)
    t = {k: torch.tensor(a) for k, a in feeds.items()}
    want_y = torch.nn.functional.silu(t["gate"]) * t["up"] @ t["w"].T
    want_z = t["x"].permute(1, 0, 2).reshape(rows, 10) @ t["v"]
    np.testing.assert_allclose(got["y"], want_y.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["z"], want_z.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_training_through_a_swiglu_projection_matches_torch(device):
    # In training SwiGLU's value is read again by the weight gradient: stored, and the
    # gradients are those of the plain graph.
    rows, hidden, out = 5, 12, 7
    rng = np.random.default_rng(0)
    data = {
        n: rng.normal(size=s).astype(np.float32)
        for n, s in (("gate", (rows, hidden)), ("up", (rows, hidden)), ("w", (out, hidden)))
    }
    g = Graph()
    gate, up = g.input("gate", (rows, hidden)), g.input("up", (rows, hidden))
    w = g.parameter("w", (out, hidden), init=data["w"])
    loss = ((F.swiglu(gate, up) @ w.T) ** 2).sum()
    for name, d in zip(("dgate", "dup", "dw"), grad(loss, [gate, up, w]), strict=True):
        g.output(name, d)
    got = build(g, device=device).run({"gate": data["gate"], "up": data["up"]})
    t = {k: torch.tensor(a, requires_grad=True) for k, a in data.items()}
    ((torch.nn.functional.silu(t["gate"]) * t["up"] @ t["w"].T) ** 2).sum().backward()
    for name, key in (("dgate", "gate"), ("dup", "up"), ("dw", "w")):
        np.testing.assert_allclose(got[name], t[key].grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [1, 3])
def test_quantized_matmul_with_a_computed_input_matches_dequantized(device, rows):
    weight = quantized(9, 64, "Q4_1")
    g = Graph()
    gate, up = g.input("gate", (rows, 64)), g.input("up", (rows, 64))
    w = quantized_parameter(g, "w", weight)
    y = g.output("y", quantized_matmul(F.swiglu(gate, up), w))
    assert _kernel_ops(g, [y.id]) == ["quantized_matmul"]
    rng = np.random.default_rng(2)
    a, b = (rng.normal(size=(rows, 64)).astype(np.float32) for _ in range(2))
    got = build(g, device=device).run({"gate": a, "up": b})["y"]
    h = a / (1 + np.exp(-a.astype(np.float64))) * b
    np.testing.assert_allclose(got, h @ weight.dequantize().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("device", "forward"),
    [
        ("cpu", None),
        *(
            pytest.param("vulkan-cpu", f, marks=pytest.mark.lavapipe)
            for f in ("blocks", "rows", "rows_split")
        ),
    ],
)
@pytest.mark.parametrize("tq", [1, 5])
def test_attention_reads_rope_queries_as_it_stages_them(device, forward, tq):
    B, Hq, Hkv, Tk, D = 1, 4, 2, 9, 8
    rng = np.random.default_rng(tq)
    q = rng.normal(size=(B, tq, Hq * D)).astype(np.float32)
    k = rng.normal(size=(B, Hkv, Tk, D)).astype(np.float32)
    v = rng.normal(size=(B, Hkv, Tk, D)).astype(np.float32)
    positions = np.arange(Tk - tq, Tk, dtype=np.int32)
    g = Graph()
    tqn, tkn, tvn = g.input("q", q.shape), g.input("k", k.shape), g.input("v", v.shape)
    pos = g.input("pos", (tq,), "i32")
    heads = F.rope(tqn.reshape(B, tq, Hq, D).permute(0, 2, 1, 3), pos, 10000.0)
    out = g.output("out", F.scaled_dot_product_attention(heads, tkn, tvn, is_causal=True))
    assert "rope" not in _kernel_ops(g, [out.id])
    with forward_kernel(forward):
        got = build(g, device=device).run({"q": q, "k": k, "v": v, "pos": positions})["out"]
    # The reference: HF's half-split RoPE, then attention with the queries last in line.
    inv = 1.0 / 10000.0 ** (np.arange(0, D, 2) / D)
    angle = positions[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([angle] * 2, -1)), np.sin(np.concatenate([angle] * 2, -1))
    x = q.reshape(B, tq, Hq, D).transpose(0, 2, 1, 3).astype(np.float64)
    rotated = np.concatenate([-x[..., D // 2 :], x[..., : D // 2]], -1)
    qr = torch.tensor(x * cos + rotated * sin, dtype=torch.float32)
    kk, vv = (torch.tensor(a).repeat_interleave(Hq // Hkv, 1) for a in (k, v))
    visible = torch.arange(tq)[:, None] + (Tk - tq) >= torch.arange(Tk)[None, :]
    want = torch.nn.functional.scaled_dot_product_attention(qr, kk, vv, attn_mask=visible)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
