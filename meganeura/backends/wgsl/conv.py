"""Convolution as implicit GEMM: conv2d, conv_transpose2d and conv2d_weight_grad.

Each op is a set of matrix products C[M, N] = A[M, K] B[K, N] (one per group, weight-gradient
batch chunk or transposed-conv phase) whose operands are never stored: the tile loader
computes, for every (row, column) of a tile, which element of the input or weight it is (or
that it is a zero of the padding) and reads it straight from the input's buffer. The tiling is
the matmul archetype's (16x16 threads, a TM x TN block of outputs each, K in steps of BK
through workgroup memory); only the addressing differs.

Orientation keeps NCHW outputs coalesced: rows are channels, columns are output pixels
(conv2d, conv_transpose2d) or weight taps (conv2d_weight_grad), so neighbouring threads write
neighbouring addresses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meganeura.backends.wgsl.emit import Emitter
from meganeura.backends.wgsl.kernels import (
    MAX_GROUPS,
    KernelSource,
    _assemble,
    _Bindings,
    _cast_out,
    archetype,
)
from meganeura.lower.plan import Kernel, Plan, strided_view

BK = 16
# (TM, TN): 16 x 16 threads each compute TM x TN outputs, so a tile is 16*TM x 16*TN.
TILES = ((4, 4), (2, 8), (8, 2))


@dataclass
class Operand:
    """How a tile loader reads one GEMM operand. Statements come in three kinds, so that each
    is computed as rarely as possible: `row` uses only the row index (gm for A, gn for B),
    `k` only gk, `taps` both. Then a validity condition (None: always valid) and the
    address. Neighbouring threads load neighbouring k when `k_fastest`, else neighbouring
    rows, whichever is contiguous in memory."""

    row: list[str]
    k: list[str]
    taps: list[str]
    valid: str | None
    address: str
    k_fastest: bool


@dataclass
class Gemm:
    """One implicit GEMM launch: `batch` names the uniform indices the grid's z dim spans
    (groups, phases, batch chunks), each (name, size); `prologue` derives more uniforms from
    them. The k loop covers [k_begin, k_begin + K). `store` is the setup lines, an optional
    extra condition and the output address of C[gm, gn]."""

    batch: list[tuple[str, int]]
    M: int
    N: int
    K: int
    a: Operand
    b: Operand
    store: tuple[list[str], str | None, str]
    prologue: tuple[str, ...] = ()
    k_begin: str = "0u"


def split(var: str, dims, prefix: str) -> tuple[list[str], list[str]]:
    """`let` statements splitting linear index `var` over `dims` (row-major), and the names."""
    names, lines = [], []
    for axis, size in enumerate(dims):
        name = f"{prefix}{axis}"
        if size == 1:
            lines.append(f"let {name} = 0u;")
        else:
            lines.append(f"let {name} = {Emitter.coord(var, dims, axis)};")
        names.append(name)
    return lines, names


def offset(terms) -> str:
    """The sum of coordinate * stride terms, skipping zero strides."""
    parts = [c if s == 1 else f"{c} * {s}u" for c, s in terms if s != 0]
    return " + ".join(parts) if parts else "0u"


def in_range(i: str, n: int) -> str:
    return f"u32({i}) < {n}u"  # an i32 below zero wraps above any size


def choose_tiles(m: int, n: int) -> tuple[int, int]:
    """The (TM, TN) whose tiles pad M x N the least (a channel count of 16 would waste most
    of a 64-row tile)."""

    def padded(tile):
        bm, bn = 16 * tile[0], 16 * tile[1]
        return math.ceil(m / bm) * bm * math.ceil(n / bn) * bn

    return min(TILES, key=padded)


def implicit_gemm(plan: Plan, kernel: Kernel, bind: _Bindings, gemm: Gemm) -> KernelSource:
    node = plan.graph.nodes[kernel.node]
    M, N, K = gemm.M, gemm.N, gemm.K
    tm, tn = choose_tiles(M, N)
    bm, bn = 16 * tm, 16 * tn
    out = f"buf{bind.out_buffer}"
    n_tiles, m_tiles = math.ceil(N / bn), math.ceil(M / bm)
    z = math.prod(size for _, size in gemm.batch) * m_tiles
    gx = min(n_tiles, MAX_GROUPS)
    grid = (gx, math.ceil(n_tiles / gx), z)
    if z > MAX_GROUPS:
        raise ValueError(
            f"{node.op}: {gemm.batch} x {m_tiles} row tiles exceed {MAX_GROUPS} workgroups"
        )
    uniforms, inner = [], m_tiles
    for name, size in reversed(gemm.batch):
        index = f"(wid.z / {inner}u) % {size}u" if size > 1 else "0u"
        uniforms.append(f"  let {name} = {index};")
        inner *= size
    uniforms += [f"  {line}" for line in gemm.prologue]

    def indent(lines, depth: int) -> str:
        return "".join(f"{' ' * depth}{line}\n" for line in lines)

    hoisted = []

    def loader(operand: Operand, tile: str, rows: int, row_var: str, rows_total: int) -> str:
        """The loads of one operand's tile for the k0 step. The statements that stay fixed
        along a thread's loads are computed once: with k fastest, kk is the same for all of
        a thread's loads; with rows fastest, the row is, for the whole k loop."""
        local, base, count = row_var[1:], "m0" if row_var == "gm" else "n0", BK * rows // 256
        load = f"v = f32({operand.address});"
        if operand.valid:
            load = f"if ({operand.valid}) {{ {load} }}"
        guard = f"{row_var} < {rows_total}u && k0 + kk < {K}u"
        if operand.k_fastest:
            head = indent(
                [f"let kk = tid % {BK}u;", f"let gk = {gemm.k_begin} + k0 + kk;", *operand.k], 6
            )
            pick = [
                f"let {local} = tid / {BK}u + l * {256 // BK}u;",
                f"let {row_var} = {base} + {local};",
            ]
            inner = [*operand.row, *operand.taps]
        else:
            hoisted.extend(
                [
                    f"let {local} = tid % {rows}u;",
                    f"let {row_var} = {base} + {local};",
                    *operand.row,
                ]
            )
            head = ""
            pick = [
                f"let kk = tid / {rows}u + l * {256 // rows}u;",
                f"let gk = {gemm.k_begin} + k0 + kk;",
            ]
            inner = [*operand.k, *operand.taps]
        return (
            f"    {{\n{head}"
            f"      for (var l = 0u; l < {count}u; l++) {{\n{indent(pick, 8)}"
            "        var v = 0.0f;\n"
            f"        if ({guard}) {{\n{indent(inner, 10)}          {load}\n        }}\n"
            f"        {tile}[kk * {rows}u + {local}] = v;\n"
            "      }\n    }\n"
        )

    loads = loader(gemm.a, "As", bm, "gm", M) + loader(gemm.b, "Bs", bn, "gn", N)
    store_setup, store_valid, address = gemm.store
    store_lines = indent(store_setup, 8)
    write = f"{out}[{address}] = {_cast_out(f'acc[p * {tn}u + q]', node.type.dtype)};"
    if store_valid:
        write = f"if ({store_valid}) {{ {write} }}"
    body = f"""var<workgroup> As: array<f32, {BK * bm}>;
var<workgroup> Bs: array<f32, {BK * bn}>;
@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>,
        @builtin(local_invocation_index) tid: u32) {{
{chr(10).join(uniforms)}
  let m0 = {f"(wid.z % {m_tiles}u) * {bm}u" if m_tiles > 1 else "0u"};
  let n0 = (wid.y * {gx}u + wid.x) * {bn}u;
  if (n0 >= {N}u) {{ return; }}
{indent(hoisted, 2)}  var acc: array<f32, {tm * tn}>;
  for (var k0 = 0u; k0 < {K}u; k0 += {BK}u) {{
{loads}    workgroupBarrier();
    for (var kk = 0u; kk < {BK}u; kk++) {{
      var ar: array<f32, {tm}>;
      var br: array<f32, {tn}>;
      for (var p = 0u; p < {tm}u; p++) {{ ar[p] = As[kk * {bm}u + lid3.y + 16u * p]; }}
      for (var q = 0u; q < {tn}u; q++) {{ br[q] = Bs[kk * {bn}u + lid3.x + 16u * q]; }}
      for (var p = 0u; p < {tm}u; p++) {{
        for (var q = 0u; q < {tn}u; q++) {{ acc[p * {tn}u + q] += ar[p] * br[q]; }}
      }}
    }}
    workgroupBarrier();
  }}
  for (var p = 0u; p < {tm}u; p++) {{
    let gm = m0 + lid3.y + 16u * p;
    for (var q = 0u; q < {tn}u; q++) {{
      let gn = n0 + lid3.x + 16u * q;
      if (gm < {M}u && gn < {N}u) {{
{store_lines}        {write}
      }}
    }}
  }}
}}
"""
    return KernelSource(_assemble(bind, body), bind.order, grid, f"{node.op}%{node.id}")


def _view(plan: Plan, bind: _Bindings, nid: int) -> tuple[str, tuple[int, ...], int]:
    """(binding, strides, offset) of an input: an affine view of a buffer (strided_inputs)."""
    base, strides, start = strided_view(plan.graph, nid, plan.materialized)
    return bind.name_of(base), strides, start


def _read(buffer: str, start: int, terms) -> str:
    address = offset(terms)
    return f"{buffer}[{address}{f' + {start}u' if start else ''}]"


def _tap(axis: str, out_coord: str, k_coord: str, attrs, dim: int) -> str:
    """The input coordinate (an i32) that output `out_coord` reads at kernel tap `k_coord`."""
    s, d, p = attrs["stride"][dim], attrs["dilation"][dim], attrs["padding"][dim][0]
    return f"let {axis} = i32({out_coord} * {s}u + {k_coord} * {d}u) - {p}i;"


@archetype("conv2d")
def conv2d(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    x, w = (graph.nodes[i].type.shape for i in node.inputs)
    attrs = node.attrs
    groups = attrs["groups"]
    nb, _, h, wd = x
    o, cg, kh, kw = w
    og = o // groups
    ho, wo = node.type.shape[2:]
    bind = _Bindings(plan, kernel.node)
    xb, xs, x0 = _view(plan, bind, node.inputs[0])
    wb, ws, w0 = _view(plan, bind, node.inputs[1])
    k_lines, (kc, ky, kx) = split("gk", (cg, kh, kw), "ck")
    a = Operand(
        [],
        k_lines,
        [],
        None,
        _read(wb, w0, [(f"(grp * {og}u + gm)", ws[0]), (kc, ws[1]), (ky, ws[2]), (kx, ws[3])]),
        k_fastest=True,
    )
    n_lines, (pn, py, px) = split("gn", (nb, ho, wo), "cn")
    b = Operand(
        n_lines,
        k_lines,
        [_tap("iy", py, ky, attrs, 0), _tap("ix", px, kx, attrs, 1)],
        f"{in_range('iy', h)} && {in_range('ix', wd)}",
        _read(
            xb,
            x0,
            [(pn, xs[0]), (f"(grp * {cg}u + {kc})", xs[1]), ("u32(iy)", xs[2]), ("u32(ix)", xs[3])],
        ),
        k_fastest=False,
    )
    store = (
        [f"let sn = gn / {ho * wo}u;", f"let sp = gn % {ho * wo}u;"],
        None,
        f"sn * {o * ho * wo}u + (grp * {og}u + gm) * {ho * wo}u + sp",
    )
    gemm = Gemm([("grp", groups)], og, nb * ho * wo, cg * kh * kw, a, b, store)
    return implicit_gemm(plan, kernel, bind, gemm)


def _phase_taps(name: str, stride: int, dilation: int, pad: int, k: int):
    """Taps of one spatial dim of a transposed conv, split by output phase (row mod stride).

    Output row y gets input row (y + pad - ky * dilation) / stride from tap ky only when that
    division is exact, so the rows of one phase share their taps: ky = first + j * step for
    j < count. Returns the WGSL lets (of the uniform `phase_{name}`) defining
    `first_{name}` and `ok_{name}` (whether the phase has any tap), and (step, count)."""
    g = math.gcd(stride, dilation)
    step = stride // g
    # The taps solve ky * dilation = phase + pad (mod stride).
    inverse = pow(dilation // g, -1, step) if step > 1 else 0
    residue = f"(phase_{name} + {pad}u)"
    first = f"(({residue} / {g}u) * {inverse}u) % {step}u" if step > 1 else "0u"
    ok = f"{residue} % {g}u == 0u" if g > 1 else "true"
    lets = (f"let first_{name} = {first};", f"let ok_{name} = {ok};")
    return lets, step, math.ceil(k / step)


@archetype("conv_transpose2d")
def conv_transpose2d(plan: Plan, kernel: Kernel) -> KernelSource:
    """One GEMM per output phase (y mod stride_h, x mod stride_w): within a phase every output
    pixel reads the same taps, so K holds only the taps that contribute, not all kh * kw."""
    graph = plan.graph
    node = graph.nodes[kernel.node]
    x, w = (graph.nodes[i].type.shape for i in node.inputs)
    attrs = node.attrs
    groups = attrs["groups"]
    nb, ci, h, wd = x
    _, cg, kh, kw = w
    og = ci // groups
    co, ho, wo = node.type.shape[1:]
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    pt, pl = attrs["padding"][0][0], attrs["padding"][1][0]
    lets_y, step_y, count_y = _phase_taps("y", sh, dh, pt, kh)
    lets_x, step_x, count_x = _phase_taps("x", sw, dw, pl, kw)
    prologue = (
        f"let phase_y = phase / {sw}u;",
        f"let phase_x = phase % {sw}u;",
        *lets_y,
        *lets_x,
    )
    qh, qw = math.ceil(ho / sh), math.ceil(wo / sw)  # output rows and columns per phase
    bind = _Bindings(plan, kernel.node)
    xb, xs, x0 = _view(plan, bind, node.inputs[0])
    wb, ws, w0 = _view(plan, bind, node.inputs[1])
    k_lines, (ko, jy, jx) = split("gk", (og, count_y, count_x), "ck")
    k_lines += [f"let ky = first_y + {jy} * {step_y}u;", f"let kx = first_x + {jx} * {step_x}u;"]
    tap_ok = f"ok_y && ok_x && ky < {kh}u && kx < {kw}u"
    a = Operand(
        [],
        k_lines,
        [],
        tap_ok,
        _read(
            wb, w0, [(f"(grp * {og}u + {ko})", ws[0]), ("gm", ws[1]), ("ky", ws[2]), ("kx", ws[3])]
        ),
        k_fastest=True,
    )
    n_lines, (pn, qy, qx) = split("gn", (nb, qh, qw), "cn")
    n_lines += [f"let oy = phase_y + {qy} * {sh}u;", f"let ox = phase_x + {qx} * {sw}u;"]
    # Exact divisions: the phase was chosen so that the numerators are multiples of the stride.
    taps = [
        f"let iy = i32({qy}) + (i32(phase_y + {pt}u) - i32(ky * {dh}u)) / {sh}i;",
        f"let ix = i32({qx}) + (i32(phase_x + {pl}u) - i32(kx * {dw}u)) / {sw}i;",
    ]
    b = Operand(
        n_lines,
        k_lines,
        taps,
        f"{tap_ok} && oy < {ho}u && ox < {wo}u && {in_range('iy', h)} && {in_range('ix', wd)}",
        _read(
            xb,
            x0,
            [(pn, xs[0]), (f"(grp * {og}u + {ko})", xs[1]), ("u32(iy)", xs[2]), ("u32(ix)", xs[3])],
        ),
        k_fastest=False,
    )
    store_lines, (sn, sy, sx) = split("gn", (nb, qh, qw), "sn")
    store_lines += [f"let oy = phase_y + {sy} * {sh}u;", f"let ox = phase_x + {sx} * {sw}u;"]
    store = (
        store_lines,
        f"oy < {ho}u && ox < {wo}u",
        f"{sn} * {co * ho * wo}u + (grp * {cg}u + gm) * {ho * wo}u + oy * {wo}u + ox",
    )
    gemm = Gemm(
        [("grp", groups), ("phase", sh * sw)],
        cg,
        nb * qh * qw,
        og * count_y * count_x,
        a,
        b,
        store,
        prologue,
    )
    return implicit_gemm(plan, kernel, bind, gemm)


@archetype("conv2d_weight_grad")
def conv2d_weight_grad(plan: Plan, kernel: Kernel) -> KernelSource:
    """K runs over the output pixels of one batch chunk (attribute `splits`); each chunk's
    partial sum is written to its own slice of the output."""
    graph = plan.graph
    node = graph.nodes[kernel.node]
    x, g = (graph.nodes[i].type.shape for i in node.inputs)
    attrs = node.attrs
    groups, splits = attrs["groups"], attrs["splits"]
    nb, c, h, wd = x
    o, ho, wo = g[1:]
    og, cg = o // groups, c // groups
    kh, kw = attrs["kernel_size"]
    chunk = nb // splits * ho * wo
    bind = _Bindings(plan, kernel.node)
    xb, xs, x0 = _view(plan, bind, node.inputs[0])
    gb, gs, g0 = _view(plan, bind, node.inputs[1])
    k_lines, (pn, py, px) = split("gk", (nb, ho, wo), "ck")
    a = Operand(
        [],
        k_lines,
        [],
        None,
        _read(gb, g0, [(pn, gs[0]), (f"(grp * {og}u + gm)", gs[1]), (py, gs[2]), (px, gs[3])]),
        k_fastest=True,
    )
    n_lines, (nc, ky, kx) = split("gn", (cg, kh, kw), "cn")
    b = Operand(
        n_lines,
        k_lines,
        [_tap("iy", py, ky, attrs, 0), _tap("ix", px, kx, attrs, 1)],
        f"{in_range('iy', h)} && {in_range('ix', wd)}",
        _read(
            xb,
            x0,
            [(pn, xs[0]), (f"(grp * {cg}u + {nc})", xs[1]), ("u32(iy)", xs[2]), ("u32(ix)", xs[3])],
        ),
        k_fastest=True,
    )
    taps = cg * kh * kw
    store = ([], None, f"chunk * {o * taps}u + (grp * {og}u + gm) * {taps}u + gn")
    gemm = Gemm(
        [("grp", groups), ("chunk", splits)],
        og,
        taps,
        chunk,
        a,
        b,
        store,
        k_begin=f"chunk * {chunk}u",
    )
    return implicit_gemm(plan, kernel, bind, gemm)
