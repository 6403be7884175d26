"""nll_loss, binary_cross_entropy_with_logits, l1_loss and smooth_l1_loss against PyTorch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import meganeura as mn
from meganeura import functional as F
from tests.torch_check import check, normal

REDUCTIONS = ["mean", "sum", "none"]


def device_cases(items):
    params = [pytest.param("cpu", item, id=f"cpu-{n}") for n, item in enumerate(items)]
    return [*params, pytest.param("vulkan-cpu", items[0], marks=pytest.mark.lavapipe, id="vk-0")]


def quarters(rng, *shape, steps=8):
    """Multiples of 0.25: differences are often exactly zero or exactly beta."""
    return (rng.integers(-steps, steps + 1, shape) / 4).astype(np.float32)


# (input shape with classes on axis 1 (or the only axis), reduction, with class weights)
NLL_CASES = [
    ((6, 5), "mean", True),
    ((6, 5), "sum", False),
    ((6, 5), "none", True),
    ((2, 4, 3), "mean", False),
    ((2, 4, 3, 2), "none", False),
    ((7,), "sum", False),
    ((1, 1), "mean", True),
]


@pytest.mark.parametrize(("device", "case"), device_cases(NLL_CASES))
def test_nll_loss_matches_torch(device, case):
    shape, reduction, weighted = case
    rng = np.random.default_rng(0)
    classes = shape[1] if len(shape) >= 2 else shape[0]
    target_shape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    target = rng.integers(0, classes, target_shape).astype(np.int32)
    if target.size > 2:
        target.reshape(-1)[1] = -100  # ignored
    weight = np.abs(normal(rng, classes)) + 0.1 if weighted else None

    def ours(x, t):
        w = x.graph.constant(weight) if weighted else None
        return F.nll_loss(x, t, w, reduction=reduction)

    def reference(x, t):
        w = torch.from_numpy(weight).double() if weighted else None
        return TF.nll_loss(x, t, w, reduction=reduction)

    check(ours, reference, {"x": normal(rng, *shape), "t": target}, device)


def test_nll_loss_with_log_softmax_equals_cross_entropy():
    rng = np.random.default_rng(1)
    logits, labels = normal(rng, 5, 7), rng.integers(0, 7, 5).astype(np.int32)
    check(
        lambda x, t: F.nll_loss(x.log_softmax(-1), t),
        lambda x, t: TF.cross_entropy(x, t),
        {"x": logits, "t": labels},
        "cpu",
    )


# (shape, reduction, with weight, with pos_weight)
BCE_CASES = [
    ((4, 3), "mean", True, True),
    ((4, 3), "sum", False, False),
    ((5,), "none", False, True),
    ((2, 3, 2), "mean", True, False),
]


@pytest.mark.parametrize(("device", "case"), device_cases(BCE_CASES))
def test_bce_with_logits_matches_torch(device, case):
    shape, reduction, weighted, pos_weighted = case
    rng = np.random.default_rng(2)
    # Logits up to +-40: the stable form must not overflow; soft targets in [0, 1].
    logits = normal(rng, *shape, scale=15.0)
    target = rng.uniform(0, 1, shape).astype(np.float32)
    weight = np.abs(normal(rng, *shape[-1:])) if weighted else None
    pos_weight = np.abs(normal(rng, *shape[-1:])) + 0.5 if pos_weighted else None

    def ours(x, t):
        const = lambda a: None if a is None else x.graph.constant(a)  # noqa: E731
        return F.binary_cross_entropy_with_logits(
            x, t, const(weight), reduction=reduction, pos_weight=const(pos_weight)
        )

    def reference(x, t):
        const = lambda a: None if a is None else torch.from_numpy(a).double()  # noqa: E731
        return TF.binary_cross_entropy_with_logits(
            x, t, const(weight), reduction=reduction, pos_weight=const(pos_weight)
        )

    check(ours, reference, {"x": logits, "t": target}, device)


@pytest.mark.parametrize(("device", "reduction"), device_cases(REDUCTIONS))
def test_l1_loss_matches_torch(device, reduction):
    rng = np.random.default_rng(3)
    inputs = {"x": quarters(rng, 4, 5), "y": quarters(rng, 4, 5)}
    check(
        lambda x, y: F.l1_loss(x, y, reduction),
        lambda x, y: TF.l1_loss(x, y, reduction=reduction),
        inputs,
        device,
    )


SMOOTH_CASES = [(1.0, "mean"), (0.5, "sum"), (0.0, "mean"), (2.0, "none")]


@pytest.mark.parametrize(("device", "case"), device_cases(SMOOTH_CASES))
def test_smooth_l1_loss_matches_torch(device, case):
    beta, reduction = case
    rng = np.random.default_rng(4)
    inputs = {"x": quarters(rng, 3, 7), "y": quarters(rng, 3, 7)}
    check(
        lambda x, y: F.smooth_l1_loss(x, y, reduction, beta),
        lambda x, y: TF.smooth_l1_loss(x, y, reduction=reduction, beta=beta),
        inputs,
        device,
    )


def test_bad_loss_arguments_raise_at_build_time():
    graph = mn.Graph()
    x = graph.input("x", (4, 3))
    t = graph.input("t", (4,), "i32")
    with pytest.raises(ValueError, match=r"l1_loss: reduction must be one of \('mean'"):
        F.l1_loss(x, x, "avg")
    with pytest.raises(ValueError, match=r"smooth_l1_loss: input \[4, 3\] and target \[4\]"):
        F.smooth_l1_loss(x, graph.input("y", (4,)))
    with pytest.raises(ValueError, match="smooth_l1_loss: beta must be >= 0, got -1"):
        F.smooth_l1_loss(x, x, beta=-1.0)
    with pytest.raises(ValueError, match=r"nll_loss: input f32\[4, 3\] \(classes on axis 1\)"):
        F.nll_loss(x, graph.input("t3", (3,), "i32"))
    with pytest.raises(TypeError, match=r"nll_loss: target must hold integer class indices"):
        F.nll_loss(x, graph.input("tf", (4,)))
    with pytest.raises(ValueError, match=r"nll_loss: weight must be f32\[3\] \(one per class\)"):
        F.nll_loss(x, t, graph.input("w", (4,)))
    with pytest.raises(ValueError, match="binary_cross_entropy_with_logits: weight or pos_weight"):
        F.binary_cross_entropy_with_logits(x, x, weight=graph.input("w2", (2, 4, 3)))
