"""Learning-rate schedules: functions of the optimizer step that an optimizer's `lr` accepts.

Any callable `step -> lr` is a schedule. The classes here also describe themselves
(`state_dict`), so a checkpoint records the schedule it was trained with and resuming
restores it, as `torch.optim.lr_scheduler` does. Steps count optimizer updates from 0.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def _real(value: Any, what: str, low: float = 0.0, low_open: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise ValueError(f"{what} must be a finite number {bound}, got {value!r}")
    return float(value)


def _count(value: Any, what: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value!r}")
    return int(value)


class Schedule:
    """A learning rate as a function of the step, with the settings that define it."""

    kind = ""
    fields: tuple[str, ...] = ()

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The schedule as JSON-able data (what a checkpoint stores)."""
        return {"type": self.kind, **{name: getattr(self, name) for name in self.fields}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the settings of a saved schedule of the same type."""
        if state.get("type") != self.kind:
            raise ValueError(
                f"cannot load a {state.get('type')!r} schedule into a {self.kind!r} schedule"
            )
        type(self)(**{name: state[name] for name in self.fields})  # validates
        for name in self.fields:
            setattr(self, name, state[name])

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.fields)
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self.state_dict() == other.state_dict()

    __hash__ = object.__hash__


class Constant(Schedule):
    kind = "constant"
    fields = ("lr",)

    def __init__(self, lr: float):
        self.lr = _real(lr, "constant schedule: lr")

    def __call__(self, step: int) -> float:
        return self.lr


class StepDecay(Schedule):
    """torch.optim.lr_scheduler.StepLR: `lr * gamma ** (step // step_size)`."""

    kind = "step"
    fields = ("lr", "step_size", "gamma")

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        self.lr = _real(lr, "step schedule: lr")
        self.step_size = _count(step_size, "step schedule: step_size", 1)
        self.gamma = _real(gamma, "step schedule: gamma", 0.0, low_open=True)

    def __call__(self, step: int) -> float:
        return self.lr * self.gamma ** (step // self.step_size)


class _Warmup(Schedule):
    """Linear warm-up from 0 to `lr` over `warmup_steps`, then a decay to `min_lr` at
    `total_steps`, held there afterwards. The warm-up is Hugging Face's
    (`lr * step / warmup_steps`, so the first step has lr 0)."""

    fields = ("lr", "warmup_steps", "total_steps", "min_lr")

    def __init__(self, lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0):
        name = f"{self.kind} schedule"
        self.lr = _real(lr, f"{name}: lr")
        self.warmup_steps = _count(warmup_steps, f"{name}: warmup_steps", 0)
        self.total_steps = _count(total_steps, f"{name}: total_steps", 1)
        self.min_lr = _real(min_lr, f"{name}: min_lr")
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"{name}: total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps})"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"{name}: min_lr ({min_lr}) must not exceed lr ({lr})")

    def decay(self, progress: float) -> float:
        raise NotImplementedError

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_lr + (self.lr - self.min_lr) * self.decay(progress)


class WarmupCosine(_Warmup):
    """Warm-up, then half a cosine: torch's CosineAnnealingLR(T_max, eta_min) after it."""

    kind = "warmup_cosine"

    def decay(self, progress: float) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupLinear(_Warmup):
    """Warm-up, then a straight line down to `min_lr`."""

    kind = "warmup_linear"

    def decay(self, progress: float) -> float:
        return 1.0 - progress


KINDS = {cls.kind: cls for cls in (Constant, StepDecay, WarmupCosine, WarmupLinear)}


def constant(lr: float) -> Constant:
    return Constant(lr)


def step_decay(lr: float, step_size: int, gamma: float = 0.1) -> StepDecay:
    return StepDecay(lr, step_size, gamma)


def warmup_cosine(
    lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> WarmupCosine:
    return WarmupCosine(lr, warmup_steps, total_steps, min_lr)


def warmup_linear(
    lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0
) -> WarmupLinear:
    return WarmupLinear(lr, warmup_steps, total_steps, min_lr)


def from_state_dict(state: dict[str, Any]) -> Schedule:
    """A schedule from its `state_dict`."""
    kind = state.get("type")
    if kind not in KINDS:
        raise ValueError(f"unknown schedule type {kind!r}; valid: {', '.join(KINDS)}")
    cls = KINDS[kind]
    return cls(**{name: state[name] for name in cls.fields})
