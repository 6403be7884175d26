"""Differential checks against PyTorch: one op placed mid-graph, forward and gradients.

The op's first input passes through tanh first and its output through y * y / 2 + y, and the
loss is the sum of that times a random upstream gradient, so the gradients that reach the
op are neither ones nor the op's own output. PyTorch computes in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from meganeura import Graph, Tensor, build, grad


def assert_close(got: np.ndarray, want: np.ndarray, rtol: float, what: str) -> None:
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * 0.1 * scale, err_msg=what)


def check_op(
    device: str,
    arrays: Mapping[str, np.ndarray],
    ours: Callable[..., Tensor],
    theirs: Callable[..., torch.Tensor],
    rtol: float = 1e-4,
    seed: int = 0,
    grads: bool = True,
) -> None:
    """ours(**tensors) and theirs(**torch tensors) must agree on the output and on the
    gradients of every float input."""
    rng = np.random.default_rng(seed)
    names = list(arrays)
    graph = Graph()
    inputs = {name: graph.input(name, a.shape, "f32") for name, a in arrays.items()}
    first = names[0]
    args = {**inputs, first: inputs[first].tanh()}
    y = ours(**args)
    graph.output("y", y)
    feeds = {name: a.astype(np.float32) for name, a in arrays.items()}
    upstream = rng.normal(size=y.shape).astype(np.float32)
    if grads:
        u = graph.input("upstream", y.shape)
        loss = ((y * y * 0.5 + y) * u).sum()
        for name, g in zip(names, grad(loss, list(inputs.values())), strict=True):
            graph.output(f"d_{name}", g)
        feeds["upstream"] = upstream
    got = build(graph, device=device).run(feeds)

    ref = {
        name: torch.tensor(a, dtype=torch.float64, requires_grad=True) for name, a in arrays.items()
    }
    want = theirs(**{**ref, first: ref[first].tanh()})
    assert_close(got["y"], want.detach().numpy(), rtol, "forward")
    if grads:
        ((want * want * 0.5 + want) * torch.tensor(upstream, dtype=torch.float64)).sum().backward()
        for name in names:
            assert_close(got[f"d_{name}"], ref[name].grad.numpy(), rtol, f"gradient of {name}")
