"""Training parity with PyTorch on a transformer and a CNN: identical initial weights, 20
steps of each optimizer with clipping, weight decay, a schedule and parameter groups,
parameters within 1e-4 (relative) of torch's."""

import numpy as np
import pytest
import torch

from meganeura import Graph, build, schedules
from meganeura import functional as F
from meganeura.recipes import small_cnn
from tests.harness import DEVICES
from tests.models import (
    GPTConfig,
    TorchGPT,
    gpt_batches,
    gpt_loss,
    gpt_training_graph,
    torch_cnn,
)
from tests.torch_reference import Run, assert_close_to_torch, train_torch

STEPS = 20


def schedule():
    return schedules.warmup_cosine(0.02, warmup_steps=3, total_steps=STEPS, min_lr=0.002)


NO_DECAY = ("*.bias", "*norm*", "pos", "tok.weight")
RUNS = [
    Run(
        "sgd",
        {"lr": schedule(), "momentum": 0.9, "weight_decay": 0.05},
        groups=[(NO_DECAY, {"weight_decay": 0.0}, 1.0)],
        clip=1.0,
    ),
    Run(
        "adam",
        {"lr": schedule(), "weight_decay": 0.01},
        groups=[(NO_DECAY, {"weight_decay": 0.0}, 0.5)],
        clip=1.0,
    ),
    Run(
        "adamw",
        {"lr": schedule(), "betas": (0.9, 0.95), "weight_decay": 0.1},
        groups=[(NO_DECAY, {"weight_decay": 0.0}, 1.0)],
        clip=1.0,
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("run", RUNS, ids=[r.kind for r in RUNS])
def test_transformer_matches_torch_after_20_steps(device, run):
    config, batch = GPTConfig(), 3
    graph, loss = gpt_training_graph(config, batch)
    session = build(graph, loss, run.ours(), device=device)
    initial = session.parameters()
    data = gpt_batches(config, batch, STEPS)
    for step in data:
        session.step(step)
    run.clipped.clear()
    expected = train_torch(TorchGPT(config), initial, run, data, gpt_loss)
    assert any(run.clipped), "the clipping threshold should bite"
    assert_close_to_torch(session.parameters(), expected, initial)


CNN_SHAPE, CNN_BATCH, CNN_CLASSES, CNN_CHANNELS = (1, 8, 8), 4, 5, (4, 6)


def cnn_batches(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(CNN_BATCH, *CNN_SHAPE)).astype(np.float32),
            "y": rng.integers(0, CNN_CLASSES, CNN_BATCH).astype(np.int32),
        }
        for _ in range(count)
    ]


def cnn_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"].long())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("run", RUNS, ids=[r.kind for r in RUNS])
def test_small_cnn_matches_torch_after_20_steps(device, run):
    graph = Graph()
    x = graph.input("x", (CNN_BATCH, *CNN_SHAPE))
    y = graph.input("y", (CNN_BATCH,), "i32")
    model = small_cnn(graph, "", CNN_SHAPE, CNN_CLASSES, CNN_CHANNELS)
    logits = graph.output("logits", model(x))
    session = build(graph, F.cross_entropy(logits, y), run.ours(), device=device)
    initial = session.parameters()
    data = cnn_batches(STEPS)
    for batch in data:
        session.step(batch)
    run.clipped.clear()
    reference = torch_cnn(CNN_SHAPE, CNN_CLASSES, CNN_CHANNELS)
    expected = train_torch(reference, initial, run, data, cnn_loss)
    assert any(run.clipped), "the clipping threshold should bite"
    assert_close_to_torch(session.parameters(), expected, initial)
