"""Row-normalization kernels: rms_norm, layer_norm and their input gradients.

One workgroup per row of the last axis. Each pass over the row accumulates sums in registers,
then a tree reduction in workgroup memory gives every thread the row totals; the last pass
writes the row. Statistics are computed in two passes (mean, then centered variance) for
accuracy, and the row is re-read each pass (it stays in cache) rather than stored.
"""

from __future__ import annotations

from meganeura.backends.wgsl.emit import Emitter
from meganeura.backends.wgsl.kernels import (
    KernelSource,
    _assemble,
    _Bindings,
    _grid_1d,
    archetype,
    product_store,
)
from meganeura.lower.plan import Kernel, Plan

ACCUMULATORS = 2  # row sums computed together in one pass


@archetype("norm")
def _norm(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node if kernel.core is None else kernel.core]
    op, eps = node.op, node.attrs["eps"]
    grad = op.endswith("_grad")
    centered = op.startswith("layer_norm")
    x_id = node.inputs[0]
    params = node.inputs[1:-1] if grad else node.inputs[1:]
    D = graph.nodes[x_id].type.shape[-1]
    rows = graph.nodes[x_id].type.size // D
    wg = 256 if D >= 1024 else 64
    grid = _grid_1d(rows)
    b = _Bindings(plan, kernel.node)
    out = f"buf{b.out_buffer}"

    def row_loop(statements, reads: str = "x") -> str:
        """A loop over the row; `statements(values)` gets the f32 values at the column of
        `reads`: x, weight (w), bias (b), upstream gradient (g); it returns WGSL lines."""
        em = Emitter(graph, plan.materialized, b.name_of, "    ")
        sources = {"x": (x_id, "j")}
        if params:
            sources["w"] = (params[0], "c")
        if len(params) == 2:
            sources["b"] = (params[1], "c")
        if grad:
            sources["g"] = (node.inputs[-1], "j")
        values = {
            name: f"f32({em.value(nid, idx)})"
            for name, (nid, idx) in sources.items()
            if name in reads
        }
        body = "\n".join(em.lines)
        return (
            f"  for (var c = lid; c < {D}u; c += {wg}u) {{\n    let j = base + c;\n{body}\n"
            f"{statements(values)}\n  }}\n"
        )

    def row_sums(names: list[str], statements, reads: str = "x") -> str:
        """Row totals `names` of the per-column terms that `statements` adds to them."""
        decl = "".join(f"  var {n} = 0.0f;\n" for n in names)
        store = "".join(f"  red{k}[lid] = {n};\n" for k, n in enumerate(names))
        tree = "".join(f"red{k}[lid] += red{k}[lid + h]; " for k in range(len(names)))
        load = "".join(f"  let {n}_total = red{k}[0];\n" for k, n in enumerate(names))
        return (
            decl
            + row_loop(statements, reads)
            + store
            + "  workgroupBarrier();\n"
            + f"  for (var h = {wg // 2}u; h > 0u; h = h >> 1u) {{\n"
            + f"    if (lid < h) {{ {tree}}}\n    workgroupBarrier();\n  }}\n"
            + load
            + "  workgroupBarrier();\n"
        )

    def weighted(v, name="g"):
        return f"{v[name]} * {v['w']}" if "w" in v else v[name]

    lines = []
    if centered:
        lines.append(row_sums(["s"], lambda v: f"    s += {v['x']};"))
        lines.append(f"  let mean = s_total / {float(D)!r};\n")
        lines.append(row_sums(["q"], lambda v: f"    let d = {v['x']} - mean;\n    q += d * d;"))
        lines.append(f"  let rstd = inverseSqrt(q_total / {float(D)!r} + {eps!r});\n")
        center = " - mean"
    else:
        center = ""
    if not grad:
        if not centered:
            lines.append(row_sums(["q"], lambda v: f"    q += {v['x']} * {v['x']};"))
            lines.append(f"  let rstd = inverseSqrt(q_total / {float(D)!r} + {eps!r});\n")

        def write(v):
            y = f"(({v['x']}{center}) * rstd)"
            if "w" in v:
                y = f"{y} * {v['w']}"
            if "b" in v:
                y = f"{y} + {v['b']}"
            return product_store(plan, kernel, b.name_of, out, y, "j", "    ").rstrip("\n")

    else:
        # dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat)), mean(gw) only when centered.
        def sums(v):
            text = f"    let gw = {weighted(v)};\n    let xc = {v['x']}{center};\n"
            text += "    dot += gw * xc;"
            if centered:
                text += "\n    sg += gw;"
            else:
                text += "\n    q += xc * xc;"
            return text

        lines.append(row_sums(["dot", "sg" if centered else "q"], sums, "xwg"))
        if not centered:
            lines.append(f"  let rstd = inverseSqrt(q_total / {float(D)!r} + {eps!r});\n")
        mean_gw = f" - sg_total / {float(D)!r}" if centered else ""
        lines.append(f"  let c_dot = dot_total * rstd * rstd / {float(D)!r};\n")

        def write(v):
            dx = f"rstd * ({weighted(v)}{mean_gw} - ({v['x']}{center}) * c_dot)"
            return product_store(plan, kernel, b.name_of, out, dx, "j", "    ").rstrip("\n")

    lines.append(row_loop(write, "xwbg"))
    shared = "".join(f"var<workgroup> red{k}: array<f32, {wg}>;\n" for k in range(ACCUMULATORS))
    body = (
        f"{shared}@compute @workgroup_size({wg})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
        f"  let r = wid.y * {grid[0]}u + wid.x;\n"
        f"  if (r >= {rows}u) {{ return; }}\n"
        f"  let base = r * {D}u;\n" + "".join(lines) + "}\n"
    )
    label = f"{op}%{node.id}"
    if kernel.core is not None:
        label += f"+{graph.nodes[kernel.node].op}%{kernel.node}"
    return KernelSource(_assemble(b, body), b.order, grid, label)
