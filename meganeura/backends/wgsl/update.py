"""Kernels of in-place partial updates (meganeura.ops.update).

When the planner gave `write_rows` its destination's buffer, one thread per written element
stores the rows and nothing else is touched; otherwise one thread per destination element
copies it or takes the row that replaces it.
"""

from __future__ import annotations

import math

from meganeura.backends.wgsl.emit import Emitter, store_value
from meganeura.backends.wgsl.kernels import (
    WG,
    KernelSource,
    _assemble,
    _Bindings,
    _grid_1d,
    archetype,
)
from meganeura.lower.plan import Kernel, Plan


def rows_layout(graph, node) -> tuple[int, int, int]:
    """(inner, length, count) of write_rows `node`: elements after its axis, the
    destination's length along it, the rows' count along it."""
    dest, rows = (graph.nodes[i].type for i in node.inputs[:2])
    axis = node.attrs["axis"]
    return math.prod(dest.shape[axis + 1 :]), dest.shape[axis], rows.shape[axis]


def clamped_position(em: Emitter, node, name: str) -> None:
    """Emit `let name`: write_rows `node`'s run-time position, clamped so the rows fit."""
    _, length, count = rows_layout(em.graph, node)
    position = em.value(node.inputs[2], "0u")
    em.lines.append(f"{em.indent}let {name} = u32(clamp(i32({position}), 0i, {length - count}i));")


def row_destination(layout: tuple[int, int, int], i: str, p: str) -> str:
    """WGSL index into the destination of rows element `i` written at position `p`."""
    inner, length, count = layout
    outer, row = f"({i} / {count * inner}u)", f"(({i} / {inner}u) % {count}u + {p})"
    return f"{outer} * {length * inner}u + {row} * {inner}u + {i} % {inner}u"


@archetype("write_rows")
def write_rows(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    dest_id, rows_id, _ = node.inputs
    dest, rows = graph.nodes[dest_id].type, graph.nodes[rows_id].type
    inner, length, count = layout = rows_layout(graph, node)
    b = _Bindings(plan, kernel.node)
    out = f"buf{b.out_buffer}"
    em = Emitter(graph, plan.materialized - {kernel.node}, b.name_of, "  ")
    clamped_position(em, node, "p")
    aliased = plan.buffer_of[dest_id] == plan.buffer_of[kernel.node]
    if aliased:
        total = rows.size
        value = em.value(rows_id, "i")
        store = (
            f"  {out}[{row_destination(layout, 'i', 'p')}] = {store_value(value, node.type.dtype)};"
        )
    else:
        total = dest.size
        em.lines.append(f"  let outer = i / {length * inner}u;")
        em.lines.append(f"  let c = (i / {inner}u) % {length}u;")
        em.lines.append("  let inside = c >= p && c < p + " + f"{count}u;")
        em.lines.append(
            f"  let j = outer * {count * inner}u + min(c - min(p, c), {count - 1}u) * {inner}u"
            f" + i % {inner}u;"
        )
        new = em.value(rows_id, "j")
        old = em.value(dest_id, "i")
        store = f"  {out}[i] = {store_value(f'select({old}, {new}, inside)', node.type.dtype)};"
    grid = _grid_1d(math.ceil(total / WG))
    body = (
        f"@compute @workgroup_size({WG})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
        f"  let i = (wid.y * {grid[0]}u + wid.x) * {WG}u + lid;\n"
        f"  if (i >= {total}u) {{ return; }}\n" + "\n".join(em.lines) + "\n" + store + "\n}\n"
    )
    return KernelSource(_assemble(b, body), b.order, grid, f"write_rows%{node.id}")
