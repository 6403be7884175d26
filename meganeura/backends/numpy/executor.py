"""The NumPy executor: runs a graph node by node with each op's reference implementation.

It is the oracle the generated kernels are tested against, and the CPU fallback device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from meganeura.graph import Graph, numpy_dtype
from meganeura.ops import get_op


def evaluate(
    graph: Graph, roots: Iterable[int], feeds: Mapping[int, np.ndarray]
) -> dict[int, np.ndarray]:
    """Values of `roots` (and every node they need), given arrays for the source nodes."""
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

    def run(self, feeds: Mapping[int, np.ndarray]) -> None:
        persistent = self.executor.values
        all_feeds = {**persistent, **feeds}
        wanted = self.roots + list(self.updates.values())
        self.values = evaluate(self.graph, wanted, all_feeds)
        for target, source in self.updates.items():
            persistent[target] = self.values[source]

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
