"""Learning-rate schedules against torch.optim.lr_scheduler and their closed forms."""

import math

import pytest
import torch

from meganeura import schedules


def torch_lrs(make_scheduler, lr: float, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make_scheduler(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return out


def test_constant():
    assert [schedules.constant(0.3)(s) for s in range(4)] == [0.3] * 4


def test_step_decay_matches_torch_step_lr():
    ours = schedules.step_decay(0.1, step_size=3, gamma=0.5)
    expected = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5), 0.1, 12)
    assert [ours(s) for s in range(12)] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("min_lr", [0.0, 0.01])
def test_cosine_without_warmup_matches_torch_cosine_annealing(min_lr):
    ours = schedules.warmup_cosine(0.1, warmup_steps=0, total_steps=10, min_lr=min_lr)
    expected = torch_lrs(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=min_lr), 0.1, 11
    )
    assert [ours(s) for s in range(11)] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_warmup_then_cosine():
    s = schedules.warmup_cosine(1.0, warmup_steps=4, total_steps=12, min_lr=0.2)
    assert [s(i) for i in range(5)] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert s(8) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(12) == pytest.approx(0.2)
    assert s(100) == pytest.approx(0.2)  # held at min_lr after the end


def test_warmup_then_linear():
    s = schedules.warmup_linear(1.0, warmup_steps=2, total_steps=6)
    assert [s(i) for i in range(8)] == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0])


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.constant(0.1),
        schedules.step_decay(0.1, 5, 0.3),
        schedules.warmup_cosine(0.1, 3, 30, 0.001),
        schedules.warmup_linear(0.2, 0, 10),
    ],
    ids=lambda s: s.kind,
)
def test_state_dict_round_trip(schedule):
    state = schedule.state_dict()
    rebuilt = schedules.from_state_dict(state)
    assert rebuilt == schedule and type(rebuilt) is type(schedule)
    assert [rebuilt(i) for i in range(12)] == [schedule(i) for i in range(12)]


def test_load_state_dict_takes_the_saved_settings():
    current = schedules.warmup_cosine(0.1, 3, 30)
    current.load_state_dict(schedules.warmup_cosine(0.2, 5, 50).state_dict())
    assert (current.lr, current.warmup_steps, current.total_steps) == (0.2, 5, 50)
    with pytest.raises(ValueError, match="cannot load a 'constant' schedule into"):
        current.load_state_dict(schedules.constant(0.1).state_dict())


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: schedules.constant(math.nan), "lr must be a finite number"),
        (lambda: schedules.constant(True), "lr must be a finite number"),
        (lambda: schedules.step_decay(0.1, 0), "step_size must be an int >= 1"),
        (lambda: schedules.step_decay(0.1, 2, 0.0), "gamma must be a finite number > 0"),
        (lambda: schedules.warmup_cosine(0.1, 10, 10), "must exceed warmup_steps"),
        (lambda: schedules.warmup_cosine(0.1, -1, 10), "warmup_steps must be an int >= 0"),
        (lambda: schedules.warmup_linear(0.1, 1, 10, min_lr=0.2), "min_lr .* must not exceed"),
        (lambda: schedules.from_state_dict({"type": "exotic"}), "unknown schedule type"),
    ],
)
def test_invalid_settings_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()
