"""Reverse-mode autodiff as a graph transformation.

Walk the nodes that lie between the loss and the wanted tensors in reverse topological order,
call each op's VJP rule (written with ordinary ops) and sum the contributions. The gradients
are ordinary nodes of the same graph, so they are optimized, fused and planned like the
forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence

from meganeura.graph import Tensor
from meganeura.ops import get_op

FLOAT_DTYPES = ("f32", "f16")


def grad(loss: Tensor, wrt: Sequence[Tensor], seed: Tensor | None = None) -> list[Tensor]:
    """Gradients of `loss` with respect to each tensor of `wrt`, appended to loss's graph.

    `loss` must be a scalar unless `seed` (the upstream gradient, shaped like loss) is given.
    A tensor that loss does not depend on gets a zero gradient.
    """
    graph = loss.graph
    if seed is None:
        if loss.shape != ():
            raise ValueError(
                f"grad: loss must be a scalar, got shape {list(loss.shape)}; pass seed="
            )
        seed = graph.constant(1.0, loss.dtype)
    elif seed.shape != loss.shape:
        raise ValueError(f"grad: seed {list(seed.shape)} must match loss {list(loss.shape)}")
    targets = {t.id for t in wrt}
    # Nodes on a path from any target to the loss.
    reaches = [False] * (loss.id + 1)
    for node in graph.nodes[: loss.id + 1]:
        reaches[node.id] = node.id in targets or any(reaches[i] for i in node.inputs)
    needed = set(graph.live_nodes([loss.id]))

    grads: dict[int, Tensor] = {loss.id: seed}
    for nid in range(loss.id, -1, -1):
        if nid not in grads or nid not in needed:
            continue
        node = graph.nodes[nid]
        if not node.inputs:
            continue
        opdef = get_op(node.op)
        wanted = [reaches[i] and graph.nodes[i].type.dtype in FLOAT_DTYPES for i in node.inputs]
        if not any(wanted):
            continue
        if opdef.vjp is None:
            raise NotImplementedError(
                f"grad: op {node.op!r} has no VJP rule (node {node.describe()})"
            )
        inputs = [Tensor(graph, i) for i in node.inputs]
        contributions = opdef.vjp(grads[nid], inputs, Tensor(graph, nid), node.attrs)
        for i, want, contribution in zip(node.inputs, wanted, contributions, strict=True):
            if not want or contribution is None:
                continue
            if contribution.shape != graph.nodes[i].type.shape:
                target = graph.nodes[i].describe()
                raise AssertionError(
                    f"VJP of {node.op} gave a {contribution.type} gradient for {target}"
                )
            grads[i] = grads[i] + contribution if i in grads else contribution
    out = []
    for t in wrt:
        if t.id in grads:
            out.append(grads[t.id])
        else:
            out.append(
                graph.constant(0.0, t.dtype).broadcast_to(t.shape)
                if t.shape
                else graph.constant(0.0, t.dtype)
            )
    return out
