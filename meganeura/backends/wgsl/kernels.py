"""WGSL generation for each kernel archetype of a Plan.

`generate(plan, kernel, binding_limit)` returns a `KernelSource`: the WGSL text, the buffers it
binds (in binding order, the written one first) and the workgroup grid to dispatch. Shapes and
strides are compile-time constants, so no uniforms are needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from meganeura.backends.wgsl.emit import (
    STORAGE_TYPE,
    Emitter,
    contiguous_strides,
    literal,
    prelude_for,
    store_value,
)
from meganeura.lower.plan import Kernel, Plan, strided_view

MAX_GROUPS = 65535


@dataclass
class KernelSource:
    wgsl: str
    bindings: list[int]  # buffer ids; bindings[0] is written
    grid: tuple[int, int, int]
    label: str
    # Scratch buffers (bytes each) of the kernel's own, bound after `bindings`: what a kernel
    # of several dispatches passes from one to the next.
    scratch: tuple[int, ...] = ()
    # Dispatches run right after this one, each binding its own `bindings`, then the scratch.
    after: list[KernelSource] = field(default_factory=list)
    # Constant arrays (4-byte elements) bound after the scratch, written once when the
    # program is built: a row write's table of columns (Kernel.writes).
    tables: tuple[np.ndarray, ...] = ()


def _grid_1d(groups: int) -> tuple[int, int, int]:
    gx = min(groups, MAX_GROUPS)
    return gx, math.ceil(groups / gx), 1


class _Bindings:
    """Buffer bindings of one kernel: one per physical buffer, the output read_write."""

    def __init__(self, plan: Plan, out_node: int):
        self.plan = plan
        self.out_buffer = plan.buffer_of[out_node]
        self.order = [self.out_buffer]
        self.dtypes = {self.out_buffer: plan.graph.nodes[out_node].type.dtype}
        self.written = {self.out_buffer}

    def output(self, nid: int) -> str:
        """The name of the buffer of `nid`, which the kernel writes (a side output)."""
        name = self.name_of(nid)
        self.written.add(self.plan.buffer_of[nid])
        return name

    def name_of(self, nid: int) -> str:
        buf = self.plan.buffer_of[nid]
        if buf not in self.order:
            self.order.append(buf)
            self.dtypes[buf] = self.plan.graph.nodes[nid].type.dtype
        return f"buf{buf}"

    def declarations(self) -> str:
        lines = []
        for n, buf in enumerate(self.order):
            access = "read_write" if buf in self.written else "read"
            ty = STORAGE_TYPE[self.dtypes[buf]]
            lines.append(f"@group(0) @binding({n}) var<storage, {access}> buf{buf}: array<{ty}>;")
        return "\n".join(lines)


def operand_view(plan: Plan, nid: int, name_of):
    """How a strided archetype reads its input `nid`: (base node, strides, element offset,
    name, function). An affine view of a buffer gives that buffer's node and WGSL name and no
    function; a computed operand (OpDef.computed_inputs) gives base None, the contiguous
    strides of its own shape and the WGSL function evaluating it, named `name`, which the
    kernel must include."""
    view = strided_view(plan.graph, nid, plan.materialized)
    if view is not None:
        base, strides, offset = view
        return base, strides, offset, name_of(base), ""
    name = f"mn_operand{nid}"
    shape = plan.graph.nodes[nid].type.shape
    return None, contiguous_strides(shape), 0, name, operand_function(plan, nid, name_of, name)


def operand_function(plan: Plan, nid: int, name_of, name: str) -> str:
    """WGSL `fn name(i: u32) -> f32`: the value of the inlined node `nid` at linear index i.
    Archetypes read a computed operand (OpDef.computed_inputs) through it; `name_of` binds the
    buffers its DAG loads."""
    em = Emitter(plan.graph, plan.materialized, name_of, "  ")
    value = em.value(nid, "i")
    return "\n".join([f"fn {name}(i: u32) -> f32 {{", *em.lines, f"  return f32({value});", "}\n"])


# Subgroup sums (plan option `subgroup_sums`, set where the start-up check found them right,
# see backends/webgpu/subgroups.py): each subgroup adds its invocations' values in one
# operation and its first invocation stores the total, so a sum over a team of 32 lanes or
# a whole workgroup takes one barrier instead of one per halving of a tree. Kernels using
# them assume subgroups of consecutive invocations (local_invocation_index) whose size
# divides 32, and take these built-ins as `sg_size` and `sg_id`.
SUBGROUPS_ENABLE = "enable subgroups;\n"
SUBGROUP_BUILTINS = (
    ", @builtin(subgroup_size) sg_size: u32, @builtin(subgroup_invocation_id) sg_id: u32"
)


def _assemble(bindings: _Bindings, body: str, extra_decls: str = "") -> str:
    header = ""
    if "f16" in body or "f16" in bindings.declarations():
        header = "enable f16;\n"
    return f"{header}{bindings.declarations()}\n{extra_decls}{prelude_for(body)}\n{body}"


def generate(plan: Plan, kernel: Kernel) -> KernelSource:
    node = plan.graph.nodes[kernel.node]
    archetype = ARCHETYPES.get(node.op) or ARCHETYPES.get(kernel.kind)
    if archetype is None:
        raise AssertionError(f"no WGSL archetype for {node.describe()} (kind {kernel.kind!r})")
    return archetype(plan, kernel)


# -- pointwise ------------------------------------------------------------------------------

WG = 256
# Pointwise kernels of at least this many elements give each invocation POINTWISE_ELEMENTS
# of them (WG apart, so a workgroup's loads stay coalesced), all loaded before any is stored:
# with one element each, a large kernel keeps too few bytes in flight to reach the memory's
# bandwidth (on an H200 a y = 2x kernel over 512 MiB ran at 1.4-1.6 TB/s, torch's copy 4.2).
POINTWISE_MANY = 1 << 18
POINTWISE_ELEMENTS = 4


def _pointwise(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    b = _Bindings(plan, kernel.node)
    out = f"buf{b.out_buffer}"
    em = Emitter(graph, plan.materialized - {kernel.node, *kernel.also}, b.name_of, "  ")
    n = node.type.size
    per = POINTWISE_ELEMENTS if n >= POINTWISE_MANY else 1
    grid = _grid_1d(math.ceil(n / (WG * per)))
    first = f"(wid.y * {grid[0]}u + wid.x) * {WG * per}u + lid"
    if per == 1:
        head = [f"  let i = {first};", f"  if (i >= {n}u) {{ return; }}"]
        indices = [("i", None)]
    else:  # element e at first + e * WG, computed at a clamped index, stored only when in range
        head = [f"  let i = {first};"]
        indices = []
        for e in range(per):
            head.append(f"  let i{e} = min(i + {e * WG}u, {n - 1}u);")
            indices.append((f"i{e}", f"i + {e * WG}u < {n}u"))
    stores = []
    outputs = [(kernel.node, out), *((side, b.output(side)) for side in kernel.also)]
    values = {(nid, idx): em.value(nid, idx) for idx, _ in indices for nid, _ in outputs}
    for idx, guard in indices:
        for nid, buf in outputs:  # side outputs: computed inside this kernel's DAG, stored too
            value = store_value(values[nid, idx], graph.nodes[nid].type.dtype)
            store = f"{buf}[{idx}] = {value};"
            stores.append(f"  {store}" if guard is None else f"  if ({guard}) {{ {store} }}")
    body = (
        f"@compute @workgroup_size({WG})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
        + "\n".join([*head, *em.lines, *stores])
        + "\n}\n"
    )
    label = "+".join(f"{graph.nodes[i].op}%{i}" for i in (kernel.node, *kernel.also))
    return KernelSource(_assemble(b, body), b.order, grid, label)


# -- reductions ---------------------------------------------------------------------------


def _reduce(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    src = graph.nodes[node.inputs[0]]
    axes = node.attrs["axes"]
    shape = src.type.shape
    strides = contiguous_strides(shape)
    kept = [d for d in range(len(shape)) if d not in axes]
    kept_shape = [shape[d] for d in kept]
    red_shape = [shape[d] for d in axes]
    outputs, R = math.prod(kept_shape), math.prod(red_shape)
    dtype = node.type.dtype
    acc_ty = "f32" if dtype in ("f32", "f16") else STORAGE_TYPE[dtype]
    if node.op == "max":
        init = "mn_bits(0xff800000u)" if acc_ty == "f32" else "(-2147483647i - 1i)"
        combine = "max({a}, {b})"
    else:
        init = literal(0, acc_ty)
        combine = "({a} + {b})"
    finish = "acc"
    if node.op == "mean":
        finish = f"acc * {literal(1.0 / R, 'f32')}"
    b = _Bindings(plan, kernel.node)
    out = f"buf{b.out_buffer}"

    def offset(var: str, dims: list[int]) -> str:
        sub = [shape[d] for d in dims]
        if dims == list(range(len(shape) - len(dims), len(shape))):
            return var  # trailing dims: the linear index is the offset
        terms = []
        for k, d in enumerate(dims):
            c = Emitter.coord(var, sub, k)
            terms.append(c if strides[d] == 1 else f"{c} * {strides[d]}u")
        return " + ".join(terms) if terms else "0u"

    if kept == list(range(len(kept))):
        base = f"o * {R}u" if R > 1 else "o"
    else:
        base = offset("o", kept) if kept else "0u"
    roff = offset("r", list(axes))
    em = Emitter(graph, plan.materialized, b.name_of, "    ")
    v = em.value(node.inputs[0], "j")
    if src.type.dtype != acc_ty and acc_ty == "f32":
        v = f"f32({v})"
    loop_body = "\n".join(em.lines)
    per_group = R >= 256 or (R >= 16 and outputs < 4096)
    if per_group:
        wg = 256 if R >= 256 else 64
        grid = _grid_1d(outputs)
        body = (
            f"var<workgroup> red: array<{acc_ty}, {wg}>;\n"
            f"@compute @workgroup_size({wg})\n"
            "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
            f"  let o = wid.y * {grid[0]}u + wid.x;\n"
            f"  if (o >= {outputs}u) {{ return; }}\n"
            f"  let base = {base};\n"
            f"  var acc = {init};\n"
            f"  for (var r = lid; r < {R}u; r += {wg}u) {{\n"
            f"    let j = base + {roff};\n{loop_body}\n"
            f"    acc = {combine.format(a='acc', b=v)};\n  }}\n"
            "  red[lid] = acc;\n  workgroupBarrier();\n"
            f"  for (var s = {wg // 2}u; s > 0u; s = s >> 1u) {{\n"
            f"    if (lid < s) {{ red[lid] = {combine.format(a='red[lid]', b='red[lid + s]')}; }}\n"
            "    workgroupBarrier();\n  }\n"
            f"  if (lid == 0u) {{ let acc = red[0]; {out}[o] = {_cast_out(finish, dtype)}; }}\n}}\n"
        )
    else:
        grid = _grid_1d(math.ceil(outputs / WG))
        body = (
            f"@compute @workgroup_size({WG})\n"
            "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
            f"  let o = (wid.y * {grid[0]}u + wid.x) * {WG}u + lid;\n"
            f"  if (o >= {outputs}u) {{ return; }}\n"
            f"  let base = {base};\n"
            f"  var acc = {init};\n"
            f"  for (var r = 0u; r < {R}u; r++) {{\n"
            f"    let j = base + {roff};\n{loop_body}\n"
            f"    acc = {combine.format(a='acc', b=v)};\n  }}\n"
            f"  {out}[o] = {_cast_out(finish, dtype)};\n}}\n"
        )
    return KernelSource(_assemble(b, body), b.order, grid, f"{node.op}%{node.id}")


def _cast_out(expr: str, dtype: str) -> str:
    return f"f16({expr})" if dtype == "f16" else expr


def epilogue_buffers(plan: Plan, kernel: Kernel) -> set[int]:
    """Buffers a kernel's epilogue reads (besides the value of its core), so that a product
    kernel knows which of its operands' buffers are also read element by element."""
    if kernel.core is None:
        return set()
    out, stack, seen = set(), [kernel.node], set()
    while stack:
        i = stack.pop()
        if i in seen or i == kernel.core:
            continue
        seen.add(i)
        if i in plan.materialized and i != kernel.node:
            out.add(plan.buffer_of[i])
        else:
            stack.extend(plan.graph.nodes[i].inputs)
    return out


def product_store(
    plan: Plan, kernel: Kernel, name_of, out: str, acc: str | tuple[str, str], idx: str, indent: str
) -> str:
    """Statements storing a product kernel's value `acc` (f32) for output index `idx`: the
    value itself, or, when the planner fused the pointwise DAG reading the product into the
    kernel (kernel.core is the product), that DAG evaluated there (bias, residual,
    activation). A paired epilogue (kernel.pair) takes `acc` as the values of the product's
    two halves at this column, which its two slices read. `name_of` gives the WGSL name of a
    node's buffer."""
    graph = plan.graph
    out_type = graph.nodes[kernel.node].type
    if kernel.core is None:
        return f"{indent}{out}[{idx}] = {_cast_out(acc, out_type.dtype)};\n"
    core_dtype = graph.nodes[kernel.core].type.dtype
    if kernel.pair is None:
        values = {kernel.core: (f"mm_{idx}", acc)}
    else:
        values = {
            s: (f"mm{n}_{idx}", v) for n, (s, v) in enumerate(zip(kernel.pair, acc, strict=True))
        }
    bound = {nid: name for nid, (name, _) in values.items()}
    em = Emitter(graph, plan.materialized - {kernel.node}, name_of, indent, bound=bound)
    value = em.value(kernel.node, idx)
    lets = [f"{indent}let {name} = {_cast_out(v, core_dtype)};" for name, v in values.values()]
    lines = [*lets, *em.lines]
    lines.append(f"{indent}{out}[{idx}] = {store_value(value, out_type.dtype)};")
    return "\n".join(lines) + "\n"


# -- row ops: softmax, log_softmax, cross-entropy ----------------------------------------------

# The lowest finite f32: exp(x - NEG_MAX) stays 0 for x = -inf, where -inf would give NaN.
NEG_MAX = "-3.4028234663852886e38f"


def row_walk(shape: tuple[int, ...], axis: int) -> tuple[int, int, str, str]:
    """How a kernel with one workgroup per row along `axis` walks `shape`: (the row length C,
    the row count, WGSL of row r's first linear index `base`, WGSL of its element c)."""
    C = shape[axis]
    inner = math.prod(shape[axis + 1 :])
    if inner == 1:
        return C, math.prod(shape) // C, f"r * {C}u", "base + c"
    base = f"(r / {inner}u) * {C * inner}u + (r % {inner}u)"
    return C, math.prod(shape) // C, base, f"base + c * {inner}u"


def _row(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    x = graph.nodes[node.inputs[0]]
    shape = x.type.shape
    C, rows, base, col = row_walk(shape, node.attrs.get("axis", len(shape) - 1))
    b = _Bindings(plan, kernel.node)
    out = f"buf{b.out_buffer}"
    wg = 256 if C >= 1024 else 64
    grid = _grid_1d(rows)

    def read_x(idx_expr: str, indent: str) -> tuple[str, str]:
        em = Emitter(graph, plan.materialized, b.name_of, indent)
        v = em.value(node.inputs[0], em.index(idx_expr))
        return "\n".join(em.lines), f"f32({v})"

    scan_lines, scan_v = read_x(col, "    ")
    prologue = (
        f"var<workgroup> sm_m: array<f32, {wg}>;\nvar<workgroup> sm_s: array<f32, {wg}>;\n"
        f"@compute @workgroup_size({wg})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
        f"  let r = wid.y * {grid[0]}u + wid.x;\n"
        f"  if (r >= {rows}u) {{ return; }}\n"
        f"  let base = {base};\n"
        f"  var m = {NEG_MAX};\n  var s = 0.0f;\n"
        f"  for (var c = lid; c < {C}u; c += {wg}u) {{\n{scan_lines}\n"
        f"    let x = {scan_v};\n"
        "    if (x > m) { s = s * exp(m - x) + 1.0; m = x; } else { s = s + exp(x - m); }\n  }\n"
        "  sm_m[lid] = m;\n  sm_s[lid] = s;\n  workgroupBarrier();\n"
        f"  for (var h = {wg // 2}u; h > 0u; h = h >> 1u) {{\n"
        "    if (lid < h) {\n"
        "      let m1 = sm_m[lid]; let m2 = sm_m[lid + h]; let mm = max(m1, m2);\n"
        "      let s1 = sm_s[lid]; let s2 = sm_s[lid + h];\n"
        "      sm_s[lid] = select(0.0, s1 * exp(m1 - mm), s1 > 0.0) + select(0.0, s2 * exp(m2 - mm), s2 > 0.0);\n"
        "      sm_m[lid] = mm;\n    }\n    workgroupBarrier();\n  }\n"
        "  let M = sm_m[0];\n  let S = sm_s[0];\n"
    )
    dtype = node.type.dtype
    if node.op in ("softmax", "log_softmax"):
        write_lines, write_v = read_x(col, "    ")
        y = "exp(x - M) / S" if node.op == "softmax" else "x - M - log(S)"
        tail = (
            f"  for (var c = lid; c < {C}u; c += {wg}u) {{\n{write_lines}\n"
            f"    let x = {write_v};\n    {out}[{col}] = {_cast_out(y, dtype)};\n  }}\n}}\n"
        )
    else:
        em = Emitter(graph, plan.materialized, b.name_of, "  ")
        label = em.value(node.inputs[1], "r")
        ignore = node.attrs["ignore_index"]
        label_lines = "\n".join(em.lines)
        label_i = f"i32({label})"
        if node.op == "cross_entropy_rows":
            pick_lines, pick_v = read_x(f"base + u32({label_i})", "    ")
            tail = (
                f"{label_lines}\n"
                f"  if (lid == 0u) {{\n    if ({label_i} == {ignore}i) {{ {out}[r] = {_cast_out('0.0', dtype)}; return; }}\n"
                f"{pick_lines}\n"
                f"    {out}[r] = {_cast_out(f'M + log(S) - {pick_v}', dtype)};\n  }}\n}}\n"
            )
        else:  # cross_entropy_grad
            gem = Emitter(graph, plan.materialized, b.name_of, "  ")
            gval = gem.value(node.inputs[2], "r")
            write_lines, write_v = read_x(col, "    ")
            tail = (
                f"{label_lines}\n" + "\n".join(gem.lines) + "\n"
                f"  let scale = select(f32({gval}), 0.0, {label_i} == {ignore}i);\n"
                f"  for (var c = lid; c < {C}u; c += {wg}u) {{\n{write_lines}\n"
                f"    let x = {write_v};\n"
                f"    let p = exp(x - M) / S - select(0.0, 1.0, i32(c) == {label_i});\n"
                f"    {out}[{col}] = {_cast_out('p * scale', dtype)};\n  }}\n}}\n"
            )
    body = prologue + tail
    return KernelSource(_assemble(b, body), b.order, grid, f"{node.op}%{node.id}")


# Kernel generators by op kind (or by op name, which wins). A new archetype lives in a module
# of its own in this package and adds itself with `archetype(name)`.
ARCHETYPES: dict[str, Callable[[Plan, Kernel], KernelSource]] = {
    "pointwise": _pointwise,
    "view": _pointwise,
    "reduce": _reduce,
    "row": _row,
}


def archetype(*names: str):
    """Decorator: register a kernel generator for op kinds or op names."""

    def register(fn):
        for name in names:
            ARCHETYPES[name] = fn
        return fn

    return register


def lowering_of(opdef) -> str | None:
    """How an op reaches WGSL, in words, or None when it has no lowering."""
    from meganeura.backends.wgsl.emit import INLINE_VALUES, VIEW_INDEX_MAPS

    if opdef.kind == "source":
        return "buffer"
    if opdef.name in INLINE_VALUES:
        return "inlined value"
    if opdef.kind == "pointwise":
        return "inlined expression" if opdef.wgsl else None
    if opdef.kind == "view":
        known = opdef.name in Emitter.VIEW_OPS or opdef.name in VIEW_INDEX_MAPS
        return "index map" if known else None
    if opdef.name in ARCHETYPES:
        return f"kernel ({opdef.name})"
    if opdef.kind in ARCHETYPES:
        return f"kernel ({opdef.kind})"
    return None
