"""argmax along an axis: one workgroup per output, invocations scanning strided columns,
then a tree over (value, index) pairs in workgroup memory. Ties take the first index and a
NaN beats every number (the first NaN wins), as in torch and NumPy: the order is decided
by `mn_argmax_before`, whose NaN test reads the bits, so no compiler can fold it away."""

from __future__ import annotations

from meganeura.backends.wgsl.emit import Emitter
from meganeura.backends.wgsl.kernels import (
    KernelSource,
    _assemble,
    _Bindings,
    _grid_1d,
    archetype,
    row_walk,
)
from meganeura.lower.plan import Kernel, Plan

BEFORE = """fn mn_argmax_nan(v: f32) -> bool { return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u; }
fn mn_argmax_before(v: f32, i: u32, w: f32, j: u32) -> bool {
  let vn = mn_argmax_nan(v); let wn = mn_argmax_nan(w);
  if (vn || wn) { return vn && (!wn || i < j); }
  return v > w || (v == w && i < j);
}
"""
NONE = "0xffffffffu"  # the index of an invocation that saw no element: loses every tie


@archetype("argmax")
def argmax(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    x = graph.nodes[node.inputs[0]]
    C, rows, base, col = row_walk(x.type.shape, node.attrs["axis"])
    b = _Bindings(plan, kernel.node)
    out = f"buf{b.out_buffer}"
    wg = 256 if C >= 1024 else 64
    grid = _grid_1d(rows)
    em = Emitter(graph, plan.materialized, b.name_of, "    ")
    value = em.value(node.inputs[0], em.index(col))
    loads = "\n".join(em.lines)
    body = f"""{BEFORE}var<workgroup> best_v: array<f32, {wg}>;
var<workgroup> best_i: array<u32, {wg}>;
@compute @workgroup_size({wg})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
  let r = wid.y * {grid[0]}u + wid.x;
  if (r >= {rows}u) {{ return; }}
  let base = {base};
  var v = mn_bits(0xff800000u);  // -inf (a constant -inf would not compile)
  var i = {NONE};
  for (var c = lid; c < {C}u; c += {wg}u) {{
{loads}
    let x = f32({value});
    if (mn_argmax_before(x, c, v, i)) {{ v = x; i = c; }}
  }}
  best_v[lid] = v;
  best_i[lid] = i;
  workgroupBarrier();
  for (var h = {wg // 2}u; h > 0u; h = h >> 1u) {{
    if (lid < h && mn_argmax_before(best_v[lid + h], best_i[lid + h], best_v[lid], best_i[lid])) {{
      best_v[lid] = best_v[lid + h];
      best_i[lid] = best_i[lid + h];
    }}
    workgroupBarrier();
  }}
  if (lid == 0u) {{ {out}[r] = i32(best_i[0]); }}
}}
"""
    return KernelSource(_assemble(b, body), b.order, grid, f"argmax%{node.id}")
