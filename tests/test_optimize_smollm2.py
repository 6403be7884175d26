"""The optimizer on the SmolLM2 model of meganeura.models: time, kernels, fusions, parity.

The timings are the targets on the 2-core CPU machine (a training graph in 5 s, an inference
graph in 2 s); `pytest -s` prints what was measured.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from meganeura import Graph, build, optim
from meganeura.cli import main
from meganeura.models.smollm2 import SMOLLM2_135M, Llama, LlamaConfig, LoraConfig, training_loss
from meganeura.session import build_report
from tests.llama_graphs import SMOLLM2_135M as DECOMPOSED_CONFIG
from tests.llama_graphs import decomposed_llama
from tests.optimize_check import assert_same_values
from tests.test_optimize_llm import forward_kernels

LAYERS = SMOLLM2_135M.num_hidden_layers


def smollm2(config: LlamaConfig, batch: int, tokens: int, train: bool, lora=None):
    graph = Graph()
    model = Llama(graph, config, lora=lora)
    if train:
        return graph, training_loss(model, batch, tokens)
    ids = graph.input("input_ids", (batch, tokens), "i32")
    positions = graph.constant(np.arange(tokens, dtype=np.int32))
    graph.output("logits", model.logits(model.forward(ids, positions)))
    return graph, None


@pytest.mark.parametrize(("train", "limit"), [(True, 5.0), (False, 2.0)], ids=["train", "infer"])
def test_smollm2_135m_optimizes_in_time_to_the_kernels_of_its_decomposed_twin(train, limit):
    graph, loss = smollm2(SMOLLM2_135M, 1, 32, train)
    optimizer = optim.AdamW(lr=1e-4) if train else None
    start = time.perf_counter()
    report = build_report(graph, loss, optimizer)
    wall = time.perf_counter() - start
    twin, twin_loss = decomposed_llama(DECOMPOSED_CONFIG, 1, 32, train=train)
    decomposed = build_report(twin, twin_loss, optimizer)
    print(
        f"\nSmolLM2-135M {'training step' if train else 'forward'} (batch 1 x 32): optimized in "
        f"{report.optimize_seconds:.2f} s ({wall:.2f} s with autodiff and counting); kernels "
        f"{report.kernels_before} -> {report.kernels_after}; from primitives "
        f"{decomposed.kernels_before} -> {decomposed.kernels_after}; fusions {report.fusions}"
    )
    assert report.optimize_seconds <= limit
    assert abs(report.kernels_after - decomposed.kernels_after) <= 2
    assert report.fusions["concat_matmul"] == 3 * LAYERS
    # In training the weight gradients read the normalized rows: the norms stay.
    assert report.fusions.get("rms_norm_matmul", 0) == (0 if train else 2 * LAYERS + 1)


def test_every_smollm2_layer_is_fused():
    graph, _ = smollm2(SMOLLM2_135M, 1, 32, train=False)
    kernels = forward_kernels(graph)
    c = SMOLLM2_135M
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    assert "rms_norm" not in kernels  # each norm runs in the matmul that reads it
    assert kernels["attention"] == LAYERS
    assert kernels["swiglu"] == LAYERS
    assert kernels["rope"] == LAYERS  # the keys; attention rotates the queries as it reads
    assert kernels["matmul+add"] == 2 * LAYERS
    assert kernels[f"rms_norm_matmul{[qkv, c.hidden_size]}"] == LAYERS
    assert kernels[f"rms_norm_matmul{[2 * c.intermediate_size, c.hidden_size]}"] == LAYERS
    assert kernels[f"rms_norm_matmul{[c.vocab_size, c.hidden_size]}"] == 1
    assert sum(kernels.values()) == 7 * LAYERS + 2


def test_build_report_command(capsys):
    assert main(["build-report", "--model", "smollm2-135m", "--mode", "infer", "--seq", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("optimize_seconds", "kernels_before", "kernels_after", "fusions", "enodes"):
        assert key in report
    assert report["kernels_after"] < report["kernels_before"]
    assert report["fusions"]["concat_matmul"] == 3 * LAYERS
    assert report["fusions"]["rms_norm_matmul"] == 2 * LAYERS + 1


TINY = LlamaConfig(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    initializer_range=0.3,
)


@pytest.mark.parametrize(
    "lora", [None, LoraConfig(rank=2, targets=("q_proj", "v_proj"))], ids=["full", "lora"]
)
def test_tiny_llama_trains_the_same_with_the_optimizer(lora):
    graph, loss = smollm2(TINY, 2, 6, train=True, lora=lora)
    optimizer = optim.AdamW(lr=1e-2, weight_decay=0.0)
    plain = build(graph, loss, optimizer, device="cpu", seed=3, optimize=False)
    fused = build(graph, loss, optimizer, device="cpu", seed=3)
    assert fused.graph.parameter_views  # q/k/v (or the adapters' A) stored together
    rng = np.random.default_rng(0)
    for _ in range(3):
        feeds = {
            "input_ids": rng.integers(0, TINY.vocab_size, (2, 6)).astype(np.int32),
            "labels": rng.integers(0, TINY.vocab_size, (2, 6)).astype(np.int32),
        }
        plain.step(feeds)
        fused.step(feeds)
        np.testing.assert_allclose(fused.loss, plain.loss, rtol=1e-4)
    assert_same_values(plain.parameters(True), fused.parameters(True), rtol=1e-4, atol=1e-5)
