"""Optimizers as graph rules: each appends its update to the training graph.

An optimizer's `attach(graph, params, grads)` adds its state (persistent, non-trainable
parameters named `optim.<state>.<param>`), its per-step scalars (graph inputs named
`optim.<name>`) and, for every parameter, nodes computing the new values, registered with
`graph.assign`. The update therefore runs on the device inside the step's submission, fused
like any other pointwise code. `attach` returns a function from the step number to the
scalars to feed, so schedules and bias corrections cost one tiny upload per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from meganeura.graph import Graph, ParameterSpec, Tensor


def _check_lr(lr) -> None:
    if not callable(lr) and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"learning rate must be a finite number >= 0 or a schedule, got {lr!r}")


class Optimizer:
    def __init__(self, lr: float | Callable[[int], float]):
        _check_lr(lr)
        self.lr = lr

    def lr_at(self, step: int) -> float:
        lr = self.lr(step) if callable(self.lr) else self.lr
        if not isinstance(lr, (int, float, np.floating)) or not math.isfinite(lr):
            raise ValueError(
                f"learning rate schedule gave {lr!r} at step {step}; need a finite number"
            )
        return float(lr)

    def _scalar(self, graph: Graph, name: str) -> Tensor:
        return graph.input(f"optim.{name}", ())

    def _state(self, graph: Graph, kind: str, name: str, param: Tensor) -> Tensor:
        state = f"optim.{kind}.{name}"
        tensor = graph.parameter(state, param.shape, init="zeros", state=True)
        # The state of a parameter that stores others (see ParameterView) stores theirs.
        for member, view in list(graph.parameter_views.items()):
            if view.storage == name:
                graph.parameter_views[f"optim.{kind}.{member}"] = replace(view, storage=state)
                graph.parameter_specs[f"optim.{kind}.{member}"] = ParameterSpec(
                    "zeros", trainable=False, state=True
                )
        return tensor

    def attach(self, graph: Graph, params: dict[str, Tensor], grads: dict[str, Tensor]):
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD: momentum, dampening, Nesterov and L2 weight decay."""

    def __init__(self, lr=0.01, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        super().__init__(lr)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and dampening = 0")
        self.momentum, self.dampening = momentum, dampening
        self.nesterov, self.weight_decay = nesterov, weight_decay

    def attach(self, graph, params, grads):
        lr = self._scalar(graph, "lr")
        first = self._scalar(graph, "first_step")  # 1.0 on the first step: the buffer starts as g
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay:
                g = g + p * self.weight_decay
            if self.momentum:
                buf = self._state(graph, "momentum", name, p)
                damped = g * (1.0 - self.dampening)
                new_buf = buf * self.momentum + damped + first * (g - damped)
                graph.assign(buf, new_buf)
                g = g + new_buf * self.momentum if self.nesterov else new_buf
            graph.assign(p, p - lr * g)
        return lambda step: {
            "optim.lr": np.float32(self.lr_at(step)),
            "optim.first_step": np.float32(step == 0),
        }


class Adam(Optimizer):
    """torch.optim.Adam (L2 weight decay added to the gradient); `decoupled` makes it AdamW."""

    decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(lr)
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay

    def attach(self, graph, params, grads):
        lr = self._scalar(graph, "lr")
        step_size = self._scalar(graph, "step_size")  # lr / (1 - beta1^t)
        inv_bc2 = self._scalar(graph, "inv_sqrt_bc2")  # 1 / sqrt(1 - beta2^t)
        b1, b2 = self.beta1, self.beta2
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay and not self.decoupled:
                g = g + p * self.weight_decay
            m = self._state(graph, "exp_avg", name, p)
            v = self._state(graph, "exp_avg_sq", name, p)
            new_m = m * b1 + g * (1.0 - b1)
            new_v = v * b2 + g * g * (1.0 - b2)
            graph.assign(m, new_m)
            graph.assign(v, new_v)
            base = p * (1.0 - lr * self.weight_decay) if self.decoupled and self.weight_decay else p
            graph.assign(p, base - step_size * new_m / (new_v.sqrt() * inv_bc2 + self.eps))

        def hyper(step: int) -> dict[str, np.ndarray]:
            t = step + 1
            lr_t = self.lr_at(step)
            return {
                "optim.lr": np.float32(lr_t),
                "optim.step_size": np.float32(lr_t / (1.0 - b1**t)),
                "optim.inv_sqrt_bc2": np.float32(1.0 / math.sqrt(1.0 - b2**t)),
            }

        return hyper


class AdamW(Adam):
    """torch.optim.AdamW: weight decay applied to the weights, not added to the gradient."""

    decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(lr, betas, eps, weight_decay)
