"""Initializers against torch.nn.init: fans, gains, bounds and distributions."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from meganeura import Graph, build, init

SHAPES = [(3, 5), (7, 3, 2), (4, 3, 3, 5), (2, 1, 1, 1, 1), (1, 9)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fans_match_torch(shape):
    expected = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    assert init.fans(shape) == expected


@pytest.mark.parametrize("shape", [(5,), ()])
def test_fans_need_two_dims_as_in_torch(shape):
    with pytest.raises(ValueError):
        torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    with pytest.raises(ValueError, match="at least 2 dims"):
        init.fans(shape)


@pytest.mark.parametrize(
    ("nonlinearity", "param"),
    [
        *[(name, None) for name in init.LINEAR_GAINS if name != "identity"],
        ("tanh", None),
        ("relu", None),
        ("leaky_relu", None),
        ("leaky_relu", 0.2),
        ("leaky_relu", math.sqrt(5)),
        ("selu", None),
    ],
)
def test_gains_match_torch(nonlinearity, param):
    expected = torch.nn.init.calculate_gain(nonlinearity, param)
    assert init.calculate_gain(nonlinearity, param) == pytest.approx(expected, rel=1e-15)


def test_unknown_gain_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown nonlinearity 'swish'; valid: linear"):
        init.calculate_gain("swish")
    with pytest.raises(ValueError, match="negative_slope"):
        init.calculate_gain("leaky_relu", True)


# (ours, the torch.nn.init function and its kwargs)
DISTRIBUTIONS = [
    (init.normal(0.5, 2.0), torch.nn.init.normal_, {"mean": 0.5, "std": 2.0}),
    (init.uniform(-0.3, 0.7), torch.nn.init.uniform_, {"a": -0.3, "b": 0.7}),
    (
        init.trunc_normal(0.1, 1.0, -1.5, 2.0),
        torch.nn.init.trunc_normal_,
        {"mean": 0.1, "std": 1.0, "a": -1.5, "b": 2.0},
    ),
    (init.trunc_normal(0.0, 0.02), torch.nn.init.trunc_normal_, {"std": 0.02}),
    (init.xavier_uniform(), torch.nn.init.xavier_uniform_, {}),
    (init.xavier_uniform(gain=2.0), torch.nn.init.xavier_uniform_, {"gain": 2.0}),
    (init.xavier_normal(0.5), torch.nn.init.xavier_normal_, {"gain": 0.5}),
    (init.kaiming_uniform(), torch.nn.init.kaiming_uniform_, {}),
    (
        init.kaiming_uniform(a=0.1, mode="fan_out", nonlinearity="leaky_relu"),
        torch.nn.init.kaiming_uniform_,
        {"a": 0.1, "mode": "fan_out", "nonlinearity": "leaky_relu"},
    ),
    (
        init.kaiming_normal(nonlinearity="relu"),
        torch.nn.init.kaiming_normal_,
        {"nonlinearity": "relu"},
    ),
    (
        init.kaiming_normal(mode="fan_out", nonlinearity="tanh"),
        torch.nn.init.kaiming_normal_,
        {"mode": "fan_out", "nonlinearity": "tanh"},
    ),
    (init.linear_weight(), torch.nn.init.kaiming_uniform_, {"a": math.sqrt(5)}),
]


@pytest.mark.parametrize("shape", [(160, 96), (48, 24, 3, 3)])
@pytest.mark.parametrize(("ours", "theirs", "kwargs"), DISTRIBUTIONS)
def test_distribution_matches_torch(shape, ours, theirs, kwargs):
    value = ours(shape, np.random.default_rng(0))
    assert value.shape == shape and value.dtype == np.float32
    torch.manual_seed(0)
    reference = theirs(torch.empty(shape), **kwargs).numpy()
    # Same distribution: a two-sample Kolmogorov-Smirnov test on ~15k samples each sees a
    # wrong fan or gain (a scale off by a few percent) at once.
    assert ks_2samp(value.ravel(), reference.ravel()).pvalue > 1e-4
    assert value.std() == pytest.approx(reference.std(), rel=0.03)
    assert abs(value.mean() - reference.mean()) < 0.05 * reference.std()
    low, high = reference.min(), reference.max()
    spread = high - low
    if theirs in (torch.nn.init.uniform_, torch.nn.init.xavier_uniform_) or (
        theirs is torch.nn.init.kaiming_uniform_
    ):
        # Uniform: the same bounds, reached within a fraction of a percent.
        assert abs(value.min() - low) < 0.005 * spread and abs(value.max() - high) < 0.005 * spread
    if theirs is torch.nn.init.trunc_normal_:
        a, b = kwargs.get("a", -2.0), kwargs.get("b", 2.0)
        assert value.min() >= a and value.max() <= b


def test_constant_zeros_ones():
    assert np.array_equal(init.constant(0.25)((2, 3), None), np.full((2, 3), 0.25, np.float32))
    assert not init.zeros()((4,), None).any()
    assert init.ones()((4,), None).all()


def test_from_array():
    data = np.arange(6.0).reshape(2, 3)
    initializer = init.from_array(data)
    data[0, 0] = 99  # copied when the initializer was made
    np.testing.assert_array_equal(initializer((2, 3), None), np.arange(6.0).reshape(2, 3))
    with pytest.raises(
        ValueError, match=r"from_array: the array has shape \[2, 3\], the parameter \[3, 2\]"
    ):
        initializer((3, 2), None)


def session_params(seed: int, **inits) -> dict[str, np.ndarray]:
    graph = Graph()
    for name, spec in inits.items():
        graph.parameter(name, (16, 8), init=spec)
    return build(graph, device="cpu", seed=seed).parameters()


def test_parameter_init_specs():
    values = session_params(
        0,
        a="xavier_uniform",
        b=0.5,
        c=np.ones((16, 8)),
        d=init.from_array(np.full((16, 8), 2.0)),
        e="he_normal",
    )
    assert np.all(values["b"] == 0.5) and np.all(values["c"] == 1) and np.all(values["d"] == 2)
    bound = math.sqrt(6 / (16 + 8))
    assert np.abs(values["a"]).max() <= bound


def test_initialization_is_seeded():
    first = session_params(3, a="normal", b="kaiming_uniform")
    again = session_params(3, a="normal", b="kaiming_uniform")
    other = session_params(4, a="normal", b="kaiming_uniform")
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name])
    assert not np.array_equal(first["a"], session_params(3, a="normal", b="normal")["b"])


def test_init_errors_name_the_parameter():
    with pytest.raises(ValueError, match="parameter 'w': unknown init 'gaussian'; valid: zeros"):
        session_params(0, w="gaussian")
    with pytest.raises(
        ValueError, match=r"parameter 'w': init gave shape \[2\], expected \[16, 8\]"
    ):
        session_params(0, w=lambda shape, rng: np.zeros(2))
    with pytest.raises(ValueError, match="mode must be 'fan_in' or 'fan_out'"):
        init.kaiming_normal(mode="fan_avg")((3, 3), np.random.default_rng(0))
