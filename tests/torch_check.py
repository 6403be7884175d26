"""Forward and backward of meganeura code against float64 PyTorch, on one device.

`check(fn, torch_fn, inputs, device)` builds `fn(*tensors)` (the inputs in order), each float
input fed halved and doubled inside the graph (so the op reads a computed value, not a buffer:
views and prologues are fused into it), takes the gradient of `sum(out * upstream)` for a
random `upstream` with respect to every float input, and compares output and gradients with
`torch_fn` computing the same in float64. `fn` may return a list of tensors (split); each
gets an upstream of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

import meganeura as mn
from meganeura.graph import dtype_of_array
from tests.harness import DEVICES as DEVICES  # cpu, lavapipe and (marked) hardware GPU


def normal(rng: np.random.Generator, *shape, scale: float = 1.0) -> np.ndarray:
    return np.asarray(rng.standard_normal(shape) * scale, np.float32)


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def run_meganeura(fn: Callable, inputs: Mapping[str, np.ndarray], device: str, seed: int = 0):
    """(outputs, gradients by input name) of `fn` on `device`."""
    graph = mn.Graph()
    args, feeds, sources = {}, {}, {}
    for name, array in inputs.items():
        array = np.asarray(array)
        sources[name] = graph.input(name, array.shape, dtype_of_array(array))
        if array.dtype.kind == "f":
            feeds[name] = (array / 2).astype(array.dtype)
            args[name] = sources[name] * 2.0
        else:
            feeds[name] = array
            args[name] = sources[name]
    outs = _as_list(fn(*args.values()))
    rng = np.random.default_rng(seed)
    loss = None
    for k, out in enumerate(outs):
        graph.output(f"out{k}", out)
        if out.dtype == "f32":
            upstream = graph.input(f"upstream{k}", out.shape)
            feeds[f"upstream{k}"] = normal(rng, *out.shape)
            term = (out * upstream).sum()
            loss = term if loss is None else loss + term
    wrt = [name for name, a in inputs.items() if np.asarray(a).dtype.kind == "f"]
    if loss is not None and wrt:
        for name, g in zip(wrt, mn.grad(loss, [sources[n] for n in wrt]), strict=True):
            graph.output(f"grad_{name}", g)
    values = mn.build(graph, device=device).run(feeds)
    results = [values[f"out{k}"] for k in range(len(outs))]
    grads = {name: values[f"grad_{name}"] for name in wrt if f"grad_{name}" in values}
    return results, grads, feeds


def run_torch(torch_fn: Callable, inputs: Mapping[str, np.ndarray], feeds: Mapping):
    leaves, args = {}, {}
    for name, array in inputs.items():
        array = np.asarray(array)
        if array.dtype.kind == "f":
            leaves[name] = torch.tensor(feeds[name], dtype=torch.float64, requires_grad=True)
            args[name] = leaves[name] * 2.0
        elif array.dtype == np.bool_:
            args[name] = torch.from_numpy(array.copy())
        else:
            args[name] = torch.from_numpy(array.astype(np.int64))
    outs = _as_list(torch_fn(*args.values()))
    loss = None
    for k, out in enumerate(outs):
        if f"upstream{k}" in feeds and out.requires_grad:
            upstream = torch.from_numpy(feeds[f"upstream{k}"].astype(np.float64))
            term = (out * upstream).sum()
            loss = term if loss is None else loss + term
    if loss is not None:
        loss.backward()
    grads = {
        name: (np.zeros(leaf.shape) if leaf.grad is None else leaf.grad.numpy())
        for name, leaf in leaves.items()
    }
    return [out.detach().numpy() for out in outs], grads


def check(
    fn: Callable,
    torch_fn: Callable,
    inputs: Mapping[str, np.ndarray],
    device: str,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    seed: int = 0,
):
    """Outputs and input gradients of `fn` on `device` against `torch_fn` in float64."""
    outs, grads, feeds = run_meganeura(fn, inputs, device, seed)
    expected_outs, expected_grads = run_torch(torch_fn, inputs, feeds)
    assert len(outs) == len(expected_outs)
    for k, (got, want) in enumerate(zip(outs, expected_outs, strict=True)):
        assert got.shape == want.shape, f"output {k}: shape {got.shape} != {want.shape}"
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"output {k}")
        else:
            np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=f"output {k}")
    for name, g in grads.items():
        np.testing.assert_allclose(
            g, expected_grads[name], rtol=rtol, atol=atol, err_msg=f"gradient of {name!r}"
        )
    return outs, grads
