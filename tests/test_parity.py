"""Training parity with PyTorch on bigger models: identical initial weights, 20 steps of each
optimizer with clipping, weight decay, a schedule and parameter groups, parameters within
1e-4 (relative) of torch's."""

import pytest

from meganeura import build, schedules
from tests.harness import DEVICES
from tests.models import GPTConfig, TorchGPT, gpt_batches, gpt_loss, gpt_training_graph
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
