"""The NumPy executor: runs a graph node by node with each op's reference implementation.

It is the oracle the generated kernels are tested against, and the CPU fallback device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from meganeura.debug import kernel_error
from meganeura.graph import Graph, numpy_dtype
from meganeura.ops import get_op


def evaluate(
    graph: Graph,
    roots: Iterable[int],
    feeds: Mapping[int, np.ndarray],
    check: Callable[[int, np.ndarray], None] | None = None,
) -> dict[int, np.ndarray]:
    """Values of `roots` (and every node they need), given arrays for the source nodes.

    `check(node id, value)` is called on each computed value, in order."""
    values: dict[int, np.ndarray] = {}
    roots = list(roots)
    for nid in graph.live_nodes(roots):
        node = graph.nodes[nid]
        if nid in feeds:
            values[nid] = feeds[nid]
            continue
        opdef = get_op(node.op)
        if opdef.reference is None:
            raise KeyError(f"no value fed for {node.describe()}")
        args = [values[i] for i in node.inputs]
        with np.errstate(all="ignore"):
            out = opdef.reference(args, node.attrs)
        out = np.asarray(out)
        if out.shape != node.type.shape or out.dtype != numpy_dtype(node.type.dtype):
            out = np.asarray(
                np.broadcast_to(out, node.type.shape), numpy_dtype(node.type.dtype), order="C"
            )
        values[nid] = out
        if check is not None:
            check(nid, out)
    return values


class NumpyProgram:
    def __init__(
        self, executor: NumpyExecutor, graph: Graph, roots: list[int], updates: dict[int, int]
    ):
        self.executor = executor
        self.graph = graph
        self.roots = list(roots)
        self.updates = dict(updates)
        self.values: dict[int, np.ndarray] = {}

    def run(self, feeds: Mapping[int, np.ndarray], check_finite: bool = False) -> None:
        """Run the graph; with `check_finite`, raise NonFiniteError at the first op whose
        output holds an inf or NaN (before any update is applied)."""
        persistent = self.executor.values
        all_feeds = {**persistent, **feeds}
        wanted = self.roots + list(self.updates.values())
        check = self._check if check_finite else None
        self.values = evaluate(self.graph, wanted, all_feeds, check)
        for target, source in self.updates.items():
            persistent[target] = self.values[source]

    def _check(self, nid: int, value: np.ndarray) -> None:
        error = kernel_error(self.graph, nid, value, list(self.graph.nodes[nid].inputs), [], None)
        if error is not None:
            raise error

    def read(self, nid: int) -> np.ndarray:
        return self.values[nid].copy()


class NumpyExecutor:
    description = "cpu (NumPy executor)"

    def __init__(self):
        self.values: dict[int, np.ndarray] = {}

    def set_value(self, nid: int, array: np.ndarray) -> None:
        self.values[nid] = array.copy()

    def get_value(self, nid: int) -> np.ndarray:
        return self.values[nid].copy()

    def compile(self, graph: Graph, roots: list[int], updates: dict[int, int]) -> NumpyProgram:
        return NumpyProgram(self, graph, roots, updates)
