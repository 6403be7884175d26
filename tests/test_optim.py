"""Optimizers against torch.optim: same initial weights, same batches, 20 steps."""

import math
from itertools import pairwise

import numpy as np
import pytest
import torch

from meganeura import Graph, build, optim
from meganeura import functional as F
from meganeura.nn import MLP
from tests.harness import DEVICES

SIZES = [8, 16, 4]
BATCH = 6
STEPS = 20


def schedule(step: int) -> float:
    return 0.05 * 0.9**step


# (name, our optimizer, torch optimizer class and kwargs; "lr" may be a schedule)
CASES = [
    ("sgd", optim.SGD(lr=0.1), torch.optim.SGD, {"lr": 0.1}),
    (
        "sgd_momentum",
        optim.SGD(lr=0.05, momentum=0.9),
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9},
    ),
    (
        "sgd_momentum_dampening",
        optim.SGD(lr=0.05, momentum=0.9, dampening=0.3),
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.3},
    ),
    (
        "sgd_nesterov",
        optim.SGD(lr=0.05, momentum=0.9, nesterov=True),
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.9, "nesterov": True},
    ),
    (
        "sgd_weight_decay",
        optim.SGD(lr=0.05, momentum=0.5, weight_decay=0.1),
        torch.optim.SGD,
        {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1},
    ),
    (
        "sgd_schedule",
        optim.SGD(lr=schedule, momentum=0.9),
        torch.optim.SGD,
        {"lr": schedule, "momentum": 0.9},
    ),
    ("adam", optim.Adam(lr=1e-2), torch.optim.Adam, {"lr": 1e-2}),
    (
        "adam_weight_decay",
        optim.Adam(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
        torch.optim.Adam,
        {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1},
    ),
    ("adam_schedule", optim.Adam(lr=schedule), torch.optim.Adam, {"lr": schedule}),
    (
        "adamw",
        optim.AdamW(lr=1e-2, weight_decay=0.1),
        torch.optim.AdamW,
        {"lr": 1e-2, "weight_decay": 0.1},
    ),
    ("adamw_schedule", optim.AdamW(lr=schedule), torch.optim.AdamW, {"lr": schedule}),
]


def mlp_session(optimizer, device: str, seed: int = 0):
    graph = Graph()
    x = graph.input("x", (BATCH, SIZES[0]))
    y = graph.input("y", (BATCH,), "i32")
    logits = graph.output("logits", MLP(graph, "", SIZES)(x))
    return build(graph, F.cross_entropy(logits, y), optimizer, device=device, seed=seed)


def batches(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(BATCH, SIZES[0])).astype(np.float32),
            "y": rng.integers(0, SIZES[-1], BATCH).astype(np.int32),
        }
        for _ in range(count)
    ]


def torch_reference(
    initial: dict[str, np.ndarray], torch_class, kwargs, data
) -> dict[str, np.ndarray]:
    """The same MLP as torch.nn.Sequential, trained by torch.optim on the same batches."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(pairwise(SIZES)):
        layers += [torch.nn.ReLU()] if i else []
        layers.append(torch.nn.Linear(fan_in, fan_out))
    model = torch.nn.Sequential(*layers)
    model.load_state_dict({name: torch.from_numpy(value) for name, value in initial.items()})
    lr = kwargs["lr"]
    opt = torch_class(model.parameters(), **{**kwargs, "lr": lr(0) if callable(lr) else lr})
    for step, batch in enumerate(data):
        if callable(lr):
            for group in opt.param_groups:
                group["lr"] = lr(step)
        opt.zero_grad()
        logits = model(torch.from_numpy(batch["x"]))
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["y"]).long()).backward()
        opt.step()
    return {name: value.detach().numpy() for name, value in model.state_dict().items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("name", "ours", "torch_class", "kwargs"), CASES, ids=[c[0] for c in CASES]
)
def test_matches_torch_after_20_steps(device, name, ours, torch_class, kwargs):
    session = mlp_session(ours, device)
    initial = session.parameters()
    data = batches(STEPS)
    for batch in data:
        session.step(batch)
    expected = torch_reference(initial, torch_class, kwargs, data)
    got = session.parameters()
    assert sorted(got) == sorted(expected)
    for key, want in expected.items():
        moved = np.abs(want - initial[key]).max()
        assert moved > 1e-3, f"{name}: {key} barely moved in torch ({moved}); the test is too weak"
        error = np.abs(got[key] - want).max() / np.abs(want).max()
        assert error <= 1e-4, f"{name}: {key} differs from torch by {error:.2e} (relative)"


def test_state_is_kept_apart_from_parameters():
    session = mlp_session(optim.Adam(lr=1e-2), "cpu")
    assert sorted(session.parameters()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    state = set(session.parameters(include_state=True)) - set(session.parameters())
    assert "optim.exp_avg.0.weight" in state and "optim.exp_avg_sq.2.bias" in state


@pytest.mark.parametrize("make", [optim.SGD, optim.Adam, optim.AdamW])
@pytest.mark.parametrize("lr", [math.nan, math.inf, -0.1, "0.1", None, [0.1]])
def test_invalid_learning_rate_raises(make, lr):
    with pytest.raises(ValueError, match="learning rate"):
        make(lr=lr)


def test_schedule_giving_nan_raises_at_that_step():
    session = mlp_session(optim.SGD(lr=lambda step: 0.1 if step < 2 else math.nan), "cpu")
    data = batches(3)
    session.step(data[0])
    session.step(data[1])
    with pytest.raises(ValueError, match="at step 2"):
        session.step(data[2])


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="Nesterov"):
        optim.SGD(lr=0.1, nesterov=True)
