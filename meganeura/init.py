"""Parameter initializers, with PyTorch's fan conventions (weights are [out, in, *kernel]).

An initializer is a callable `(shape, rng) -> ndarray`. `Graph.parameter(init=...)` accepts
one of these, its name as a string ("kaiming_uniform"), a number (a constant) or an array.
The generator is the session's, seeded by `build(..., seed=)`, so a seed fixes every
initial value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

Initializer = Callable[[tuple[int, ...], np.random.Generator], np.ndarray]


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) as torch.nn.init computes them."""
    if len(shape) < 2:
        raise ValueError(f"fan in and fan out need at least 2 dims, got shape {list(shape)}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


LINEAR_GAINS = (
    "linear",
    "identity",
    "sigmoid",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
)


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """torch.nn.init.calculate_gain: the factor that keeps activations' variance."""
    if nonlinearity in LINEAR_GAINS:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is not None and (isinstance(param, bool) or not isinstance(param, (int, float))):
            raise ValueError(f"calculate_gain: negative_slope {param!r} is not a number")
        slope = 0.01 if param is None else param
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(
        f"calculate_gain: unknown nonlinearity {nonlinearity!r}; valid: "
        f"{', '.join(LINEAR_GAINS)}, tanh, relu, leaky_relu, selu"
    )


def zeros() -> Initializer:
    return lambda shape, rng: np.zeros(shape, np.float32)


def ones() -> Initializer:
    return lambda shape, rng: np.ones(shape, np.float32)


def constant(value: float) -> Initializer:
    return lambda shape, rng: np.full(shape, value, np.float32)


def from_array(array: ArrayLike) -> Initializer:
    """The values of `array` (copied now), checked against the parameter's shape."""
    value = np.array(array, dtype=np.float32)

    def init(shape, rng):
        if value.shape != tuple(shape):
            raise ValueError(
                f"init.from_array: the array has shape {list(value.shape)}, "
                f"the parameter {list(shape)}"
            )
        return value.copy()

    return init


def normal(mean: float = 0.0, std: float = 1.0) -> Initializer:
    return lambda shape, rng: rng.normal(mean, std, shape).astype(np.float32)


def uniform(a: float = 0.0, b: float = 1.0) -> Initializer:
    return lambda shape, rng: rng.uniform(a, b, shape).astype(np.float32)


def trunc_normal(
    mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0
) -> Initializer:
    """Normal(mean, std) redrawn until inside [a, b] (absolute bounds, as in PyTorch)."""

    def init(shape, rng):
        out = rng.normal(mean, std, shape)
        bad = (out < a) | (out > b)
        while bad.any():
            out[bad] = rng.normal(mean, std, int(bad.sum()))
            bad = (out < a) | (out > b)
        return out.astype(np.float32)

    return init


def xavier_uniform(gain: float = 1.0) -> Initializer:
    def init(shape, rng):
        fan_in, fan_out = fans(shape)
        bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return init


def xavier_normal(gain: float = 1.0) -> Initializer:
    def init(shape, rng):
        fan_in, fan_out = fans(shape)
        return rng.normal(0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), shape).astype(np.float32)

    return init


def _kaiming_std(shape, a, mode, nonlinearity):
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"kaiming init: mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = fans(shape)
    return calculate_gain(nonlinearity, a) / math.sqrt(fan_in if mode == "fan_in" else fan_out)


def kaiming_uniform(
    a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu"
) -> Initializer:
    def init(shape, rng):
        bound = math.sqrt(3.0) * _kaiming_std(shape, a, mode, nonlinearity)
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    return init


def kaiming_normal(
    a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu"
) -> Initializer:
    return lambda shape, rng: rng.normal(
        0.0, _kaiming_std(shape, a, mode, nonlinearity), shape
    ).astype(np.float32)


def linear_weight() -> Initializer:
    """torch.nn.Linear's default: kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), ...)."""
    return kaiming_uniform(a=math.sqrt(5.0))


def linear_bias(fan_in: int) -> Initializer:
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return uniform(-bound, bound)


NAMED = {
    "zeros": zeros,
    "ones": ones,
    "normal": normal,
    "uniform": uniform,
    "trunc_normal": trunc_normal,
    "xavier_uniform": xavier_uniform,
    "glorot_uniform": xavier_uniform,
    "xavier_normal": xavier_normal,
    "glorot_normal": xavier_normal,
    "kaiming_uniform": kaiming_uniform,
    "he_uniform": kaiming_uniform,
    "kaiming_normal": kaiming_normal,
    "he_normal": kaiming_normal,
}


def initial_value(name: str, spec: Any, shape: tuple[int, ...], dtype: np.dtype, rng) -> np.ndarray:
    """The initial array of parameter `name` from its init spec."""
    if isinstance(spec, str):
        if spec not in NAMED:
            raise ValueError(
                f"parameter {name!r}: unknown init {spec!r}; valid: {', '.join(NAMED)}"
            )
        spec = NAMED[spec]()
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        spec = constant(float(spec))
    if callable(spec):
        value = np.asarray(spec(tuple(shape), rng))
    else:
        value = np.asarray(spec)
    if value.shape != tuple(shape):
        raise ValueError(
            f"parameter {name!r}: init gave shape {list(value.shape)}, expected {list(shape)}"
        )
    return np.asarray(value, dtype=dtype, order="C")
