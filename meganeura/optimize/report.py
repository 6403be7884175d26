"""What the optimizer did: e-graph sizes, rules fired, fusions, kernels, seconds per stage."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from meganeura.graph import Graph
from meganeura.optimize.rules import built_ops


@dataclass
class OptimizeReport:
    """What the optimizer did to one graph (or, merged, to a session's graphs)."""

    enodes: int = 0
    eclasses: int = 0
    rules_fired: dict[str, int] = field(default_factory=dict)
    nodes_before: int = 0
    nodes_after: int = 0
    kernels_before: int = 0
    kernels_after: int = 0
    fusions: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    blocks: list[dict] = field(default_factory=list)
    regions: int = 0

    @property
    def optimize_seconds(self) -> float:
        return sum(self.seconds.values())

    def merge(self, other: OptimizeReport, stage: str) -> None:
        """Add another pass's report; its seconds are kept under `stage`."""
        self.enodes += other.enodes
        self.eclasses += other.eclasses
        for name, count in other.rules_fired.items():
            self.rules_fired[name] = self.rules_fired.get(name, 0) + count
        for name, count in other.fusions.items():
            self.fusions[name] = self.fusions.get(name, 0) + count
        for name, secs in other.seconds.items():
            key = f"{stage}.{name}"
            self.seconds[key] = self.seconds.get(key, 0.0) + secs
        self.blocks += [{**b, "stage": stage} for b in other.blocks]
        self.regions += other.regions

    def as_dict(self) -> dict:
        return {
            "optimize_seconds": round(self.optimize_seconds, 4),
            "kernels_before": self.kernels_before,
            "kernels_after": self.kernels_after,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "enodes": self.enodes,
            "eclasses": self.eclasses,
            "fusions": dict(sorted(self.fusions.items())),
            "rules_fired": dict(sorted(self.rules_fired.items())),
            "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
            "blocks": self.blocks,
            "regions": self.regions,
        }


# Kernels are counted as planned for a device that binds 16 storage buffers per kernel (what
# GPUs and lavapipe offer through WebGPU; the WebGPU minimum of 8 would split some kernels).
COUNTED_READS = 15


def count_kernels(graph: Graph, roots: Iterable[int]) -> tuple[int, int]:
    """(nodes, kernels) of one run of `roots`, the outputs and the updates of `graph`."""
    stats = step_stats(graph, roots)
    return stats.nodes, stats.kernels


@dataclass
class StepStats:
    nodes: int
    kernels: int
    ops: Counter  # live nodes by op


def step_stats(graph: Graph, roots: Iterable[int]) -> StepStats:
    """What one run of `roots`, the outputs and the updates of `graph` computes and launches
    (write-backs of the computed values included)."""
    from meganeura.lower.plan import select_kernels

    wanted = list(dict.fromkeys([*roots, *graph.outputs.values()]))
    live = set(graph.live_nodes([*wanted, *graph.updates.values()]))
    updates = dict(graph.updates)
    for target, values in graph.write_backs.items():
        updates.update((target, v) for v in values if v in live)
    _, kernels = select_kernels(graph, wanted, updates, max_reads=COUNTED_READS)
    live = graph.live_nodes([*wanted, *updates.values()])
    return StepStats(len(live), len(kernels), Counter(graph.nodes[n].op for n in live))


def fusions(before: StepStats, after: StepStats) -> dict[str, int]:
    """Fused ops the optimized graph has and the graph as written had not, by op."""
    out = {}
    for op in built_ops():
        gained = after.ops.get(op, 0) - before.ops.get(op, 0)
        if gained > 0:
            out[op] = gained
    return out
