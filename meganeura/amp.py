"""Mixed precision: f16 activations and weights, f32 master weights, dynamic loss scaling.

`to_mixed_precision` rewrites a graph the way `torch.autocast(dtype=torch.float16)` runs
one: matrix products (and convolutions, attention) take f16 operands, the ops that lose
too much in f16 (reductions, softmax, cross-entropy, exp, log, ...) run in f32, and the
simple elementwise ops (add, mul, relu, ...) run in f16 when the activations they read are
f16, weights and constants included. Parameters stay
f32 (the master weights the optimizer updates); each is cast to f16 once per step where an
f16 op reads it. Gradients flow back through the same casts, so the backward pass is mostly
f16 too, and the master weights receive f32 gradients.

`LossScaler` is torch.amp.GradScaler as graph rules: the loss gradient is seeded with the
scale, the gradients are unscaled before clipping and the update, a step whose gradients
hold an inf or NaN changes nothing but halves the scale, and the scale doubles after
`growth_interval` good steps in a row. All of it runs on the device; nothing waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meganeura.graph import Graph, Tensor
from meganeura.ops import get_op
from meganeura.ops.elementwise import where

FLOATS = ("f32", "f16")
# Matrix-unit ops: f16 operands (the kernels accumulate in f32).
HALF_OPS = {"matmul", "conv1d", "conv2d", "conv_transpose2d", "attention"}
# Elementwise ops that are as exact in f16 as their inputs are.
HALF_POINTWISE = {
    "add",
    "sub",
    "mul",
    "div",
    "neg",
    "abs",
    "sign",
    "relu",
    "maximum",
    "minimum",
    "where",
    "sigmoid",
    "tanh",
    "lt",
    "le",
    "gt",
    "ge",
    "eq",
    "ne",
}
# Ops that pass their input's dtype through.
KEEP_OPS = {"cast", "max", "max_pool2d"}


class MixedPrecisionError(RuntimeError):
    """Mixed precision was asked for on a device without f16 shaders."""


def check_device(executor) -> None:
    """Raise if `executor` runs WebGPU kernels on an adapter without `shader-f16`."""
    gpu = getattr(executor, "gpu", None)
    if gpu is not None and not gpu.has_f16:
        raise MixedPrecisionError(
            f"mixed precision needs f16 shaders, and {gpu.info.summary()} does not offer the "
            "WebGPU feature 'shader-f16'; build without amp (f32), or use another device"
        )


F16_MAX = 65504.0


def _fits_f16(value: np.ndarray) -> bool:
    """Whether every finite value of `value` stays finite in f16."""
    finite = np.abs(value[np.isfinite(value)])
    return not finite.size or float(finite.max()) <= F16_MAX


def _is_weight(t: Tensor) -> bool:
    """A parameter or constant, or a view of one (a bias reshaped to broadcast)."""
    node = t.node
    while get_op(node.op).kind == "view":
        node = t.graph.nodes[node.inputs[0]]
    return node.op in ("parameter", "constant")


def _dtype_for(op: str, kind: str, inputs: list[Tensor]) -> str | None:
    """The float dtype `op` runs in, or None to keep its inputs' dtypes."""
    floats = [t for t in inputs if t.dtype in FLOATS]
    if kind == "view" or op in KEEP_OPS or not floats:
        return None
    if any(t.node.op == "constant" and not _fits_f16(t.node.attrs["value"]) for t in floats):
        return "f32"  # e.g. a -1e9 attention mask: f16 would make it -inf
    if op in HALF_OPS:
        return "f16"
    if kind == "pointwise" and op in HALF_POINTWISE:
        # Weights and constants follow the activations (as a bias does inside torch's
        # f16 addmm); between activations, f32 wins.
        activations = [t for t in floats if not _is_weight(t)]
        if activations and all(t.dtype == "f16" for t in activations):
            return "f16"
    return "f32"


def to_mixed_precision(graph: Graph) -> tuple[Graph, dict[int, int]]:
    """A copy of `graph` computed in mixed precision, and the map of old to new node ids.

    Sources keep their dtypes (parameters are the f32 masters), named outputs and updated
    values are cast back to their original dtype.
    """
    new = Graph()
    mapped: dict[int, Tensor] = {}
    casts: dict[tuple[int, str], Tensor] = {}

    def as_dtype(t: Tensor, dtype: str) -> Tensor:
        if t.dtype == dtype or t.dtype not in FLOATS:
            return t
        key = (t.id, dtype)
        if key not in casts:
            node = t.node
            if node.op == "constant":
                casts[key] = new.constant(node.attrs["value"], dtype)
            else:
                casts[key] = t.astype(dtype)
        return casts[key]

    for node in graph.nodes:
        if node.op == "input":
            t = new.input(node.name, node.type.shape, node.type.dtype)
        elif node.op == "parameter":
            spec = graph.parameter_specs[node.name]
            t = new.parameter(
                node.name, node.type.shape, spec.init, spec.trainable, node.type.dtype, spec.state
            )
        elif node.op == "constant":
            t = new.constant(node.attrs["value"], node.type.dtype)
        else:
            inputs = [mapped[i] for i in node.inputs]
            dtype = _dtype_for(node.op, get_op(node.op).kind, inputs)
            t = None
            if dtype == "f16":
                try:
                    t = new.apply(node.op, [as_dtype(x, "f16") for x in inputs], **node.attrs)
                except TypeError:
                    dtype = "f32"  # the op has no f16 form
            if t is None:
                if dtype is not None:
                    inputs = [as_dtype(x, dtype) for x in inputs]
                t = new.apply(node.op, inputs, **node.attrs)
        mapped[node.id] = t
    for name, nid in graph.outputs.items():
        new.output(name, as_dtype(mapped[nid], graph.nodes[nid].type.dtype))
    for target, value in graph.updates.items():
        new.assign(mapped[target], as_dtype(mapped[value], graph.nodes[target].type.dtype))
    return new, {old: t.id for old, t in mapped.items()}


@dataclass
class LossScaler:
    """Dynamic loss scaling with torch.amp.GradScaler's defaults and semantics."""

    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    SCALE = "amp.scale"
    GROWTH_TRACKER = "amp.growth_tracker"

    def __post_init__(self):
        checks = (
            ("init_scale", self.init_scale > 0),
            ("growth_factor", self.growth_factor > 1),
            ("backoff_factor", 0 < self.backoff_factor < 1),
        )
        for name, ok in checks:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and ok):
                raise ValueError(f"LossScaler: invalid {name} {value!r}")
        if isinstance(self.growth_interval, bool) or not (
            isinstance(self.growth_interval, int) and self.growth_interval >= 1
        ):
            raise ValueError(
                f"LossScaler: growth_interval must be an int >= 1, got {self.growth_interval!r}"
            )

    def attach(self, graph: Graph) -> Tensor:
        """Add the scale and its growth tracker to the graph; returns the scale, which
        seeds the loss gradient."""
        graph.parameter(self.GROWTH_TRACKER, (), init="zeros", state=True)
        return graph.parameter(self.SCALE, (), init=float(self.init_scale), state=True)

    def _state(self, graph: Graph, name: str) -> Tensor:
        return graph.tensor(graph.parameters[name])

    def inverse_scale(self, graph: Graph) -> Tensor:
        return 1.0 / self._state(graph, self.SCALE)

    def found_inf(self, graph: Graph, grads: Sequence[Tensor]) -> Tensor:
        """A bool scalar: some gradient holds an inf or NaN."""
        count = None
        for g in grads:
            bad = where(graph.apply("isfinite", [g]), 0.0, 1.0).sum()
            count = bad if count is None else count + bad
        return count > 0.0

    def update(self, graph: Graph, found_inf: Tensor) -> None:
        """Halve the scale after an overflow; grow it after `growth_interval` good steps."""
        scale = self._state(graph, self.SCALE)
        tracker = self._state(graph, self.GROWTH_TRACKER)
        good = tracker + 1.0
        grow = good >= float(self.growth_interval)
        grown = scale * self.growth_factor
        kept = where(grow, where(graph.apply("isfinite", [grown]), grown, scale), scale)
        graph.assign(scale, where(found_inf, scale * self.backoff_factor, kept))
        graph.assign(tracker, where(found_inf, 0.0, where(grow, 0.0, good)))
