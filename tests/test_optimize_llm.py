"""The optimizer on SmolLM2-135M-sized graphs: time, fusions per layer, kernels per step.

Timings are measured here and printed (pytest -s shows them); the limits are the targets the
optimizer is held to on a 2-core CPU: a training graph in 5 s, an inference graph in 2 s.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from meganeura import build, optim
from meganeura.backends.wgsl.matmul import pairable as wgsl_pairable
from meganeura.session import build_report
from tests.llama_graphs import SMOLLM2_135M, TINY, decomposed_llama, fused_llama
from tests.optimize_check import assert_same_values

LAYERS = SMOLLM2_135M.num_hidden_layers


def timed_report(graph, loss=None, optimizer=None):
    start = time.perf_counter()
    report = build_report(graph, loss, optimizer)
    return report, time.perf_counter() - start


def test_decomposed_smollm2_training_graph():
    graph, loss = decomposed_llama(SMOLLM2_135M, batch=1, tokens=32)
    report, wall = timed_report(graph, loss, optim.AdamW(lr=1e-4))
    print(
        f"\ndecomposed SmolLM2-135M training step: optimized in {report.optimize_seconds:.2f} s "
        f"({wall:.2f} s with autodiff and counting), kernels {report.kernels_before} -> "
        f"{report.kernels_after}, fusions {report.fusions}"
    )
    assert report.optimize_seconds <= 5.0
    # Every layer: both norms, the rotary embedding of q and k (and its inverse in the
    # backward pass), SwiGLU (forward, and backward where its VJP multiplies by silu), q/k/v
    # in one matmul and gate/up in one; the final norm and the loss once.
    assert report.fusions["rms_norm"] == 2 * LAYERS + 1
    assert report.fusions["rope"] == 4 * LAYERS
    assert report.fusions["swiglu"] == 2 * LAYERS
    assert report.fusions["attention"] == LAYERS
    assert "softmax" not in report.fusions
    assert report.fusions["concat_matmul"] == 3 * LAYERS
    assert report.fusions["cross_entropy_rows"] == 1
    # The weight gradients read the normalized rows: every norm keeps its kernel.
    assert "rms_norm_matmul" not in report.fusions
    # 2185 -> 1152 when written (AdamW's moments and weight one kernel per parameter).
    assert report.kernels_after < report.kernels_before * 0.55


def test_decomposed_smollm2_inference_graph():
    graph, _ = decomposed_llama(SMOLLM2_135M, batch=1, tokens=32, train=False)
    report, wall = timed_report(graph)
    print(
        f"\ndecomposed SmolLM2-135M forward: optimized in {report.optimize_seconds:.2f} s "
        f"({wall:.2f} s with counting), kernels {report.kernels_before} -> "
        f"{report.kernels_after}, fusions {report.fusions}"
    )
    assert report.optimize_seconds <= 2.0
    # Every norm is read by one matmul alone, which normalizes its rows as it loads them.
    assert "rms_norm" not in report.fusions
    assert report.fusions["rms_norm_matmul"] == 2 * LAYERS + 1
    assert report.fusions["rope"] == 2 * LAYERS
    assert report.fusions["swiglu"] == LAYERS
    assert report.fusions["attention"] == LAYERS
    assert report.fusions["concat_matmul"] == 3 * LAYERS
    # Per layer: the q/k/v and gate/up matmuls with their norms, the o and down matmuls as
    # epilogues of the residual adds, the keys' rotation, attention (rotating the queries as
    # it stages them, storing its output tokens first for the o projection to read), SwiGLU;
    # then the embedded tokens (the first norm's matmul reads them from a buffer) and the
    # logits with the final norm.
    assert report.kernels_after == 7 * LAYERS + 2


@pytest.mark.parametrize("optimizer", [optim.SGD(lr=0.05), optim.AdamW(lr=1e-2)])
def test_decomposed_llama_trains_the_same_with_the_optimizer(optimizer):
    graph, loss = decomposed_llama(TINY, batch=2, tokens=5)
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, TINY.vocab_size, (2, 5)).astype(np.int32),
        "labels": rng.integers(0, TINY.vocab_size, (2, 5)).astype(np.int32),
    }
    plain = build(graph, loss, optimizer, device="cpu", seed=1, optimize=False)
    fused = build(graph, loss, optimizer, device="cpu", seed=1)
    for _ in range(3):
        plain.step(feeds)
        fused.step(feeds)
        np.testing.assert_allclose(fused.loss, plain.loss, rtol=1e-4)
    assert_same_values(plain.parameters(), fused.parameters(), rtol=1e-4, atol=1e-5)
    report = fused.optimize_report
    assert report.kernels_after < report.kernels_before * 0.6


@pytest.mark.lavapipe
def test_optimized_decomposed_llama_trains_on_lavapipe_like_the_plain_graph_on_numpy():
    graph, loss = decomposed_llama(TINY, batch=2, tokens=5)
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, TINY.vocab_size, (2, 5)).astype(np.int32),
        "labels": rng.integers(0, TINY.vocab_size, (2, 5)).astype(np.int32),
    }
    plain = build(graph, loss, optim.AdamW(lr=1e-2), device="cpu", seed=1, optimize=False)
    fused = build(graph, loss, optim.AdamW(lr=1e-2), device="vulkan-cpu", seed=1)
    for _ in range(2):
        plain.step(feeds)
        fused.step(feeds)
        np.testing.assert_allclose(fused.loss, plain.loss, rtol=1e-4)
    assert_same_values(plain.parameters(), fused.parameters(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
def test_decomposed_model_optimizes_to_the_kernels_of_the_hand_written_one(train):
    optimizer = optim.AdamW(lr=1e-4) if train else None
    decomposed, loss = decomposed_llama(SMOLLM2_135M, batch=1, tokens=32, train=train)
    written = build_report(decomposed, loss, optimizer)
    fused, fused_loss = fused_llama(SMOLLM2_135M, batch=1, tokens=32, train=train)
    hand = build_report(fused, fused_loss, optimizer)
    print(
        f"\nSmolLM2-135M {'training step' if train else 'forward'}: decomposed "
        f"{written.kernels_before} -> {written.kernels_after} kernels, hand-written "
        f"{hand.kernels_before} -> {hand.kernels_after} (optimized in "
        f"{written.optimize_seconds:.2f} s and {hand.optimize_seconds:.2f} s)"
    )
    assert abs(written.kernels_after - hand.kernels_after) <= 2
    assert hand.optimize_seconds <= (5.0 if train else 2.0)


def forward_kernels(graph, loss=None, pairable=None):
    """The kernels of one forward run of the optimized graph, by what each computes (with
    `pairable`, the backend's say on paired epilogues)."""
    from collections import Counter

    from meganeura.lower.plan import select_kernels
    from meganeura.ops import get_op
    from meganeura.session import _step_graph

    g, loss_id, _, _ = _step_graph(graph, loss, None, None, optimize=True)
    roots = list(g.outputs.values()) + ([] if loss_id is None else [loss_id])
    _, kernels = select_kernels(g, roots, {}, pairable=pairable)
    out = Counter()
    for k in kernels:
        node = g.nodes[k.node]
        if k.core is not None:
            out["matmul+" + node.op] += 1
        elif get_op(node.op).kind == "matmul":  # by the shape of the weight
            out[f"{node.op}{list(g.nodes[node.inputs[-1]].type.shape)}"] += 1
        else:
            out[node.op] += 1
    return out


@pytest.mark.parametrize("builder", [fused_llama, decomposed_llama], ids=["written", "decomposed"])
def test_every_layer_is_fused(builder):
    """Per layer: attention (rotating the queries as it stages them) and SwiGLU one kernel
    each, q/k/v one matmul and gate/up one, each normalizing its rows itself (the RMSNorms
    launch nothing), the o and down projections the matmuls of the residual adds
    (epilogues)."""
    c = SMOLLM2_135M
    graph, _ = builder(c, batch=1, tokens=32, train=False)
    kernels = forward_kernels(graph)
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    assert "rms_norm" not in kernels
    assert kernels["attention"] == LAYERS
    assert kernels["swiglu"] == LAYERS
    assert kernels["rope"] == LAYERS  # the keys; attention rotates the queries as it reads
    # The logits' matmul reads the last residual add from a buffer: the add is the down
    # projection's epilogue, as in every layer.
    assert kernels["matmul+add"] == 2 * LAYERS
    assert kernels[f"rms_norm_matmul{[qkv, c.hidden_size]}"] == LAYERS
    assert kernels[f"rms_norm_matmul{[2 * c.intermediate_size, c.hidden_size]}"] == LAYERS
    assert kernels["rms_norm_matmul[49152, 576]"] == 1  # the logits (tied embedding)
    # Attention stores its output tokens first (no copy back to token order); the embedded
    # tokens are copied (read by the first layer's q/k/v matmul from a buffer; its norm read
    # the gathered rows in place).
    assert kernels["reshape"] == 1
    assert sum(kernels.values()) == 7 * LAYERS + 2
    # On the WebGPU backend, the split tiles of a 32-token prompt's gate/up product store
    # SwiGLU of its two halves themselves (a paired epilogue): six kernels a layer.
    paired = forward_kernels(graph, pairable=lambda g, nid: wgsl_pairable(g, nid, {}))
    assert paired["matmul+swiglu"] == LAYERS
    assert "swiglu" not in paired
    assert sum(paired.values()) == 6 * LAYERS + 2
