"""The VJP rule of every op of this family against central finite differences (float64
references), including second-order rules (the gradients of the scatter-add ops)."""

import numpy as np
import pytest

import meganeura as mn
from meganeura import functional as F
from meganeura.ops import all_ops
from tests.torch_check import check_finite_differences


def rng_normal(*shape, seed=0):
    return np.random.default_rng(seed + len(shape)).standard_normal(shape)


IDS = np.array([2, 0, 2, 1], np.int32)

# op name: (fn, inputs); each case's graph contains the op.
FD_CASES = {
    "silu": (F.silu, {"x": rng_normal(2, 3)}),
    "swiglu": (F.swiglu, {"gate": rng_normal(2, 3), "up": rng_normal(3)}),
    "softplus": (lambda x: F.softplus(x, 2.0, 1.0), {"x": rng_normal(2, 5) * 2}),
    "clamp": (lambda x: F.clamp(x, -0.5, 0.5), {"x": rng_normal(3, 3)}),
    "sin": (F.sin, {"x": rng_normal(4) * 3}),
    "cos": (F.cos, {"x": rng_normal(4) * 3}),
    "erf": (F.erf, {"x": rng_normal(4)}),
    "slice": (lambda x: x[1:, ::2], {"x": rng_normal(3, 5)}),
    "flip": (lambda x: x.flip(1), {"x": rng_normal(2, 3)}),
    "pad": (lambda x: F.pad(x, (1, -1, 2, 0), value=3.0), {"x": rng_normal(2, 3)}),
    "concat": (lambda a, b: F.cat([a, b], 1), {"a": rng_normal(2, 1), "b": rng_normal(2, 3)}),
    "tile": (lambda x: x.repeat(2, 3), {"x": rng_normal(2, 2)}),
    "gather": (
        lambda x, i: x.gather(1, i),
        {"x": rng_normal(2, 3), "i": np.array([[0, 0, 2, 1]] * 2, np.int32)},
    ),
    "index_select": (lambda x, i: x.index_select(0, i), {"x": rng_normal(3, 2), "i": IDS}),
    "scatter_add": (
        lambda g, i: g.graph.apply("scatter_add", [g, i], axis=1, shape=(2, 3)),
        {"g": rng_normal(2, 4), "i": np.array([[0, 0, 2, 1]] * 2, np.int32)},
    ),
    "index_add": (
        lambda g, i: g.graph.apply("index_add", [g, i], axis=0, size=3),
        {"g": rng_normal(4, 2), "i": IDS},
    ),
    "rms_norm": (lambda x, w: F.rms_norm(x, w, 1e-5), {"x": rng_normal(3, 4), "w": rng_normal(4)}),
    "layer_norm": (
        lambda x, w, b: F.layer_norm(x, w, b),
        {"x": rng_normal(3, 4), "w": rng_normal(4), "b": rng_normal(4)},
    ),
    "rope": (
        lambda x, p: F.rope(x, p, rotary_dim=4, interleaved=True),
        {"x": rng_normal(1, 2, 3, 6), "p": np.array([3, 0, 7], np.int32)},
    ),
}


@pytest.mark.parametrize("name", sorted(FD_CASES))
def test_vjp_matches_finite_differences(name):
    fn, inputs = FD_CASES[name]
    check_finite_differences(fn, inputs)


def test_cases_cover_every_op_of_the_family_with_a_vjp():
    modules = tuple(f"meganeura.ops.{m}" for m in ("activation", "views", "gather", "norm", "rope"))
    family = {
        name
        for name, op in all_ops().items()
        if op.vjp is not None and op.vjp.__module__ in modules
    }
    assert len(family) == len(FD_CASES)
    covered = set()
    for fn, inputs in FD_CASES.values():
        graph = mn.Graph()
        args = [
            graph.input(k, np.shape(v), "i32" if v.dtype.kind == "i" else "f32")
            for k, v in inputs.items()
        ]
        out = fn(*args)
        covered |= {node.op for node in graph.nodes[: out.id + 1]}
    assert family - covered == set()
