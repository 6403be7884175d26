"""Differential-test helpers: one op placed mid-graph, run on a meganeura device and in PyTorch.

`op_graph` builds the graph every check uses. Each float input `x` is fed as `x / 2` and
doubled inside the graph, so the op sits mid-graph yet sees exactly the values the test chose
(doubling is exact in floating point: domains, ties and zeros survive). The op's output is
multiplied by a random upstream gradient `upstream` and summed into a scalar loss, and
`meganeura.grad` differentiates that loss with respect to the fed inputs.

`check_against_torch` runs that graph through `Session.run` on a device and the same
computation in float64 PyTorch, and compares outputs and gradients. `check_finite_differences`
evaluates the graph in float64 with the ops' NumPy references and compares the VJP graph with
central differences of the loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
import torch

import meganeura as mn
from meganeura.graph import Graph, Tensor, dtype_of_array, numpy_dtype
from meganeura.ops import get_op

# The generated kernels run on lavapipe in CI, and on a hardware GPU where there is one
# (`pytest -m gpu` on a GPU machine).
DEVICES = [
    "cpu",
    pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe),
    pytest.param("gpu", marks=pytest.mark.gpu),
]

# f32 results against a float64 truth; GPU kernels may reassociate sums.
RTOL = 1e-4
ATOL = 1e-5

FLOATS = ("f32", "f16")
UPSTREAM = "upstream"  # name of the graph input holding the random upstream gradient


# -- inputs ---------------------------------------------------------------------------------


def normal(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return np.asarray(rng.standard_normal(shape) * scale, np.float32)


def uniform(rng: np.random.Generator, shape, low: float, high: float) -> np.ndarray:
    return np.asarray(rng.uniform(low, high, shape), np.float32)


def away_from_zero(rng: np.random.Generator, shape, low: float = 0.5, high: float = 2.0):
    """Magnitudes in [low, high) with random signs: safe divisors, no kinks at zero."""
    return np.asarray(rng.uniform(low, high, shape) * rng.choice([-1.0, 1.0], shape), np.float32)


def quantized(rng: np.random.Generator, shape, steps: int = 4) -> np.ndarray:
    """Multiples of 0.5 in [-steps/2, steps/2], zero included: ties and exact zeros are common."""
    return np.asarray(rng.integers(-steps, steps + 1, shape) / 2, np.float32)


# -- building -------------------------------------------------------------------------------


def is_float(array: np.ndarray) -> bool:
    return array.dtype.kind == "f"


@dataclass
class OpGraph:
    graph: Graph
    out: Tensor
    feeds: dict[str, np.ndarray]  # graph input name -> value fed (floats halved)
    loss: Tensor | None
    grads: dict[str, Tensor]  # input name -> gradient of loss with respect to it


def op_graph(
    fn: Callable[..., Tensor],
    arrays: Mapping[str, np.ndarray],
    wrt: Iterable[str] | None = None,
    seed: int = 0,
) -> OpGraph:
    """The graph of `fn(**inputs)` mid-graph, its loss against a random upstream gradient,
    and the gradients with respect to `wrt` (default: every float input)."""
    graph = mn.Graph()
    sources, args, feeds = {}, {}, {}
    for name, array in arrays.items():
        array = np.asarray(array)
        sources[name] = graph.input(name, array.shape, dtype_of_array(array))
        if is_float(array):
            feeds[name] = np.asarray(array / 2, array.dtype)
            args[name] = sources[name] * 2.0
        else:
            feeds[name] = array
            args[name] = sources[name]
    out = graph.output("out", fn(**args))
    if wrt is None:
        wrt = [name for name, array in arrays.items() if is_float(np.asarray(array))]
    wrt = list(wrt)
    if out.dtype not in FLOATS or not wrt:
        return OpGraph(graph, out, feeds, None, {})
    rng = np.random.default_rng(seed)
    upstream = graph.input(UPSTREAM, out.shape, out.dtype)
    feeds[UPSTREAM] = normal(rng, out.shape).astype(numpy_dtype(out.dtype), copy=False)
    loss = graph.output("loss", (out * upstream).sum())
    grads = dict(zip(wrt, mn.grad(loss, [sources[name] for name in wrt]), strict=True))
    for name, g in grads.items():
        graph.output(f"grad_{name}", g)
    return OpGraph(graph, out, feeds, loss, grads)


@dataclass
class OpRun:
    out: np.ndarray
    grads: dict[str, np.ndarray]


def run_meganeura(opg: OpGraph, device: str) -> OpRun:
    values = mn.build(opg.graph, device=device).run(opg.feeds)
    return OpRun(values["out"], {name: values[f"grad_{name}"] for name in opg.grads})


def run_torch(torch_fn: Callable, opg: OpGraph) -> OpRun:
    """The same computation in float64 PyTorch: leaves take the halved feeds, then double."""
    leaves, args = {}, {}
    for name, value in opg.feeds.items():
        if name == UPSTREAM:
            continue
        if is_float(value):
            leaf = torch.tensor(value, dtype=torch.float64, requires_grad=name in opg.grads)
            leaves[name] = leaf
            args[name] = leaf * 2.0
        elif value.dtype == np.bool_:
            args[name] = torch.from_numpy(value.copy())
        else:
            args[name] = torch.from_numpy(value.astype(np.int64))
    out = torch_fn(**args)
    grads = {}
    if opg.grads and not out.requires_grad:  # the output does not depend on any float input
        grads = {name: np.zeros(leaves[name].shape) for name in opg.grads}
    elif opg.grads:
        upstream = torch.from_numpy(opg.feeds[UPSTREAM].astype(np.float64))
        (out * upstream).sum().backward()
        for name in opg.grads:
            g = leaves[name].grad
            grads[name] = np.zeros(leaves[name].shape) if g is None else g.numpy()
    return OpRun(out.detach().numpy(), grads)


def assert_runs_match(actual: OpRun, expected: OpRun, out_dtype: str, rtol: float, atol: float):
    assert actual.out.dtype == numpy_dtype(out_dtype), (actual.out.dtype, out_dtype)
    assert actual.out.shape == expected.out.shape, (actual.out.shape, expected.out.shape)
    if actual.out.dtype.kind == "f":
        np.testing.assert_allclose(actual.out, expected.out, rtol=rtol, atol=atol, err_msg="out")
    else:
        np.testing.assert_array_equal(actual.out, expected.out.astype(actual.out.dtype))
    assert set(actual.grads) == set(expected.grads)
    for name, g in actual.grads.items():
        assert g.shape == expected.grads[name].shape, (name, g.shape, expected.grads[name].shape)
        np.testing.assert_allclose(
            g, expected.grads[name], rtol=rtol, atol=atol, err_msg=f"gradient of {name!r}"
        )


def check_against_torch(
    fn: Callable[..., Tensor],
    arrays: Mapping[str, np.ndarray],
    device: str,
    torch_fn: Callable | None = None,
    wrt: Iterable[str] | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
    seed: int = 0,
) -> OpRun:
    """Forward and backward of `fn` on `device` against `torch_fn` (default: `fn` itself, for
    code that reads the same in both libraries)."""
    opg = op_graph(fn, arrays, wrt, seed)
    actual = run_meganeura(opg, device)
    expected = run_torch(torch_fn or fn, opg)
    assert_runs_match(actual, expected, opg.out.dtype, rtol, atol)
    for name, g in actual.grads.items():
        assert g.dtype == opg.feeds[name].dtype, (name, g.dtype)
    return actual


# -- finite differences ---------------------------------------------------------------------


def evaluate_float64(
    graph: Graph, roots: Iterable[int], feeds: Mapping[int, np.ndarray]
) -> dict[int, np.ndarray]:
    """Like the NumPy executor, but float nodes hold float64: the references run in float64."""
    values: dict[int, np.ndarray] = {}
    for nid in graph.live_nodes(roots):
        node = graph.nodes[nid]
        if nid in feeds:
            value = feeds[nid]
        elif node.op == "cast" and is_float(values[node.inputs[0]]) and node.type.dtype in FLOATS:
            value = values[node.inputs[0]]  # float64 stands in for every float dtype
        else:
            args = [values[i] for i in node.inputs]
            with np.errstate(all="ignore"):
                value = np.asarray(get_op(node.op).reference(args, node.attrs))
        dtype = np.float64 if node.type.dtype in FLOATS else numpy_dtype(node.type.dtype)
        assert value.shape == node.type.shape, (node.describe(), value.shape)
        values[nid] = value.astype(dtype)
    return values


def check_finite_differences(
    fn: Callable[..., Tensor],
    arrays: Mapping[str, np.ndarray],
    wrt: Iterable[str] | None = None,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
) -> OpGraph:
    """Every element of every VJP gradient against a central difference of the loss, all in
    float64 through the ops' NumPy references."""
    opg = op_graph(fn, arrays, wrt, seed)
    graph = opg.graph
    feeds = {
        graph.inputs[name]: value.astype(np.float64) if is_float(value) else value
        for name, value in opg.feeds.items()
    }
    grad_ids = {name: g.id for name, g in opg.grads.items()}
    analytic = evaluate_float64(graph, grad_ids.values(), feeds)
    for name, gid in grad_ids.items():
        nid = graph.inputs[name]
        base = feeds[nid]
        numeric = np.zeros_like(base)
        for index in np.ndindex(base.shape):
            losses = []
            for step in (eps, -eps):
                moved = base.copy()
                moved[index] += step
                values = evaluate_float64(graph, [opg.loss.id], {**feeds, nid: moved})
                losses.append(values[opg.loss.id])
            numeric[index] = (losses[0] - losses[1]) / (2 * eps)
        np.testing.assert_allclose(
            analytic[gid], numeric, rtol=rtol, atol=atol, err_msg=f"gradient of {name!r}"
        )
    return opg


# -- which matmul kernel ------------------------------------------------------------------------


@contextlib.contextmanager
def split_tiles(tile=None):
    """Products built within run on the split SIMT tiles (of shape `tile` where given)
    instead of the direct kernel that x @ W^T products of their size take."""
    from meganeura.backends.wgsl import matmul_direct, matmul_simt

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(matmul_direct, "fits", lambda mm: False))
        if tile is not None:
            stack.enter_context(mock.patch.object(matmul_simt, "choose_tile", lambda *_: tile))
        yield


def direct_products(session) -> int:
    """How many kernels of the session's last WebGPU program are direct products (generated
    again: call it where the program was built, inside any `split_tiles`)."""
    from meganeura.backends.wgsl.kernels import generate

    plan = session._last.plan
    return sum("var<workgroup> dp_red" in generate(plan, k).wgsl for k in plan.kernels)
