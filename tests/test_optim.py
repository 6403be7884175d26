"""Optimizers against torch.optim: same initial weights, same batches, 20 steps."""

import math
from fractions import Fraction
from itertools import pairwise

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meganeura import Graph, build, optim, schedules
from meganeura import functional as F
from meganeura.nn import MLP
from tests.harness import DEVICES
from tests.torch_reference import Run, assert_close_to_torch, train_torch

SIZES = [8, 16, 4]
BATCH = 6
STEPS = 20


def schedule(step: int) -> float:
    return 0.05 * 0.9**step


CASES = [
    Run("sgd", {"lr": 0.1}),
    Run("sgd", {"lr": 0.05, "momentum": 0.9}),
    Run("sgd", {"lr": 0.05, "momentum": 0.9, "dampening": 0.3}),
    Run("sgd", {"lr": 0.05, "momentum": 0.9, "nesterov": True}),
    Run("sgd", {"lr": 0.05, "momentum": 0.5, "weight_decay": 0.1}),
    Run("sgd", {"lr": schedule, "momentum": 0.9}),
    Run("adam", {"lr": 1e-2}),
    Run("adam", {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    Run("adam", {"lr": schedule}),
    Run("adamw", {"lr": 1e-2, "weight_decay": 0.1}),
    Run("adamw", {"lr": schedule}),
]
IDS = [
    "sgd",
    "sgd_momentum",
    "sgd_momentum_dampening",
    "sgd_nesterov",
    "sgd_weight_decay",
    "sgd_schedule",
    "adam",
    "adam_weight_decay",
    "adam_schedule",
    "adamw",
    "adamw_schedule",
]


def mlp_session(optimizer, device: str, seed: int = 0, **options):
    graph = Graph()
    x = graph.input("x", (BATCH, SIZES[0]))
    y = graph.input("y", (BATCH,), "i32")
    logits = graph.output("logits", MLP(graph, "", SIZES)(x))
    return build(graph, F.cross_entropy(logits, y), optimizer, device=device, seed=seed, **options)


def batches(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x": rng.normal(size=(BATCH, SIZES[0])).astype(np.float32),
            "y": rng.integers(0, SIZES[-1], BATCH).astype(np.int32),
        }
        for _ in range(count)
    ]


def torch_mlp() -> torch.nn.Sequential:
    layers = []
    for i, (fan_in, fan_out) in enumerate(pairwise(SIZES)):
        layers += [torch.nn.ReLU()] if i else []
        layers.append(torch.nn.Linear(fan_in, fan_out))
    return torch.nn.Sequential(*layers)


def mlp_loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"].long())


def check_run(run: Run, device: str, steps: int = STEPS, frozen=()) -> None:
    """Train the MLP with `run` here and in torch on the same batches; compare."""
    session = mlp_session(run.ours(), device)
    initial = session.parameters()
    data = batches(steps * run.accumulate)
    for batch in data:
        session.step(batch)
    assert session.update_count == steps
    expected = train_torch(torch_mlp(), initial, run, data, mlp_loss)
    assert_close_to_torch(session.parameters(), expected, initial, frozen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("run", CASES, ids=IDS)
def test_matches_torch_after_20_steps(device, run):
    check_run(run, device)


def warmup_cosine():
    return schedules.warmup_cosine(0.05, warmup_steps=4, total_steps=STEPS, min_lr=0.005)


# Every optimizer with clipping (tight enough to clip), weight decay, a schedule and a group.
FULL = [
    Run(
        "sgd",
        {"lr": warmup_cosine(), "momentum": 0.9, "nesterov": True, "weight_decay": 0.05},
        groups=[("*.bias", {"weight_decay": 0.0}, 2.0)],
        clip=0.8,
    ),
    Run(
        "adam",
        {"lr": warmup_cosine(), "betas": (0.85, 0.98), "weight_decay": 0.05},
        groups=[("*.bias", {"weight_decay": 0.0}, 0.5)],
        clip=0.8,
    ),
    Run(
        "adamw",
        {"lr": warmup_cosine(), "weight_decay": 0.1},
        groups=[("*.bias", {"weight_decay": 0.0, "betas": (0.8, 0.99)}, 1.0)],
        clip=0.8,
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("run", FULL, ids=[r.kind for r in FULL])
def test_clipping_weight_decay_schedule_and_groups_match_torch(device, run):
    run.clipped.clear()
    check_run(run, device)
    assert any(run.clipped) and not all(run.clipped), "clipping should act on some steps only"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_gradient_accumulation_matches_torch(device, kind):
    hyper = {"lr": 0.05, "momentum": 0.9} if kind == "sgd" else {"lr": 1e-2}
    check_run(Run(kind, hyper, clip=1.0, accumulate=3), device, steps=8)


@pytest.mark.parametrize("device", DEVICES)
def test_frozen_parameters_stay_and_others_match_torch(device):
    run = Run("adam", {"lr": 1e-2}, groups=[("2", {"lr": 3e-2}, 1.0)], frozen=["0"])
    check_run(run, device, steps=10, frozen=["0.weight", "0.bias"])


def test_frozen_parameters_get_no_gradient_or_state():
    session = mlp_session(
        optim.SGD(lr=0.1, momentum=0.9, groups=[optim.Group("0", frozen=True)]), "cpu"
    )
    state = set(session.parameters(include_state=True)) - set(session.parameters())
    assert state == {"optim.momentum.2.weight", "optim.momentum.2.bias"}


def test_graph_level_trainable_false_is_respected():
    graph = Graph()
    x = graph.input("x", (2, 3))
    w = graph.parameter("w", (3, 3), init="ones", trainable=False)
    v = graph.parameter("v", (3,), init="ones")
    loss = ((x @ w) * v).sum()
    session = build(graph, loss, optim.SGD(lr=0.1), device="cpu")
    session.step({"x": np.ones((2, 3), np.float32)})
    np.testing.assert_array_equal(session.parameters()["w"], np.ones((3, 3)))
    np.testing.assert_allclose(session.parameters()["v"], 1 - 0.1 * 6)


def test_group_matching():
    assert optim.Group("enc").matches("enc.0.weight")
    assert optim.Group("enc.").matches("enc.0.weight")
    assert not optim.Group("enc").matches("encoder.weight")
    assert optim.Group("enc.0.weight").matches("enc.0.weight")
    assert optim.Group("*.bias").matches("enc.0.bias")
    assert not optim.Group("*.bias").matches("enc.0.weight")
    assert optim.Group(["a", "b"]).matches("b.x")
    assert optim.Group(lambda name: name.endswith("norm")).matches("x.norm")


def test_group_errors():
    with pytest.raises(ValueError, match="unknown hyperparameter 'betas'; valid: lr, momentum"):
        optim.SGD(lr=0.1, groups=[optim.Group("a", betas=(0.9, 0.9))])
    with pytest.raises(ValueError, match="group 'a': learning rate must be a finite number"):
        optim.SGD(lr=0.1, groups=[optim.Group("a", lr=math.nan)])
    with pytest.raises(ValueError, match="group 'a': Nesterov"):
        optim.SGD(lr=0.1, groups=[optim.Group("a", nesterov=True)])
    with pytest.raises(ValueError, match="reserved or used twice"):
        optim.SGD(lr=0.1, groups=[optim.Group("a"), optim.Group("b", name="a")])
    with pytest.raises(TypeError, match="match must be"):
        optim.Group(3)
    with pytest.raises(ValueError, match="lr_mult"):
        optim.Group("a", lr_mult=-1.0)
    with pytest.raises(ValueError, match=r"group 'decoder' matches no trainable parameter"):
        mlp_session(optim.SGD(lr=0.1, groups=[optim.Group("decoder")]), "cpu")
    with pytest.raises(ValueError, match="every trainable parameter is in a frozen group"):
        mlp_session(optim.SGD(lr=0.1, groups=[optim.Group("*", frozen=True)]), "cpu")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"clip_grad_norm": 0.0}, "clip_grad_norm must be > 0"),
        ({"clip_grad_norm": math.inf}, "clip_grad_norm must be a finite number"),
        ({"accumulate": 0}, "accumulate must be an int >= 1"),
        ({"accumulate": 2.0}, "accumulate must be an int >= 1"),
        ({"momentum": -0.5}, "momentum must be a finite number >= 0"),
        ({"weight_decay": math.nan}, "weight_decay must be a finite number"),
    ],
)
def test_sgd_option_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.SGD(lr=0.1, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"betas": (0.9, 1.0)}, "beta2 must be a finite number >= 0 and < 1"),
        ({"betas": (0.9,)}, "betas must be a pair"),
        ({"eps": -1.0}, "eps must be a finite number >= 0"),
    ],
)
def test_adam_option_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        optim.Adam(lr=0.1, **kwargs)


def test_grad_norm_is_the_norm_before_clipping():
    session = mlp_session(optim.SGD(lr=0.1, clip_grad_norm=0.01), "cpu")
    data = batches(1)[0]
    norms = session.grad_norms(data)
    session.step(data)
    assert session.grad_norm == pytest.approx(
        math.sqrt(sum(n * n for n in norms.values())), rel=1e-5
    )


def test_state_is_kept_apart_from_parameters():
    session = mlp_session(optim.Adam(lr=1e-2), "cpu")
    assert sorted(session.parameters()) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    state = set(session.parameters(include_state=True)) - set(session.parameters())
    assert "optim.exp_avg.0.weight" in state and "optim.exp_avg_sq.2.bias" in state


@pytest.mark.parametrize("make", [optim.SGD, optim.Adam, optim.AdamW])
@pytest.mark.parametrize(
    "lr", [math.nan, math.inf, -0.1, "0.1", None, [0.1], True, np.float32(np.nan)]
)
def test_invalid_learning_rate_raises(make, lr):
    with pytest.raises(ValueError, match="learning rate"):
        make(lr=lr)


@pytest.mark.parametrize("lr", [np.float32(0.1), np.float64(0.1), 1, np.int64(1), Fraction(1, 10)])
def test_any_real_learning_rate_is_accepted(lr):
    optimizer = optim.SGD(lr=lr)
    session = mlp_session(optimizer, "cpu")
    session.step(batches(1)[0])
    assert optimizer.lr_at(0) == float(lr)


@pytest.mark.parametrize("bad", [math.inf, -1.0, True, "0.1", None])
def test_schedule_value_that_is_not_a_finite_number_raises(bad):
    session = mlp_session(optim.Adam(lr=lambda step: bad), "cpu")
    with pytest.raises(ValueError, match=f"gave {bad!r} at step 0"):
        session.step(batches(1)[0])


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


@pytest.mark.parametrize("device", DEVICES)
def test_accumulating_micro_steps_still_update_batch_norm_statistics(device):
    from meganeura.nn import BatchNorm2d

    graph = Graph()
    x = graph.input("x", (BATCH, SIZES[0]))
    y = graph.input("y", (BATCH,), "i32")
    h = MLP(graph, "", SIZES[:2])(x).reshape(BATCH, SIZES[1], 1, 1)
    h = BatchNorm2d(graph, "bn", SIZES[1])(h).reshape(BATCH, SIZES[1])
    logits = graph.output("logits", h.relu() @ graph.parameter("out", (SIZES[1], 4), "normal"))
    # lr 0: the weights stay, so the statistics depend on the batches alone
    optimizer = optim.SGD(lr=0.0, accumulate=2)
    session = build(graph, F.cross_entropy(logits, y), optimizer, device=device)
    initial = session.parameters()
    linear = torch.nn.Linear(SIZES[0], SIZES[1])
    linear.load_state_dict({k: torch.from_numpy(initial[f"0.{k}"]) for k in ("weight", "bias")})
    bn = torch.nn.BatchNorm2d(SIZES[1])
    for batch in batches(3):  # accumulate, apply, accumulate
        session.step(batch)
        with torch.no_grad():
            bn(linear(torch.from_numpy(batch["x"]))[:, :, None, None])
    assert session.update_count == 1
    got = session.parameters()
    for name in ("running_mean", "running_var"):
        want = getattr(bn, name).numpy()
        np.testing.assert_allclose(got[f"bn.{name}"], want, rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 9), min_size=2, max_size=4),
    batch=st.integers(1, 5),
    kind=st.sampled_from(["sgd", "adam", "adamw"]),
    clip=st.sampled_from([None, 0.05, 1.0]),
    every=st.integers(1, 2),
    decay_bias=st.booleans(),
)
def test_any_mlp_shape_matches_torch(sizes, batch, kind, clip, every, decay_bias):
    hyper = {"lr": 0.05, "weight_decay": 0.01}
    if kind == "sgd":
        hyper["momentum"] = 0.8
    groups = [] if decay_bias else [("*.bias", {"weight_decay": 0.0}, 2.0)]
    run = Run(kind, hyper, groups=groups, clip=clip, accumulate=every)
    graph = Graph()
    x = graph.input("x", (batch, sizes[0]))
    y = graph.input("y", (batch,), "i32")
    logits = graph.output("logits", MLP(graph, "", sizes)(x))
    session = build(graph, F.cross_entropy(logits, y), run.ours(), device="cpu")
    rng = np.random.default_rng(len(sizes) * 10 + batch)
    data = [
        {
            "x": rng.normal(size=(batch, sizes[0])).astype(np.float32),
            "y": rng.integers(0, sizes[-1], batch).astype(np.int32),
        }
        for _ in range(4 * every)
    ]
    initial = session.parameters()
    for item in data:
        session.step(item)
    layers = []
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        layers += [torch.nn.ReLU()] if i else []
        layers.append(torch.nn.Linear(fan_in, fan_out))
    expected = train_torch(torch.nn.Sequential(*layers), initial, run, data, mlp_loss)
    for name, want in expected.items():
        np.testing.assert_allclose(session.parameters()[name], want, rtol=1e-4, atol=1e-6)
