"""Convolution as implicit GEMM: conv2d, conv_transpose2d and conv2d_weight_grad.

Each op is, per group, a matrix product C[M, N] = A[M, K] B[K, N] whose operands are never
stored: the tile loader computes, for every (row, column) of a tile, which element of the
input or weight it is (or that it is a zero of the padding) and reads it straight from the
input's buffer. The tiling is the matmul archetype's (16x16 threads, a TM x TN block of
outputs each, K in steps of BK through workgroup memory); only the addressing differs.

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


@dataclass
class Operand:
    """How a tile loader reads one GEMM operand: `setup` statements (using the row and
    column index variables), a validity condition (None: always valid) and the address."""

    setup: list[str]
    valid: str | None
    address: str
    k_fastest: bool  # consecutive k are adjacent in memory (else consecutive m or n are)


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


def _tiles(m: int) -> tuple[int, int, int]:
    """(TM, TN, BK): each of 16 x 16 threads computes TM x TN outputs; small M gets wide N."""
    return (2, 8, 16) if m <= 32 else (4, 4, 16)


def implicit_gemm(
    plan: Plan,
    kernel: Kernel,
    bind: _Bindings,
    dims: tuple[int, int, int, int],
    a: Operand,
    b: Operand,
    store: tuple[list[str], str],
) -> KernelSource:
    """The tiled GEMM over `dims` = (groups, M, N, K); `a` reads A[gm, gk] and `b` B[gk, gn]
    (index variables gm, gn, gk, group variable grp); `store` holds the setup lines and the
    address of C[gm, gn] in the output."""
    graph = plan.graph
    node = graph.nodes[kernel.node]
    groups, M, N, K = dims
    tm, tn, bk = _tiles(M)
    bm, bn = 16 * tm, 16 * tn
    out = f"buf{bind.out_buffer}"
    n_tiles, m_tiles = math.ceil(N / bn), math.ceil(M / bm)
    gx = min(n_tiles, MAX_GROUPS)
    grid = (gx, math.ceil(n_tiles / gx), groups * m_tiles)
    if grid[2] > MAX_GROUPS:
        raise ValueError(
            f"{node.op}: {groups} groups x {m_tiles} row tiles exceed {MAX_GROUPS} workgroups"
        )

    def loader(operand: Operand, tile: str, rows: int, row_var: str, rows_total: int) -> str:
        # Walk the operand's contiguous direction with neighbouring threads.
        if operand.k_fastest:
            pick = f"let kk = e % {bk}u; let {row_var[1:]} = e / {bk}u;"
        else:
            pick = f"let {row_var[1:]} = e % {rows}u; let kk = e / {rows}u;"
        base = "m0" if row_var == "gm" else "n0"
        loads = bk * rows // 256
        setup = "\n".join(f"        {line}" for line in operand.setup)
        load = f"v = f32({operand.address});"
        if operand.valid:
            load = f"if ({operand.valid}) {{ {load} }}"
        return (
            f"    for (var l = 0u; l < {loads}u; l++) {{\n"
            "      let e = tid + l * 256u;\n"
            f"      {pick}\n"
            f"      let {row_var} = {base} + {row_var[1:]}; let gk = k0 + kk;\n"
            "      var v = 0.0f;\n"
            f"      if ({row_var} < {rows_total}u && gk < {K}u) {{\n{setup}\n        {load}\n      }}\n"
            f"      {tile}[kk * {rows}u + {row_var[1:]}] = v;\n"
            "    }\n"
        )

    store_setup, address = store
    store_lines = "\n".join(f"        {line}" for line in store_setup)
    body = f"""var<workgroup> As: array<f32, {bk * bm}>;
var<workgroup> Bs: array<f32, {bk * bn}>;
@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>,
        @builtin(local_invocation_index) tid: u32) {{
  let grp = wid.z / {m_tiles}u;
  let m0 = (wid.z % {m_tiles}u) * {bm}u;
  let n0 = (wid.y * {gx}u + wid.x) * {bn}u;
  if (n0 >= {N}u) {{ return; }}
  var acc: array<f32, {tm * tn}>;
  for (var k0 = 0u; k0 < {K}u; k0 += {bk}u) {{
{loader(a, "As", bm, "gm", M)}{loader(b, "Bs", bn, "gn", N)}    workgroupBarrier();
    for (var kk = 0u; kk < {bk}u; kk++) {{
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
{store_lines}
        {out}[{address}] = {_cast_out(f"acc[p * {tn}u + q]", node.type.dtype)};
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
        k_lines,
        None,
        _read(wb, w0, [(f"(grp * {og}u + gm)", ws[0]), (kc, ws[1]), (ky, ws[2]), (kx, ws[3])]),
        k_fastest=True,
    )
    n_lines, (pn, py, px) = split("gn", (nb, ho, wo), "cn")
    b = Operand(
        k_lines + n_lines + [_tap("iy", py, ky, attrs, 0), _tap("ix", px, kx, attrs, 1)],
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
        f"sn * {o * ho * wo}u + (grp * {og}u + gm) * {ho * wo}u + sp",
    )

    return implicit_gemm(plan, kernel, bind, (groups, og, nb * ho * wo, cg * kh * kw), a, b, store)


@archetype("conv_transpose2d")
def conv_transpose2d(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    x, w = (graph.nodes[i].type.shape for i in node.inputs)
    attrs = node.attrs
    groups = attrs["groups"]
    nb, ci, h, wd = x
    _, cg, kh, kw = w
    og = ci // groups
    co, ho, wo = node.type.shape[1:]
    bind = _Bindings(plan, kernel.node)
    xb, xs, x0 = _view(plan, bind, node.inputs[0])
    wb, ws, w0 = _view(plan, bind, node.inputs[1])
    k_lines, (ko, ky, kx) = split("gk", (og, kh, kw), "ck")
    a = Operand(
        k_lines,
        None,
        _read(wb, w0, [(f"(grp * {og}u + {ko})", ws[0]), ("gm", ws[1]), (ky, ws[2]), (kx, ws[3])]),
        k_fastest=True,
    )
    n_lines, (pn, py, px) = split("gn", (nb, ho, wo), "cn")
    (sh, sw), (dh, dw) = attrs["stride"], attrs["dilation"]
    pt, pl = attrs["padding"][0][0], attrs["padding"][1][0]
    # Output row y gets input row iy through tap ky when y = iy * s + ky * d - p.
    taps = [
        f"let ty = i32({py} + {pt}u) - i32({ky} * {dh}u);",
        f"let tx = i32({px} + {pl}u) - i32({kx} * {dw}u);",
        f"let iy = ty / {sh}i;",
        f"let ix = tx / {sw}i;",
    ]
    valid = ["ty >= 0", "tx >= 0", f"iy < {h}i", f"ix < {wd}i"]
    if sh > 1:
        valid.append(f"ty % {sh}i == 0")
    if sw > 1:
        valid.append(f"tx % {sw}i == 0")
    b = Operand(
        k_lines + n_lines + taps,
        " && ".join(valid),
        _read(
            xb,
            x0,
            [(pn, xs[0]), (f"(grp * {og}u + {ko})", xs[1]), ("u32(iy)", xs[2]), ("u32(ix)", xs[3])],
        ),
        k_fastest=False,
    )

    store = (
        [f"let sn = gn / {ho * wo}u;", f"let sp = gn % {ho * wo}u;"],
        f"sn * {co * ho * wo}u + (grp * {cg}u + gm) * {ho * wo}u + sp",
    )

    return implicit_gemm(plan, kernel, bind, (groups, cg, nb * ho * wo, og * kh * kw), a, b, store)


@archetype("conv2d_weight_grad")
def conv2d_weight_grad(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node]
    x, g = (graph.nodes[i].type.shape for i in node.inputs)
    attrs = node.attrs
    groups = attrs["groups"]
    nb, c, h, wd = x
    o, ho, wo = g[1:]
    og, cg = o // groups, c // groups
    kh, kw = attrs["kernel_size"]
    bind = _Bindings(plan, kernel.node)
    xb, xs, x0 = _view(plan, bind, node.inputs[0])
    gb, gs, g0 = _view(plan, bind, node.inputs[1])
    k_lines, (pn, py, px) = split("gk", (nb, ho, wo), "ck")
    a = Operand(
        k_lines,
        None,
        _read(gb, g0, [(pn, gs[0]), (f"(grp * {og}u + gm)", gs[1]), (py, gs[2]), (px, gs[3])]),
        k_fastest=True,
    )
    n_lines, (nc, ky, kx) = split("gn", (cg, kh, kw), "cn")
    b = Operand(
        k_lines + n_lines + [_tap("iy", py, ky, attrs, 0), _tap("ix", px, kx, attrs, 1)],
        f"{in_range('iy', h)} && {in_range('ix', wd)}",
        _read(
            xb,
            x0,
            [(pn, xs[0]), (f"(grp * {cg}u + {nc})", xs[1]), ("u32(iy)", xs[2]), ("u32(ix)", xs[3])],
        ),
        k_fastest=True,
    )

    store = [], f"(grp * {og}u + gm) * {cg * kh * kw}u + gn"

    return implicit_gemm(plan, kernel, bind, (groups, og, cg * kh * kw, nb * ho * wo), a, b, store)
