"""Finding the first kernel that produces an inf or NaN.

With `build(..., check_finite=True)` or `MEGANEURA_DEBUG_NAN=1`, a session checks its inputs
and parameters before each run, then runs the kernels one at a time and reads each output
back; the first output holding an inf or NaN raises `NonFiniteError`, naming the kernel, the
node it computes, the ops fused into it and the inputs it read. This waits for the device
after every kernel, so it is for debugging only.
"""

from __future__ import annotations

import os

import numpy as np

from meganeura.graph import Graph

ENV_VAR = "MEGANEURA_DEBUG_NAN"


def enabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "").strip() not in ("", "0")


class NonFiniteError(FloatingPointError):
    """A kernel (or an input) produced inf or NaN; `node` is the graph node holding it."""

    def __init__(self, message: str, node: int | None, kernel: str | None = None):
        super().__init__(message)
        self.node = node
        self.kernel = kernel


def first_non_finite(array: np.ndarray) -> str | None:
    """None if `array` is finite (or not float), else where and what its first bad value is."""
    if array.dtype.kind != "f":
        return None
    bad = ~np.isfinite(array)
    if not bad.any():
        return None
    flat = int(np.flatnonzero(bad.reshape(-1))[0])
    index = [int(i) for i in np.unravel_index(flat, array.shape)] if array.ndim else []
    value = array.reshape(-1)[flat]
    return f"{value} at index {index} ({int(bad.sum())} of {array.size} values are inf or nan)"


def check_sources(graph: Graph, values: dict[int, np.ndarray]) -> None:
    """Raise if an input or parameter value fed to a run is not finite."""
    for nid, value in values.items():
        problem = first_non_finite(np.asarray(value))
        if problem:
            node = graph.nodes[nid]
            raise NonFiniteError(
                f"{node.op} {node.name!r} ({node.type}) holds {problem} before the run", nid
            )


def fused_nodes(graph: Graph, nid: int, materialized: set[int]) -> list[int]:
    """The nodes computed inside the kernel of `nid` (inlined pointwise ops and views)."""
    out, stack, seen = [], list(graph.nodes[nid].inputs), set()
    while stack:
        i = stack.pop()
        if i in seen or i in materialized or graph.nodes[i].op in ("constant", "input"):
            continue
        seen.add(i)
        out.append(i)
        stack.extend(graph.nodes[i].inputs)
    return sorted(out)


def kernel_error(
    graph: Graph,
    nid: int,
    value: np.ndarray,
    reads: list[int],
    fused: list[int],
    kernel: str | None,
) -> NonFiniteError | None:
    """The error to raise if `value` (the output of the kernel computing `nid`) is not
    finite, else None."""
    problem = first_non_finite(value)
    if problem is None:
        return None
    where = f"kernel {kernel!r}" if kernel else "op"
    lines = [f"{where} computing %{nid} = {graph.nodes[nid].op} produced {problem}"]
    lines.append(f"  node:  {graph.nodes[nid].describe()}")
    if fused:
        lines.append("  fused: " + "; ".join(graph.nodes[i].describe() for i in fused))
    if reads:
        lines.append("  read (all finite): " + "; ".join(graph.nodes[i].describe() for i in reads))
    return NonFiniteError("\n".join(lines), nid, kernel)


# Views whose elements are elements of their first input (index values pass through them).
_VALUE_VIEWS = ("reshape", "permute", "broadcast_to", "slice", "flip", "tile")


def index_limits(graph: Graph) -> dict[int, list[tuple[int, tuple, str]]]:
    """For each graph input read as indices (through views only), the ranges its values must
    lie in: [(n, extra values allowed, the reading op)], from the ops' `index_inputs`."""
    from meganeura.ops import get_op

    limits: dict[int, list[tuple[int, tuple, str]]] = {}
    inputs = set(graph.inputs.values())
    for node in graph.nodes:
        declare = get_op(node.op).index_inputs
        if declare is None:
            continue
        types = [graph.nodes[i].type for i in node.inputs]
        for position, (n, extra) in declare(types, node.attrs).items():
            nid = node.inputs[position]
            while graph.nodes[nid].op in _VALUE_VIEWS:
                nid = graph.nodes[nid].inputs[0]
            if nid in inputs:
                limits.setdefault(nid, []).append((n, tuple(extra), node.describe()))
    return limits


def check_indices(name: str, array: np.ndarray, limits) -> None:
    """Raise IndexError if input `name` holds an index outside a range it is read with."""
    for n, extra, reader in limits:
        if array.size == 0 or (array.min() >= 0 and array.max() < n):
            continue  # every value in range (the usual case: no mask to build)
        bad = ((array < 0) | (array >= n)) & ~np.isin(array, extra)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            allowed = f"0..{n - 1}" + "".join(f" or {e}" for e in extra)
            raise IndexError(
                f"input {name!r}: value {int(array[where])} at {list(where)} is out of range "
                f"for {reader} (valid: {allowed})"
            )
