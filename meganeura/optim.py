"""Optimizers as graph rules: each appends its update to the training graph.

An optimizer's `attach(graph, params, grads)` adds its state (persistent, non-trainable
parameters named `optim.<state>.<param>`), its per-step scalars (graph inputs named
`optim.<name>`, one set per parameter group) and, for every parameter, nodes computing the
new values, registered with `graph.assign`. The update therefore runs on the device inside
the step's submission, fused like any other pointwise code. Gradient clipping (the global
norm, as `torch.nn.utils.clip_grad_norm_`), gradient accumulation over micro-batches and
the skip of overflowing steps under loss scaling are graph rules too; nothing waits for
the device. `attach` returns `UpdateRules`: what the session feeds each step and the
updates of a micro-step that only accumulates.
"""

from __future__ import annotations

import fnmatch
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meganeura.functional import minimum
from meganeura.graph import Graph, Tensor
from meganeura.ops.elementwise import where
from meganeura.schedules import Schedule

LearningRate = float | Callable[[int], float]
DEFAULT_GROUP = "default"
ACCUMULATE_INPUT = "optim.accumulating"  # bool: this micro-step adds to earlier ones


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_lr(lr: Any, what: str = "learning rate") -> None:
    if callable(lr):
        return
    if not (_is_real(lr) and math.isfinite(lr) and lr >= 0):
        raise ValueError(
            f"{what} must be a finite number >= 0 or a schedule (a function of the step), "
            f"got {lr!r}"
        )


def _check_real(value: Any, what: str, low: float, high: float = math.inf, open_high=False):
    ok = _is_real(value) and math.isfinite(value) and low <= value <= high
    if not ok or (open_high and value == high):
        upper = "" if high == math.inf else f" and {'<' if open_high else '<='} {high:g}"
        raise ValueError(f"{what} must be a finite number >= {low:g}{upper}, got {value!r}")


class Group:
    """A parameter group: the parameters that `match` selects, with their own settings.

    `match` is a parameter name or module prefix (`"encoder"` selects `encoder.*`), a glob
    (`"*.bias"`), a sequence of those, or a predicate on the name. The first group that
    matches a parameter owns it; parameters that no group matches use the optimizer's own
    settings. Keyword arguments override the optimizer's hyperparameters (`lr`,
    `weight_decay`, `betas`, `momentum`, ...); `lr_mult` scales the group's learning rate
    (schedule included); `frozen=True` leaves the parameters untrained (no gradient is
    computed for them).
    """

    def __init__(
        self,
        match: str | Sequence[str] | Callable[[str], bool],
        *,
        name: str | None = None,
        frozen: bool = False,
        lr_mult: float = 1.0,
        **hyper: Any,
    ):
        if isinstance(match, str):
            self.patterns, self.predicate = (match,), None
        elif callable(match):
            self.patterns, self.predicate = (), match
        elif isinstance(match, Sequence) and match and all(isinstance(m, str) for m in match):
            self.patterns, self.predicate = tuple(match), None
        else:
            raise TypeError(
                "Group: match must be a name or prefix, a glob, a sequence of those, or a "
                f"predicate on parameter names, got {match!r}"
            )
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"Group: name must be a non-empty string, got {name!r}")
        _check_real(lr_mult, "Group: lr_mult", 0.0)
        self.name = name or (match if isinstance(match, str) else None)
        self.frozen = bool(frozen)
        self.lr_mult = float(lr_mult)
        self.hyper = hyper

    def matches(self, name: str) -> bool:
        if self.predicate is not None:
            return bool(self.predicate(name))
        for pattern in self.patterns:
            if any(c in pattern for c in "*?["):
                if fnmatch.fnmatchcase(name, pattern):
                    return True
            elif name == pattern or name.startswith(pattern.rstrip(".") + "."):
                return True
        return False

    def __repr__(self) -> str:
        match = self.predicate or (self.patterns[0] if len(self.patterns) == 1 else self.patterns)
        extra = "".join(f", {k}={v!r}" for k, v in self.hyper.items())
        return f"Group({match!r}, name={self.name!r}, frozen={self.frozen}{extra})"


@dataclass
class ParamGroup:
    """A group resolved against a graph: its name, settings and the parameters it trains."""

    name: str
    hyper: dict[str, Any]
    lr_mult: float
    params: list[str]

    def lr_at(self, step: int) -> float:
        lr = self.hyper["lr"]
        value = lr(step) if callable(lr) else lr
        if not (_is_real(value) and math.isfinite(value) and value >= 0):
            group = "" if self.name == DEFAULT_GROUP else f" of group {self.name!r}"
            raise ValueError(
                f"learning rate schedule{group} gave {value!r} at step {step}; "
                "need a finite number >= 0"
            )
        return float(value) * self.lr_mult


@dataclass
class UpdateRules:
    """What an optimizer added to a training graph, for the session to drive."""

    scalars: Callable[[int], dict[str, np.ndarray]]  # optimizer step -> per-step feeds
    accumulate_every: int = 1
    # Updates of a micro-step that only accumulates its gradients (the graph's own updates
    # are those of the micro-step that applies them).
    accumulate_updates: dict[int, int] = field(default_factory=dict)
    grad_norm: int | None = None  # node: the global gradient norm before clipping
    found_inf: int | None = None  # node: the step was skipped (loss scaling)


class _Builder:
    """Shared machinery of `attach`: scalars, state, and assignments gated by the skip flag."""

    def __init__(self, graph: Graph, skip: Tensor | None, applied: Tensor | None):
        self.graph = graph
        self.skip = skip
        self.applied = applied  # device count of applied updates (under loss scaling)
        self.feeds: dict[str, Callable[[int], float]] = {}

    def scalar(self, kind: str, group: ParamGroup | None, value: Callable[[int], float]) -> Tensor:
        """A per-step scalar input; `group=None` makes one shared by all groups."""
        shared = group is None or group.name == DEFAULT_GROUP
        name = f"optim.{kind}" if shared else f"optim.{kind}.{group.name}"
        if name in self.graph.inputs:
            return self.graph.tensor(self.graph.inputs[name])
        self.feeds[name] = value
        return self.graph.input(name, ())

    def lr(self, group: ParamGroup) -> Tensor:
        return self.scalar("lr", group, group.lr_at)

    def state(self, kind: str, name: str, like: Tensor) -> Tensor:
        return self.graph.parameter(f"optim.{kind}.{name}", like.shape, init="zeros", state=True)

    def assign(self, target: Tensor, value: Tensor) -> None:
        if self.skip is not None:
            value = where(self.skip, target, value)
        self.graph.assign(target, value)


class Optimizer:
    """Base of the optimizers: hyperparameters, parameter groups, clipping, accumulation.

    `clip_grad_norm` rescales all gradients together when their global L2 norm exceeds it;
    `accumulate=k` averages the gradients of k micro-batches (k calls of `Session.step`)
    and updates the parameters on the k-th.
    """

    def __init__(
        self,
        hyper: dict[str, Any],
        groups: Sequence[Group] = (),
        clip_grad_norm: float | None = None,
        accumulate: int = 1,
    ):
        kind = type(self).__name__
        self.defaults = dict(hyper)
        self._check(self.defaults, kind)
        self.groups: list[Group] = []
        names = set()
        for index, group in enumerate(groups):
            if not isinstance(group, Group):
                raise TypeError(f"{kind}: groups must be optim.Group objects, got {group!r}")
            name = group.name or f"group{index}"
            if name == DEFAULT_GROUP or name in names:
                raise ValueError(f"{kind}: group name {name!r} is reserved or used twice")
            names.add(name)
            unknown = sorted(set(group.hyper) - set(self.defaults))
            if unknown:
                raise ValueError(
                    f"{kind} group {name!r}: unknown hyperparameter {unknown[0]!r}; "
                    f"valid: {', '.join(self.defaults)}"
                )
            group.name = name
            self._check({**self.defaults, **group.hyper}, f"{kind} group {name!r}")
            self.groups.append(group)
        if clip_grad_norm is not None:
            _check_real(clip_grad_norm, f"{kind}: clip_grad_norm", 0.0)
            if clip_grad_norm == 0:
                raise ValueError(f"{kind}: clip_grad_norm must be > 0, got 0")
        if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
            raise ValueError(f"{kind}: accumulate must be an int >= 1, got {accumulate!r}")
        self.clip_grad_norm = clip_grad_norm
        self.accumulate = accumulate

    @property
    def lr(self) -> LearningRate:
        return self.defaults["lr"]

    def lr_at(self, step: int) -> float:
        """The learning rate of the parameters in no group, at optimizer step `step`."""
        return ParamGroup(DEFAULT_GROUP, self.defaults, 1.0, []).lr_at(step)

    def _check(self, hyper: dict[str, Any], where: str) -> None:
        _check_lr(hyper["lr"], f"{where}: learning rate")

    # -- groups ------------------------------------------------------------------------------
    def _owners(self, names: Sequence[str], frozen_too: bool = True) -> dict[str, Group | None]:
        owners = {name: next((g for g in self.groups if g.matches(name)), None) for name in names}
        for group in self.groups:
            if (frozen_too or not group.frozen) and not any(o is group for o in owners.values()):
                raise ValueError(
                    f"{type(self).__name__} group {group.name!r} matches no trainable "
                    f"parameter; the trainable parameters are {list(names)}"
                )
        return owners

    def trained(self, names: Sequence[str]) -> list[str]:
        """The parameters among `names` (all trainable) that no frozen group holds."""
        owners = self._owners(names)
        return [name for name in names if owners[name] is None or not owners[name].frozen]

    def param_groups(self, names: Sequence[str]) -> list[ParamGroup]:
        """The groups that train `names` (none of them frozen), the default group first."""
        owners = self._owners(names, frozen_too=False)
        default = [name for name in names if owners[name] is None]
        out = [ParamGroup(DEFAULT_GROUP, dict(self.defaults), 1.0, default)] if default else []
        for group in self.groups:
            members = [name for name in names if owners[name] is group]
            if not group.frozen:
                out.append(
                    ParamGroup(group.name, {**self.defaults, **group.hyper}, group.lr_mult, members)
                )
        return out

    def schedules(self) -> dict[str, Schedule]:
        """The learning-rate schedules by group name (what a checkpoint records)."""
        found = {}
        if isinstance(self.defaults["lr"], Schedule):
            found[DEFAULT_GROUP] = self.defaults["lr"]
        for group in self.groups:
            if isinstance(group.hyper.get("lr"), Schedule):
                found[group.name] = group.hyper["lr"]
        return found

    # -- graph rules -------------------------------------------------------------------------
    def attach(
        self,
        graph: Graph,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
        scaler: Any = None,
    ) -> UpdateRules:
        """Append the update of every parameter in `params` given its gradient in `grads`.

        With `scaler` (an `amp.LossScaler` already attached to the graph) the gradients are
        scaled: they are unscaled here, and a step whose gradients overflowed changes nothing
        but the scale.
        """
        rules = UpdateRules(scalars=lambda step: {}, accumulate_every=self.accumulate)
        total = dict(grads)
        if self.accumulate > 1:
            # The model's own updates (BatchNorm's running statistics) run at every forward.
            rules.accumulate_updates.update(graph.updates)
            accumulating = graph.input(ACCUMULATE_INPUT, (), "bool")
            for name, g in grads.items():
                running = graph.parameter(
                    f"optim.grad_sum.{name}", g.shape, init="zeros", state=True
                )
                value = where(accumulating, running, 0.0) + g
                rules.accumulate_updates[running.id] = value.id
                total[name] = value * (1.0 / self.accumulate)
        skip = applied = None
        if scaler is not None:
            found_inf = scaler.found_inf(graph, list(total.values()))
            inv_scale = scaler.inverse_scale(graph)
            total = {name: g * inv_scale for name, g in total.items()}
            skip = found_inf
            rules.found_inf = found_inf.id
            applied = graph.parameter("optim.applied_steps", (), init="zeros", state=True)
        if self.clip_grad_norm is not None:
            squares = [(g * g).sum() for g in total.values()]
            norm = squares[0]
            for square in squares[1:]:
                norm = norm + square
            norm = norm.sqrt()
            coef = minimum(self.clip_grad_norm / (norm + 1e-6), 1.0)
            total = {name: g * coef for name, g in total.items()}
            rules.grad_norm = norm.id
        builder = _Builder(graph, skip, applied)
        for group in self.param_groups(list(params)):
            self._rules(builder, group, {n: params[n] for n in group.params}, total)
        if applied is not None:
            builder.assign(applied, applied + 1.0)
        if scaler is not None:
            scaler.update(graph, skip)
        feeds = dict(builder.feeds)
        rules.scalars = lambda step: {name: np.float32(fn(step)) for name, fn in feeds.items()}
        return rules

    def _rules(
        self,
        b: _Builder,
        group: ParamGroup,
        params: Mapping[str, Tensor],
        grads: Mapping[str, Tensor],
    ) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD: momentum, dampening, Nesterov and L2 weight decay."""

    def __init__(
        self,
        lr: LearningRate = 0.01,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        groups: Sequence[Group] = (),
        clip_grad_norm: float | None = None,
        accumulate: int = 1,
    ):
        hyper = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
        }
        super().__init__(hyper, groups, clip_grad_norm, accumulate)

    def _check(self, h, where):
        super()._check(h, where)
        _check_real(h["momentum"], f"{where}: momentum", 0.0)
        _check_real(h["dampening"], f"{where}: dampening", 0.0, 1.0)
        _check_real(h["weight_decay"], f"{where}: weight_decay", 0.0)
        if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
            raise ValueError(f"{where}: Nesterov momentum needs momentum > 0 and dampening = 0")

    def _rules(self, b, group, params, grads):
        h = group.hyper
        lr = b.lr(group)
        momentum, dampening, decay = h["momentum"], h["dampening"], h["weight_decay"]
        first = None
        if momentum:
            # The momentum buffer starts as the first gradient: `first` is 1 on that step.
            if b.applied is not None:
                first = where(b.applied.eq(0.0), 1.0, 0.0)
            else:
                first = b.scalar("first_step", None, lambda step: float(step == 0))
        for name, p in params.items():
            g = grads[name]
            if decay:
                g = g + p * decay
            if momentum:
                buf = b.state("momentum", name, p)
                damped = g * (1.0 - dampening)
                new_buf = buf * momentum + damped + first * (g - damped)
                b.assign(buf, new_buf)
                g = g + new_buf * momentum if h["nesterov"] else new_buf
            b.assign(p, p - lr * g)


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient); `decoupled` makes it AdamW."""

    decoupled = False

    def __init__(
        self,
        lr: LearningRate = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        groups: Sequence[Group] = (),
        clip_grad_norm: float | None = None,
        accumulate: int = 1,
    ):
        hyper = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(hyper, groups, clip_grad_norm, accumulate)

    def _check(self, h, where):
        super()._check(h, where)
        betas = h["betas"]
        if not isinstance(betas, Sequence) or len(betas) != 2:
            raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        for index, beta in enumerate(betas):
            _check_real(beta, f"{where}: beta{index + 1}", 0.0, 1.0, open_high=True)
        _check_real(h["eps"], f"{where}: eps", 0.0)
        _check_real(h["weight_decay"], f"{where}: weight_decay", 0.0)

    def _rules(self, b, group, params, grads):
        h = group.hyper
        b1, b2 = (float(beta) for beta in h["betas"])
        eps, decay = h["eps"], h["weight_decay"]
        lr = b.lr(group)
        if b.applied is not None:
            # Under loss scaling the host cannot know which steps were applied without
            # waiting, so the bias corrections count applied steps on the device.
            t = b.applied + 1.0

            def correction(beta):
                return 1.0 - (t * math.log(beta)).exp() if beta > 0 else 1.0

            step_size = lr / correction(b1)
            inv_bc2 = correction(b2).rsqrt() if b2 > 0 else 1.0
        else:
            step_size = b.scalar(
                "step_size", group, lambda step: group.lr_at(step) / (1.0 - b1 ** (step + 1))
            )
            inv_bc2 = b.scalar(
                "inv_sqrt_bc2", group, lambda step: 1.0 / math.sqrt(1.0 - b2 ** (step + 1))
            )
        for name, p in params.items():
            g = grads[name]
            if decay and not self.decoupled:
                g = g + p * decay
            m = b.state("exp_avg", name, p)
            v = b.state("exp_avg_sq", name, p)
            new_m = m * b1 + g * (1.0 - b1)
            new_v = v * b2 + g * g * (1.0 - b2)
            b.assign(m, new_m)
            b.assign(v, new_v)
            base = p * (1.0 - lr * decay) if self.decoupled and decay else p
            b.assign(p, base - step_size * new_m / (new_v.sqrt() * inv_bc2 + eps))


class AdamW(Adam):
    """torch.optim.AdamW: weight decay applied to the weights, not added to the gradient."""

    decoupled = True

    def __init__(
        self,
        lr: LearningRate = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        groups: Sequence[Group] = (),
        clip_grad_norm: float | None = None,
        accumulate: int = 1,
    ):
        super().__init__(
            lr,
            betas,
            eps,
            weight_decay,
            groups=groups,
            clip_grad_norm=clip_grad_norm,
            accumulate=accumulate,
        )


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}
