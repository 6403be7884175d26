"""Scatter-add kernels (the gradients of gather, index_select and embedding), without atomics.

Each output element sums its contributions in index order, so results are deterministic and
need no float atomics (which WebGPU lacks). index_add shares the index scan of a workgroup:
the workgroup owns one position along the axis, flags the index entries equal to it, a chunk
at a time, in workgroup memory, and every thread adds the flagged source slices to its
columns.
"""

from __future__ import annotations

import math

from meganeura.backends.wgsl.emit import Emitter
from meganeura.backends.wgsl.kernels import (
    WG,
    KernelSource,
    _assemble,
    _Bindings,
    _cast_out,
    _grid_1d,
    archetype,
)
from meganeura.backends.wgsl.views import linear_index
from meganeura.lower.plan import Kernel, Plan

INDEX_ADD_WG = 64
MAX_COLUMNS = 8  # output elements per thread of index_add


def _read(plan: Plan, bindings: _Bindings, nid: int, idx: str, indent: str) -> tuple[str, str]:
    em = Emitter(plan.graph, plan.materialized, bindings.name_of, indent)
    value = em.value(nid, em.index(idx))
    return "\n".join(em.lines), value


@archetype("scatter_add")
def _scatter_add(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    src_id, index_id = node.inputs
    index_shape = graph.nodes[index_id].type.shape
    shape, axis = node.type.shape, node.attrs["axis"]
    b = _Bindings(plan, kernel.node)
    out = f"buf{b.out_buffer}"
    n = node.type.size
    grid = _grid_1d(math.ceil(n / WG))
    coords = [Emitter.coord("o", shape, d) if size > 1 else "0u" for d, size in enumerate(shape)]
    # Positions beyond the index's extent (gather allows a smaller index) receive nothing.
    outside = [
        f"{coords[d]} >= {index_shape[d]}u"
        for d in range(len(shape))
        if d != axis and index_shape[d] < shape[d]
    ]
    at = list(coords)
    at[axis] = "k"
    index_lines, index_v = _read(plan, b, index_id, linear_index(at, index_shape), "    ")
    src_lines, src_v = _read(plan, b, src_id, linear_index(at, index_shape), "      ")
    skip = f"  if ({' || '.join(outside)}) {{ {out}[o] = {_cast_out('0.0', node.type.dtype)}; return; }}\n"
    body = (
        f"@compute @workgroup_size({WG})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
        f"  let o = (wid.y * {grid[0]}u + wid.x) * {WG}u + lid;\n"
        f"  if (o >= {n}u) {{ return; }}\n"
        + (skip if outside else "")
        + f"  let wanted = i32({coords[axis]});\n"
        "  var acc = 0.0f;\n"
        f"  for (var k = 0u; k < {index_shape[axis]}u; k++) {{\n{index_lines}\n"
        f"    if (i32({index_v}) == wanted) {{\n{src_lines}\n      acc += f32({src_v});\n    }}\n"
        "  }\n"
        f"  {out}[o] = {_cast_out('acc', node.type.dtype)};\n}}\n"
    )
    return KernelSource(_assemble(b, body), b.order, grid, f"scatter_add%{node.id}")


@archetype("index_add")
def _index_add(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    src_id, index_id = node.inputs
    shape, axis, size = node.type.shape, node.attrs["axis"], node.attrs["size"]
    K = graph.nodes[index_id].type.shape[0]
    post = math.prod(shape[axis + 1 :])
    columns = math.prod(shape) // size  # elements per position along the axis
    wg = INDEX_ADD_WG
    per_thread = min(MAX_COLUMNS, math.ceil(columns / wg))
    blocks = math.ceil(columns / (wg * per_thread))
    grid = _grid_1d(size * blocks)
    b = _Bindings(plan, kernel.node)
    out = f"buf{b.out_buffer}"
    index_lines, index_v = _read(plan, b, index_id, "t", "    ")
    src_index = f"(m / {post}u) * {K * post}u + (t0 + kk) * {post}u + m % {post}u"
    src_lines, src_v = _read(plan, b, src_id, src_index, "            ")
    body = f"""var<workgroup> hits: array<u32, {wg}>;
@compute @workgroup_size({wg})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
  let group = wid.y * {grid[0]}u + wid.x;
  if (group >= {size * blocks}u) {{ return; }}
  let pos = group / {blocks}u;
  let m0 = (group % {blocks}u) * {wg * per_thread}u + lid;
  var acc: array<f32, {per_thread}>;
  for (var t0 = 0u; t0 < {K}u; t0 += {wg}u) {{
    let t = min(t0 + lid, {K - 1}u);
{index_lines}
    hits[lid] = select(0u, 1u, t0 + lid < {K}u && i32({index_v}) == i32(pos));
    workgroupBarrier();
    for (var kk = 0u; kk < min({wg}u, {K}u - t0); kk++) {{
      if (hits[kk] != 0u) {{
        for (var c = 0u; c < {per_thread}u; c++) {{
          let m = m0 + c * {wg}u;
          if (m < {columns}u) {{
{src_lines}
            acc[c] += f32({src_v});
          }}
        }}
      }}
    }}
    workgroupBarrier();
  }}
  for (var c = 0u; c < {per_thread}u; c++) {{
    let m = m0 + c * {wg}u;
    if (m < {columns}u) {{
      {out}[(m / {post}u) * {size * post}u + pos * {post}u + m % {post}u] = {_cast_out("acc[c]", node.type.dtype)};
    }}
  }}
}}
"""
    return KernelSource(_assemble(b, body), b.order, grid, f"index_add%{node.id}")
