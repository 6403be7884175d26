"""Segments of packed results: their index map, and the kernel of their gradient (the
segment's values in a zero tensor)."""

from __future__ import annotations

import math

from meganeura.backends.wgsl.emit import Emitter, literal, view_index_map
from meganeura.backends.wgsl.kernels import (
    WG,
    KernelSource,
    _assemble,
    _Bindings,
    _grid_1d,
    archetype,
)
from meganeura.lower.plan import Kernel, Plan


@view_index_map("segment")
def segment_index(emitter: Emitter, node, src_shape, idx: str) -> str:
    start = node.attrs["start"]
    return emitter.index(f"({idx} + {start}u)") if start else idx


@archetype("unsegment")
def unsegment(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    inner = graph.nodes[node.inputs[0]]
    start, size = node.attrs["start"], inner.type.size
    bind = _Bindings(plan, kernel.node)
    em = Emitter(graph, plan.materialized - {kernel.node}, bind.name_of, "  ")
    # Every invocation reads a valid index of the input and keeps it only inside the range.
    value = em.value(node.inputs[0], em.index(f"min(max(i, {start}u) - {start}u, {size - 1}u)"))
    n = node.type.size
    grid = _grid_1d(math.ceil(n / WG))
    zero = literal(0, node.type.dtype)
    body = (
        f"@compute @workgroup_size({WG})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
        f"  let i = (wid.y * {grid[0]}u + wid.x) * {WG}u + lid;\n"
        f"  if (i >= {n}u) {{ return; }}\n" + "\n".join(em.lines) + "\n"
        f"  buf{bind.out_buffer}[i] = select({zero}, {value}, i >= {start}u && i < {start + size}u);\n}}\n"
    )
    return KernelSource(_assemble(bind, body), bind.order, grid, f"unsegment%{node.id}")
