"""Every model graph of the repository computes the same with and without the optimizer:
outputs, losses and (through the parameters after optimizer steps) gradients."""

from __future__ import annotations

import numpy as np
import pytest

from meganeura import Graph, build, nn, optim
from meganeura import functional as F
from meganeura.recipes import small_cnn
from tests.optimize_check import assert_same_values

OPTIMIZERS = [optim.SGD(lr=0.05, momentum=0.9), optim.AdamW(lr=1e-2, clip_grad_norm=1.0)]


def assert_training_parity(graph, loss, optimizer, batches, rtol=1e-4, atol=1e-5):
    plain = build(graph, loss, optimizer, device="cpu", seed=4, optimize=False)
    fused = build(graph, loss, optimizer, device="cpu", seed=4)
    assert_same_values(plain.parameters(), fused.parameters(), rtol=0, atol=0)
    for feeds in batches:
        assert_same_values(plain.run(feeds), fused.run(feeds), rtol, atol)
        plain.step(feeds)
        fused.step(feeds)
        np.testing.assert_allclose(fused.loss, plain.loss, rtol=rtol)
    assert_same_values(
        plain.parameters(include_state=True), fused.parameters(include_state=True), rtol, atol
    )
    return fused.optimize_report


def labelled(rng, shape, classes, batches=3):
    return [
        {
            "x": rng.standard_normal(shape).astype(np.float32),
            "y": rng.integers(0, classes, shape[0]).astype(np.int32),
        }
        for _ in range(batches)
    ]


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["sgd", "adamw"])
def test_mlp(optimizer):
    g = Graph()
    x, y = g.input("x", (5, 12)), g.input("y", (5,), "i32")
    logits = g.output("logits", nn.MLP(g, "mlp", [12, 16, 16, 4])(x))
    batches = labelled(np.random.default_rng(0), (5, 12), 4)
    report = assert_training_parity(g, F.cross_entropy(logits, y), optimizer, batches)
    assert report.kernels_after <= report.kernels_before


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["sgd", "adamw"])
def test_small_cnn(optimizer):
    g = Graph()
    x, y = g.input("x", (2, 1, 8, 8)), g.input("y", (2,), "i32")
    logits = g.output("logits", small_cnn(g, "cnn", (1, 8, 8), 3, channels=(3, 4))(x))
    batches = labelled(np.random.default_rng(1), (2, 1, 8, 8), 3)
    report = assert_training_parity(g, F.cross_entropy(logits, y), optimizer, batches)
    assert report.kernels_after <= report.kernels_before


def pre_norm_transformer(g: Graph, x, layers: int, dim: int, heads: int):
    """A transformer of the library's blocks: LayerNorm, attention from matmuls, GELU MLP."""
    batch, tokens, _ = x.shape
    d = dim // heads
    for i in range(layers):
        p = f"blocks.{i}"
        h = nn.LayerNorm(g, f"{p}.ln1", dim)(x)
        # No bias on k: its gradient is zero up to rounding (softmax ignores a shift of a
        # row), which Adam would blow up into updates of noise.
        q, k, v = (nn.Linear(g, f"{p}.{n}", dim, dim, bias=n != "k")(h) for n in "qkv")

        def split(t):
            return t.reshape(batch, tokens, heads, d).permute(0, 2, 1, 3)

        scores = (split(q) @ split(k).transpose(-1, -2)) * (d**-0.5)
        attn = (scores.softmax(-1) @ split(v)).permute(0, 2, 1, 3).reshape(batch, tokens, dim)
        x = x + nn.Linear(g, f"{p}.proj", dim, dim)(attn)
        h = nn.LayerNorm(g, f"{p}.ln2", dim)(x)
        x = x + nn.Linear(g, f"{p}.fc2", 2 * dim, dim)(
            nn.Linear(g, f"{p}.fc1", dim, 2 * dim)(h).gelu()
        )
    return x


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=["sgd", "adamw"])
def test_transformer_of_library_blocks(optimizer):
    g = Graph()
    x, y = g.input("x", (2, 5, 8)), g.input("y", (2, 5), "i32")
    h = pre_norm_transformer(g, x, layers=3, dim=8, heads=2)
    logits = g.output("logits", nn.Linear(g, "head", 8, 6)(h))
    rng = np.random.default_rng(2)
    batches = [
        {
            "x": rng.standard_normal((2, 5, 8)).astype(np.float32),
            "y": rng.integers(0, 6, (2, 5)).astype(np.int32),
        }
        for _ in range(3)
    ]
    report = assert_training_parity(g, F.cross_entropy(logits, y), optimizer, batches)
    assert report.fusions["concat_matmul"] == 2 * 3  # q, k and v share one matmul per layer
    assert report.kernels_after < report.kernels_before
