"""The "window" archetype (pooling, resampling and their gradients) and the index maps of the
resampling views (nearest upsampling, pixel shuffle and unshuffle).

A window kernel runs one invocation per output element of an NCHW tensor. It loops over the
input elements that output depends on (a pooling window, four bilinear taps) or, for a
gradient, over the outputs of the forward op that read this input element, and reads them
through the Emitter, so pointwise producers (a bias add, a ReLU) are fused into the loads.
"""

from __future__ import annotations

import math

from meganeura.backends.wgsl.emit import Emitter, literal, store_value, view_index_map
from meganeura.backends.wgsl.kernels import (
    WG,
    KernelSource,
    _assemble,
    _Bindings,
    _cast_out,
    _grid_1d,
    archetype,
)
from meganeura.lower.plan import Kernel, Plan

NEG_INF = "mn_bits(0xff800000u)"


class _Reads:
    """Loads of a kernel's inputs at an index, with their inlined producers, at an indent."""

    def __init__(self, plan: Plan, bind: _Bindings):
        self.plan = plan
        self.bind = bind

    def __call__(self, nid: int, index: str, indent: str, as_f32: bool = True) -> tuple[str, str]:
        em = Emitter(self.plan.graph, self.plan.materialized, self.bind.name_of, indent)
        value = em.value(nid, em.index(index))
        return "\n".join(em.lines), f"f32({value})" if as_f32 else value


def _window_kernel(plan: Plan, kernel: Kernel, build) -> KernelSource:
    """The one-invocation-per-output skeleton; `build(node, reads)` gives the module-scope
    declarations, the body (which sees plane, py, px: the output element's N*C plane, row
    and column) and the result expression."""
    graph = plan.graph
    node = graph.nodes[kernel.node]
    bind = _Bindings(plan, kernel.node)
    decls, body, result = build(node, _Reads(plan, bind))
    ho, wo = node.type.shape[2:]
    total = node.type.size
    grid = _grid_1d(math.ceil(total / WG))
    dtype = node.type.dtype
    value = result if dtype == "i32" else _cast_out(result, dtype)
    source = (
        f"{decls}@compute @workgroup_size({WG})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {\n"
        f"  let i = (wid.y * {grid[0]}u + wid.x) * {WG}u + lid;\n"
        f"  if (i >= {total}u) {{ return; }}\n"
        f"  let plane = i / {ho * wo}u;\n"
        f"  let py = (i / {wo}u) % {ho}u;\n"
        f"  let px = i % {wo}u;\n"
        f"{body}\n"
        f"  buf{bind.out_buffer}[i] = {store_value(value, dtype)};\n}}\n"
    )
    return KernelSource(_assemble(bind, source), bind.order, grid, f"{node.op}%{node.id}")


def _loop_window(attrs, in_hw, inner: str) -> str:
    """Loops over the in-bounds taps (iy, ix) of output (py, px)'s window."""
    (kh, kw), (sh, sw), (ph, pw) = attrs["kernel_size"], attrs["stride"], attrs["padding"]
    dh, dw = attrs.get("dilation", (1, 1))
    h, w = in_hw
    return (
        f"  for (var ky = 0u; ky < {kh}u; ky++) {{\n"
        f"    let iy = i32(py * {sh}u + ky * {dh}u) - {ph}i;\n"
        f"    if (u32(iy) >= {h}u) {{ continue; }}\n"
        f"    for (var kx = 0u; kx < {kw}u; kx++) {{\n"
        f"      let ix = i32(px * {sw}u + kx * {dw}u) - {pw}i;\n"
        f"      if (u32(ix) >= {w}u) {{ continue; }}\n"
        f"      let j = plane * {h * w}u + u32(iy) * {w}u + u32(ix);\n"
        f"{inner}\n    }}\n  }}"
    )


def _loop_readers(attrs, out_hw, inner: str) -> str:
    """Loops over the outputs (oy, ox) whose windows read input (py, px): those with
    py = oy * s + k * d - p for a tap k."""
    (kh, kw), (sh, sw), (ph, pw) = attrs["kernel_size"], attrs["stride"], attrs["padding"]
    dh, dw = attrs.get("dilation", (1, 1))
    ho, wo = out_hw

    def axis(o: str, t: str, k: str, pos: str, pad: int, d: int, s: int, n: int, indent: str):
        skip = f"{t} < 0" + (f" || {t} % {s}i != 0" if s > 1 else "")
        return (
            f"{indent}let {t} = i32({pos} + {pad}u) - i32({k} * {d}u);\n"
            f"{indent}if ({skip}) {{ continue; }}\n"
            f"{indent}let {o} = u32({t} / {s}i);\n"
            f"{indent}if ({o} >= {n}u) {{ continue; }}\n"
        )

    return (
        f"  for (var ky = 0u; ky < {kh}u; ky++) {{\n"
        + axis("oy", "ty", "ky", "py", ph, dh, sh, ho, "    ")
        + f"    for (var kx = 0u; kx < {kw}u; kx++) {{\n"
        + axis("ox", "tx", "kx", "px", pw, dw, sw, wo, "      ")
        + f"      let o = plane * {ho * wo}u + oy * {wo}u + ox;\n"
        + f"{inner}\n    }}\n  }}"
    )


# -- max pooling ------------------------------------------------------------------------------


@archetype("max_pool2d", "max_pool2d_indices")
def max_pool2d(plan: Plan, kernel: Kernel) -> KernelSource:
    def build(node, reads):
        in_hw = plan.graph.nodes[node.inputs[0]].type.shape[2:]
        lines, v = reads(node.inputs[0], "j", "      ")
        # The first maximum in window order wins, as in PyTorch; the first in-bounds tap is
        # taken even when it is -inf.
        inner = (
            f"{lines}\n      let v = {v};\n"
            f"      if (v > best || arg < 0) {{ best = v; arg = iy * {in_hw[1]}i + ix; }}"
        )
        body = f"  var best = {NEG_INF};\n  var arg = -1i;\n" + _loop_window(
            node.attrs, in_hw, inner
        )
        return "", body, "arg" if node.op == "max_pool2d_indices" else "best"

    return _window_kernel(plan, kernel, build)


@archetype("max_pool2d_grad")
def max_pool2d_grad(plan: Plan, kernel: Kernel) -> KernelSource:
    def build(node, reads):
        g_id, idx_id = node.inputs
        out_hw = plan.graph.nodes[g_id].type.shape[2:]
        w = node.type.shape[3]
        idx_lines, idx = reads(idx_id, "o", "      ", as_f32=False)
        g_lines, g = reads(g_id, "o", "        ")
        inner = f"{idx_lines}\n      if ({idx} == me) {{\n{g_lines}\n        acc += {g};\n      }}"
        body = f"  var acc = 0.0f;\n  let me = i32(py * {w}u + px);\n" + _loop_readers(
            node.attrs, out_hw, inner
        )
        return "", body, "acc"

    return _window_kernel(plan, kernel, build)


# -- average pooling ------------------------------------------------------------------------------


def _divisor_fn(attrs, in_hw) -> str:
    """WGSL `fn divisor(oy, ox) -> f32`: torch's avg_pool2d divisor of a window."""
    if attrs["divisor_override"]:
        value = literal(attrs["divisor_override"], "f32")
        return f"fn divisor(oy: u32, ox: u32) -> f32 {{ return {value}; }}\n"
    (kh, kw), (sh, sw), (ph, pw) = attrs["kernel_size"], attrs["stride"], attrs["padding"]
    h, w = in_hw
    if attrs["count_include_pad"]:
        count = "(he - hs) * (we - ws)"
    else:
        count = f"(min(he, {h}i) - max(hs, 0i)) * (min(we, {w}i) - max(ws, 0i))"
    return (
        "fn divisor(oy: u32, ox: u32) -> f32 {\n"
        f"  let hs = i32(oy * {sh}u) - {ph}i;\n  let he = min(hs + {kh}i, {h + ph}i);\n"
        f"  let ws = i32(ox * {sw}u) - {pw}i;\n  let we = min(ws + {kw}i, {w + pw}i);\n"
        f"  return f32({count});\n}}\n"
    )


@archetype("avg_pool2d")
def avg_pool2d(plan: Plan, kernel: Kernel) -> KernelSource:
    def build(node, reads):
        in_hw = plan.graph.nodes[node.inputs[0]].type.shape[2:]
        lines, v = reads(node.inputs[0], "j", "      ")
        body = "  var acc = 0.0f;\n" + _loop_window(
            node.attrs, in_hw, f"{lines}\n      acc += {v};"
        )
        return _divisor_fn(node.attrs, in_hw), body, "acc / divisor(py, px)"

    return _window_kernel(plan, kernel, build)


@archetype("avg_pool2d_grad")
def avg_pool2d_grad(plan: Plan, kernel: Kernel) -> KernelSource:
    def build(node, reads):
        out_hw = plan.graph.nodes[node.inputs[0]].type.shape[2:]
        lines, g = reads(node.inputs[0], "o", "      ")
        inner = f"{lines}\n      acc += {g} / divisor(oy, ox);"
        body = "  var acc = 0.0f;\n" + _loop_readers(node.attrs, out_hw, inner)
        return _divisor_fn(node.attrs, node.type.shape[2:]), body, "acc"

    return _window_kernel(plan, kernel, build)


# -- adaptive average pooling ---------------------------------------------------------------------


def _adaptive_bounds(o: str, n_in: int, n_out: int, prefix: str, indent: str) -> str:
    """Input rows [prefix_s, prefix_e) of adaptive output row `o`: floor(o*in/out) to
    ceil((o+1)*in/out)."""
    return (
        f"{indent}let {prefix}s = ({o} * {n_in}u) / {n_out}u;\n"
        f"{indent}let {prefix}e = (({o} + 1u) * {n_in}u + {n_out - 1}u) / {n_out}u;\n"
    )


@archetype("adaptive_avg_pool2d")
def adaptive_avg_pool2d(plan: Plan, kernel: Kernel) -> KernelSource:
    def build(node, reads):
        h, w = plan.graph.nodes[node.inputs[0]].type.shape[2:]
        ho, wo = node.attrs["output_size"]
        lines, v = reads(node.inputs[0], "j", "      ")
        body = (
            _adaptive_bounds("py", h, ho, "y", "  ")
            + _adaptive_bounds("px", w, wo, "x", "  ")
            + "  var acc = 0.0f;\n"
            "  for (var iy = ys; iy < ye; iy++) {\n"
            "    for (var ix = xs; ix < xe; ix++) {\n"
            f"      let j = plane * {h * w}u + iy * {w}u + ix;\n{lines}\n      acc += {v};\n"
            "    }\n  }"
        )
        return "", body, "acc / f32((ye - ys) * (xe - xs))"

    return _window_kernel(plan, kernel, build)


@archetype("adaptive_avg_pool2d_grad")
def adaptive_avg_pool2d_grad(plan: Plan, kernel: Kernel) -> KernelSource:
    def build(node, reads):
        h, w = node.type.shape[2:]
        ho, wo = node.attrs["output_size"]
        lines, g = reads(node.inputs[0], "o", "      ")
        # Outputs oy whose window holds row py: floor(py*out/in) .. ceil((py+1)*out/in) - 1.
        body = (
            _adaptive_bounds("py", ho, h, "oy", "  ")
            + _adaptive_bounds("px", wo, w, "ox", "  ")
            + "  var acc = 0.0f;\n"
            "  for (var oy = oys; oy < oye; oy++) {\n"
            + _adaptive_bounds("oy", h, ho, "y", "    ")
            + "    for (var ox = oxs; ox < oxe; ox++) {\n"
            + _adaptive_bounds("ox", w, wo, "x", "      ")
            + f"      let o = plane * {ho * wo}u + oy * {wo}u + ox;\n{lines}\n"
            f"      acc += {g} / f32((ye - ys) * (xe - xs));\n" + "    }\n  }"
        )
        return "", body, "acc"

    return _window_kernel(plan, kernel, build)


# -- resampling -----------------------------------------------------------------------------------


def nearest_source_expr(o: str, n_in: int, n_out: int, scale: float) -> str:
    """WGSL for torch's nearest_idx: the input row that output row `o` copies."""
    if n_out == n_in:
        return o
    if n_out == 2 * n_in:
        return f"({o} >> 1u)"
    return f"min(u32(floor(f32({o}) * {literal(scale, 'f32')})), {n_in - 1}u)"


def _taps_fn(name: str, n_in: int, n_out: int, scale: float, align_corners: bool) -> str:
    """WGSL `fn name(o) -> Taps`: the two input rows of output row o and their weights,
    computed in f32 as torch's CPU kernel does."""
    s = literal(scale, "f32")
    src = f"{s} * f32(o)" if align_corners else f"max({s} * (f32(o) + 0.5) - 0.5, 0.0)"
    return (
        f"fn {name}(o: u32) -> Taps {{\n"
        f"  let src = {src};\n"
        f"  let i0 = min(u32(floor(src)), {n_in - 1}u);\n"
        "  let l1 = clamp(src - f32(i0), 0.0, 1.0);\n"
        f"  return Taps(i0, i0 + select(0u, 1u, i0 < {n_in - 1}u), 1.0 - l1, l1);\n}}\n"
    )


TAPS_STRUCT = "struct Taps { i0: u32, i1: u32, l0: f32, l1: f32 }\n"


@archetype("upsample_bilinear2d")
def upsample_bilinear2d(plan: Plan, kernel: Kernel) -> KernelSource:
    def build(node, reads):
        h, w = plan.graph.nodes[node.inputs[0]].type.shape[2:]
        ho, wo = node.attrs["size"]
        (sy, sx), align = node.attrs["scale"], node.attrs["align_corners"]
        decls = TAPS_STRUCT + _taps_fn("taps_y", h, ho, sy, align)
        decls += _taps_fn("taps_x", w, wo, sx, align)
        body = ["  let ty = taps_y(py);", "  let tx = taps_x(px);"]
        values = {}
        for a in ("i0", "i1"):
            for b in ("i0", "i1"):
                lines, v = reads(node.inputs[0], f"plane * {h * w}u + ty.{a} * {w}u + tx.{b}", "  ")
                body.append(lines)
                values[a, b] = v
        result = (
            f"ty.l0 * (tx.l0 * {values['i0', 'i0']} + tx.l1 * {values['i0', 'i1']}) + "
            f"ty.l1 * (tx.l0 * {values['i1', 'i0']} + tx.l1 * {values['i1', 'i1']})"
        )
        return decls, "\n".join(body), result

    return _window_kernel(plan, kernel, build)


def _reader_range(i: str, n_in: int, n_out: int, scale: float, reach: int, off: float):
    """WGSL (lo, hi) bounding the output rows o whose source coordinate
    scale * (o + off) - off lies in [i - reach, i + 1); the caller checks each exactly."""
    if scale == 0.0:
        return "0u", f"{n_out}u"
    s = literal(scale, "f32")
    lo = f"u32(max(floor((f32({i}) - {reach + 0.0} + {off}) / {s} - {off}) - 1.0, 0.0))"
    hi = f"min(u32(max(ceil((f32({i}) + {1.0 + off}) / {s} - {off}) + 1.0, 0.0)), {n_out}u)"
    # Rows clamped to the first or last input row fall outside those bounds.
    return f"select({lo}, 0u, {i} <= {reach}u)", f"select({hi}, {n_out}u, {i} == {n_in - 1}u)"


@archetype("upsample_nearest2d_grad", "upsample_bilinear2d_grad")
def upsample_grad(plan: Plan, kernel: Kernel) -> KernelSource:
    def build(node, reads):
        h, w = node.type.shape[2:]
        ho, wo = node.attrs["size"]
        scale = node.attrs["scale"]
        bilinear = node.op == "upsample_bilinear2d_grad"
        decls, bounds, weights = "", [], []
        for axis, (p, n_in, n_out, name) in enumerate((("py", h, ho, "y"), ("px", w, wo, "x"))):
            o = f"o{name}"
            if bilinear:
                align = node.attrs["align_corners"]
                decls += _taps_fn(f"taps_{name}", n_in, n_out, scale[axis], align)
                lo, hi = _reader_range(p, n_in, n_out, scale[axis], 1, 0.0 if align else 0.5)
                t = f"taps_{name}({o})"
                weight = (
                    f"let t{name} = {t};\n"
                    f"let w{name} = select(0.0, t{name}.l0, t{name}.i0 == {p}) + "
                    f"select(0.0, t{name}.l1, t{name}.i1 == {p});"
                )
            else:
                if n_out == n_in:
                    lo, hi = p, f"{p} + 1u"
                elif n_out == 2 * n_in:
                    lo, hi = f"{p} * 2u", f"{p} * 2u + 2u"
                else:
                    lo, hi = _reader_range(p, n_in, n_out, scale[axis], 0, 0.0)
                src = nearest_source_expr(o, n_in, n_out, scale[axis])
                weight = f"let w{name} = select(0.0, 1.0, {src} == {p});"
            bounds.append((lo, hi))
            weights.append(weight)
        if bilinear:
            decls = TAPS_STRUCT + decls
        lines, g = reads(node.inputs[0], f"plane * {ho * wo}u + oy * {wo}u + ox", "      ")
        body = (
            "  var acc = 0.0f;\n"
            f"  for (var oy = {bounds[0][0]}; oy < {bounds[0][1]}; oy++) {{\n"
            + "".join(f"    {line}\n" for line in weights[0].split("\n"))
            + "    if (wy == 0.0) { continue; }\n"
            f"    for (var ox = {bounds[1][0]}; ox < {bounds[1][1]}; ox++) {{\n"
            + "".join(f"      {line}\n" for line in weights[1].split("\n"))
            + "      if (wx == 0.0) { continue; }\n"
            f"{lines}\n      acc += wy * wx * {g};\n    }}\n  }}"
        )
        return decls, body, "acc"

    return _window_kernel(plan, kernel, build)


# -- views ----------------------------------------------------------------------------------------


@view_index_map("upsample_nearest2d")
def _nearest_index(em: Emitter, node, src_shape, idx: str) -> str:
    h, w = src_shape[2:]
    ho, wo = node.type.shape[2:]
    sy, sx = node.attrs["scale"]
    plane = em.index(f"{idx} / {ho * wo}u")
    oy = em.index(f"({idx} / {wo}u) % {ho}u")
    ox = em.index(f"{idx} % {wo}u")
    iy = nearest_source_expr(oy, h, ho, sy)
    ix = nearest_source_expr(ox, w, wo, sx)
    return em.index(f"{plane} * {h * w}u + {iy} * {w}u + {ix}")


@view_index_map("pixel_shuffle")
def _shuffle_index(em: Emitter, node, src_shape, idx: str) -> str:
    r = node.attrs["factor"]
    h, w = src_shape[-2:]
    ho, wo = h * r, w * r
    plane = em.index(f"{idx} / {ho * wo}u")
    oy = em.index(f"({idx} / {wo}u) % {ho}u")
    ox = em.index(f"{idx} % {wo}u")
    channel = f"{plane} * {r * r}u + ({oy} % {r}u) * {r}u + {ox} % {r}u"
    return em.index(f"({channel}) * {h * w}u + ({oy} / {r}u) * {w}u + {ox} / {r}u")


@view_index_map("pixel_unshuffle")
def _unshuffle_index(em: Emitter, node, src_shape, idx: str) -> str:
    r = node.attrs["factor"]
    h, w = node.type.shape[-2:]
    plane = em.index(f"{idx} / {h * w}u")
    y = em.index(f"({idx} / {w}u) % {h}u")
    x = em.index(f"{idx} % {w}u")
    source = f"{plane} / {r * r}u"
    row = f"{y} * {r}u + ({plane} / {r}u) % {r}u"
    col = f"{x} * {r}u + {plane} % {r}u"
    return em.index(f"({source}) * {h * w * r * r}u + ({row}) * {w * r}u + {col}")
