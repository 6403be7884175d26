"""Flash attention kernels: forward with online softmax, backward recomputing the scores.

Every kernel works on 64 x 64 blocks of (query, key) pairs with 256 invocations: invocation
(ty, tx) = (tid / 16, tid % 16) holds rows 4ty..4ty+3 of its block against columns
4tx..4tx+3, so each product of two staged tiles reads one vec4 of each per step. Score
tiles are built from 16-wide slices of the head dimension staged in workgroup memory;
probabilities (or their gradients) go through workgroup memory once per block to be
multiplied by the value (key, query) rows. Nothing of size [Tq, Tk] reaches device memory:

- forward, one workgroup per (batch, query head, 64 queries): online softmax over the
  allowed key blocks; writes the output rows and each row's log-sum-exp (packed). With a
  mask, the allowed blocks are narrowed at run time to those holding a key the mask does
  not hide (-inf) from all 64 rows (`_visible_keys`): the unwritten slots of a KV cache
  and left padding cost nothing.
- dq, one workgroup per (batch, query head, 64 queries): recomputes p from the log-sum-exp,
  ds = p (dp - delta), dq = scale ds k.
- dk and dv, one workgroup per (batch, kv head, 64 keys): loops over the query heads that
  share the kv head and over the allowed query blocks; dv = p^T dout, dk = scale ds^T q.

The backward kernels still walk every key (or query) block that causality and the window
allow, whether the mask hides it or not.

Workgroup memory is 28 KiB for head dims up to 512. On an H200 (B1 H16 T2048 D64, causal,
f32) the forward ran in 1.6x and the backward in 2.2x the time of PyTorch's SDPA.

With few queries (decode, short prefill chunks) the forward of `attention_rows.py` replaces
the one here; the "attention" archetype there chooses between the two by shape.
"""

from __future__ import annotations

import math

from meganeura.backends.wgsl.emit import literal
from meganeura.backends.wgsl.kernels import (
    KernelSource,
    _assemble,
    _Bindings,
    archetype,
    operand_view,
)
from meganeura.lower.plan import Kernel, Plan
from meganeura.ops.attention import attention_dims

BLOCK = 64  # queries or keys per block
SLICE = 16  # head-dim slice staged per step of a score product
NEG_MAX = "-3.4028234663852886e38f"  # lowest finite f32: the running max before any key
NEG_INF = "mn_bits(0xff800000u)"
POS_INF = "mn_bits(0x7f800000u)"


class _Operand:
    """A strided input: buffer name, 4-D strides (0 where broadcast) and element offset; or a
    computed one (OpDef.computed_inputs: q under its RoPE), read through `function`, which
    the kernel's WGSL must include."""

    def __init__(self, plan: Plan, bind: _Bindings, nid: int, full_shape: tuple[int, ...]):
        shape = plan.graph.nodes[nid].type.shape
        base, strides, offset, self.buf, self.function = operand_view(plan, nid, bind.name_of)
        self.computed = base is None
        self.base = nid if self.computed else base
        lead = len(full_shape) - len(shape)
        self.strides = [0] * lead + [0 if shape[d] == 1 else strides[d] for d in range(len(shape))]
        self.offset = offset

    def addr(self, *coords: str) -> str:
        terms = [f"{self.offset}u"] if self.offset else []
        for c, st in zip(coords, self.strides, strict=True):
            if st:
                terms.append(c if st == 1 else f"{c} * {st}u")
        return " + ".join(terms) or "0u"

    def load(self, *coords: str) -> str:
        if self.computed:
            return f"{self.buf}({self.addr(*coords)})"
        return f"f32({self.buf}[{self.addr(*coords)}])"


def _pad64(n: int) -> int:
    return math.ceil(n / BLOCK) * BLOCK


def _chunk_rows(dp: int) -> int:
    """Rows of a [rows, dp] tile staged at once: 8 KiB at most, at least 4 rows."""
    return max(4, min(16, 2048 // dp))


def _stage_slice(dst: str, x: _Operand, b: str, h: str, row0: str, rows: int, d0: str, dim: int):
    """Stage x[b, h, row0 + r, d0 + dd] (64 rows, SLICE dims) as dst[dd * 16 + r / 4][r % 4]:
    each pass, 16 neighbouring invocations read 16 neighbouring dims of four rows."""
    return f"""    for (var half = 0u; half < {SLICE // 16}u; half++) {{
      let dd = half * 16u + tid % 16u; let rg = tid / 16u; let gd = {d0} + dd;
      var v = vec4<f32>(0.0);
      for (var c = 0u; c < 4u; c++) {{
        let gr = {row0} + 4u * rg + c;
        if (gr < {rows}u && gd < {dim}u) {{ v[c] = {x.load(b, h, "gr", "gd")}; }}
      }}
      {dst}[dd * 16u + rg] = v;
    }}
"""


def _stage_rows(dst: str, x: _Operand, b: str, h: str, row0: str, count: int, rows: int, dim: int):
    """Stage x[b, h, row0 + r, :] (count rows, head dim padded to 64) row-major as vec4s."""
    d4 = _pad64(dim) // 4
    return f"""    for (var e = tid; e < {count * d4}u; e += 256u) {{
      let r = e / {d4}u; let gr = {row0} + r; let gd0 = (e % {d4}u) * 4u;
      var v = vec4<f32>(0.0);
      if (gr < {rows}u) {{
        for (var c = 0u; c < 4u; c++) {{
          let gd = gd0 + c;
          if (gd < {dim}u) {{ v[c] = {x.load(b, h, "gr", "gd")}; }}
        }}
      }}
      {dst}[e] = v;
    }}
"""


def _dot_slices(acc: str, left: str, right: str) -> str:
    """acc[p] += left[row 4ty + p] * right[cols 4tx..4tx+3] over one staged 16-dim slice."""
    fma = " ".join(f"{acc}{p} += a.{'xyzw'[p]} * y;" for p in range(4))
    return (
        f"    for (var dd = 0u; dd < {SLICE}u; dd++) {{\n"
        f"      let a = {left}[dd * 16u + ty]; let y = {right}[dd * 16u + tx];\n"
        f"      {fma}\n    }}\n"
    )


def _score_product(acc, x, xb, xh, xrow0, xrows, y, yb, yh, yrow0, yrows, dim) -> str:
    """acc_p (vec4 over y rows 4tx..) = x[rows 4ty + p] . y[...] over the head dim."""
    init = "".join(f"    var {acc}{p} = vec4<f32>(0.0);\n" for p in range(4))
    return (
        init
        + f"    for (var d0 = 0u; d0 < {dim}u; d0 += {SLICE}u) {{\n"
        + _stage_slice("sa", x, xb, xh, xrow0, xrows, "d0", dim)
        + _stage_slice("sb", y, yb, yh, yrow0, yrows, "d0", dim)
        + "    workgroupBarrier();\n"
        + _dot_slices(acc, "sa", "sb")
        + "    workgroupBarrier();\n    }\n"
    )


def _accumulate_rows(acc: str, weights: str, x, xb, xh, row0, rows, dim) -> str:
    """acc[p * nj + j] += sum_r weights[r][4ty + p] * x[row0 + r][64j + 4tx..] over 64 rows."""
    dp = _pad64(dim)
    chunk = _chunk_rows(dp)
    nj = dp // BLOCK
    d4 = dp // 4
    body = []
    for p in range(4):
        body.append(
            "        "
            + " ".join(f"{acc}[{p * nj + j}] += w.{'xyzw'[p]} * x{j};" for j in range(nj))
        )
    loads = " ".join(f"let x{j} = sb[r * {d4}u + {16 * j}u + tx];" for j in range(nj))
    return (
        f"    for (var r0 = 0u; r0 < {BLOCK}u; r0 += {chunk}u) {{\n"
        + _stage_rows("sb", x, xb, xh, f"{row0} + r0", chunk, rows, dim)
        + "    workgroupBarrier();\n"
        + f"      for (var r = 0u; r < {chunk}u; r++) {{\n"
        + f"        let w = {weights}[(r0 + r) * 16u + ty]; {loads}\n"
        + "\n".join(body)
        + "\n      }\n    workgroupBarrier();\n    }\n"
    )


def _logits(attrs, mask, b, h, i_vec, j_vec, Tq, Tk, raw, out, slope=None, width=4) -> str:
    """WGSL for the vec4 (or, with width 1, scalar) `out` of logits (-inf where not allowed)
    from `raw` dot products at query positions `i_vec` and key positions `j_vec` (i32
    expressions of that width) for query head `h`, and optionally `slope` = d logit / d scaled
    dot (soft-capping's derivative). `mask` is the mask operand, loaded here for each lane, or
    a WGSL expression of the mask values that the caller loaded ahead (the only form for
    width 1)."""
    fv, iv = ("vec4<f32>", "vec4<i32>") if width == 4 else ("f32", "i32")
    lines = [f"let {out}_i = {i_vec}; let {out}_j = {j_vec};"]
    lines.append(f"let {out}_s = {raw} * {literal(attrs['scale'], 'f32')};")
    value = f"{out}_s"
    if attrs["softcap"]:
        cap = attrs["softcap"]
        lines.append(
            f"let {out}_t = tanh(clamp({out}_s * {literal(1.0 / cap, 'f32')}, "
            f"{fv}(-15.0), {fv}(15.0)));"
        )
        value = f"{out}_t * {literal(cap, 'f32')}"
        if slope:
            lines.append(f"let {slope} = 1.0 - {out}_t * {out}_t;")
    elif slope:
        lines.append(f"let {slope} = {fv}(1.0);")
    i, j = f"{out}_i", f"{out}_j"
    valid = [f"({i} < {iv}({Tq}))", f"({j} < {iv}({Tk}))"]
    dist = f"({i} + {iv}({Tk - Tq}) - {j})"
    if attrs["causal"]:
        valid.append(f"({dist} >= {iv}(0))")
    if attrs["window"]:
        w = attrs["window"]
        near = dist if attrs["causal"] else f"abs({dist})"
        valid.append(f"({near} < {iv}({w}))")
    if isinstance(mask, str):
        value = f"{value} + {mask}"
    elif mask is not None:
        loads = ", ".join(
            mask.load(b, h, f"u32(min({i}.{c}, {Tq - 1}))", f"u32(min({j}.{c}, {Tk - 1}))")
            for c in "xyzw"
        )
        value = f"{value} + vec4<f32>({loads})"
    lines.append(f"let {out} = select({fv}({NEG_INF}), {value}, {' & '.join(valid)});")
    return "    " + "\n    ".join(lines) + "\n"


def _key_range(attrs, Tq: int, Tk: int, block: int = BLOCK) -> str:
    """WGSL setting lo, hi (i32): the keys any query of the block q0..q0+block-1 may see."""
    off = Tk - Tq
    lines = [
        f"  let imax = i32(min(q0 + {block - 1}u, {Tq - 1}u));",
        "  var lo = 0i;",
        f"  var hi = {Tk}i;",
    ]
    if attrs["causal"]:
        lines.append(f"  hi = min(hi, imax + {off + 1}i);")
    if attrs["window"]:
        w = attrs["window"]
        lines.append(f"  lo = max(lo, i32(q0) + {off - w + 1}i);")
        if not attrs["causal"]:
            lines.append(f"  hi = min(hi, imax + {off + w}i);")
    return "\n".join(lines) + "\n"


VISIBLE_KEYS_SHARED = (
    "var<workgroup> visible_keys: array<atomic<i32>, 2>;\nvar<workgroup> visible_span: vec2<i32>;\n"
)


def _visible_keys(
    mask: _Operand,
    head: str,
    heads: int,
    q0: str,
    queries: int,
    Tq: int,
    Tk: int,
    block: int,
    threads: int = 256,
) -> str:
    """WGSL narrowing the workgroup's key walk [lo, hi), in blocks of `block` keys from lo, to
    the blocks holding a key that the mask leaves visible to one of its rows: query heads
    head .. head + heads - 1 times queries q0 .. q0 + queries - 1 (those before Tq). A KV
    cache of fixed capacity hides its unwritten slots with -inf; walking them would cost as
    much as walking the written ones.

    Only an exact -inf hides a key (a finite -1e9 is still computed). A skipped block would
    have changed nothing: its weights exp(-inf - max) are 0, the running max and sum stay, so
    the results are the same bits (rows that see no key still give 0 and log-sum-exp +inf).
    Blocks stay on lo's grid, and hi moves only down to the end of the last visible key's
    block, so each block walked reads what it read before.

    The workgroup's `threads` invocations share the scan, key by key ([lo, hi) only; rows
    along which the mask is broadcast are read once), and meet through two workgroup atomics
    (`meet_visible_keys`)."""
    mheads = heads if mask.strides[1] else 1
    mqueries = queries if mask.strides[2] else 1
    value = mask.load("b", "vh", "vi", "u32(vkey)")
    scan = f"""  for (var vkey = lo + i32(tid); vkey < hi; vkey += {threads}i) {{
    for (var r = 0u; r < {mheads * mqueries}u; r++) {{
      let vh = {head} + r / {mqueries}u; let vi = {q0} + r % {mqueries}u;
      if (vi < {Tq}u && bitcast<u32>({value}) != {NEG_INF_BITS}) {{
        seen_first = min(seen_first, vkey); seen_end = vkey + 1; break;
      }}
    }}
  }}
"""
    narrow = (
        f"    lo += (span.x - lo) / {block}i * {block}i;\n"
        f"    hi = min(hi, lo + (span.y - lo + {block - 1}i) / {block}i * {block}i);\n"
    )
    return meet_visible_keys(Tk, scan, narrow)


NEG_INF_BITS = "0xff800000u"  # the bits of -inf: no float comparison a compiler could relax


def meet_visible_keys(Tk: int, scan: str, narrow: str) -> str:
    """WGSL meeting the workgroup's visible keys (`_visible_keys`, and the team kernel's
    `attention_team._visible_span`): `scan`, each invocation's share of the mask, lowers
    seen_first to the first key it finds visible and raises seen_end past the last (declared
    here: Tk and 0 where it finds none); two workgroup atomics take the workgroup's min and
    max, and `narrow` moves [lo, hi) given their `span` where a key is visible (else the walk
    is empty). One invocation sets the atomics before a barrier (relying on WGSL's
    zero-initialized workgroup memory instead gave wrong results through wgpu-native on
    lavapipe), another barrier follows the scan, one invocation copies them out and
    `workgroupUniformLoad` hands them to all: the key loop that follows holds barriers, so its
    bounds must be workgroup-uniform. Needs VISIBLE_KEYS_SHARED."""
    return (
        f"  if (tid == 0u) {{ atomicStore(&visible_keys[0], {Tk}i);"
        " atomicStore(&visible_keys[1], 0i); }\n"
        "  workgroupBarrier();\n"
        f"  var seen_first = {Tk}i; var seen_end = 0i;\n" + scan + "  if (seen_end > 0i) {\n"
        "    atomicMin(&visible_keys[0], seen_first); atomicMax(&visible_keys[1], seen_end);\n"
        "  }\n"
        "  workgroupBarrier();\n"
        "  if (tid == 0u) {\n"
        "    visible_span = vec2<i32>(atomicLoad(&visible_keys[0]), atomicLoad(&visible_keys[1]));\n"
        "  }\n"
        "  let span = workgroupUniformLoad(&visible_span);\n"
        f"  if (span.y == 0i) {{\n    hi = lo;\n  }} else {{\n{narrow}  }}\n"
    )


def _query_range(attrs, Tq: int, Tk: int) -> str:
    """WGSL setting qlo, qhi (i32): the queries that may see any key of the block k0..k0+63."""
    off = Tk - Tq
    lines = [
        f"  let jmax = i32(min(k0 + {BLOCK - 1}u, {Tk - 1}u));",
        "  var qlo = 0i;",
        f"  var qhi = {Tq}i;",
    ]
    if attrs["causal"]:
        lines.append(f"  qlo = max(qlo, i32(k0) - {off}i);")
    if attrs["window"]:
        w = attrs["window"]
        lines.append(f"  qhi = min(qhi, jmax + {w - off}i);")
        if not attrs["causal"]:
            lines.append(f"  qlo = max(qlo, i32(k0) - {off + w - 1}i);")
    return "\n".join(lines) + "\n"


def _shared(d: int, dv: int) -> str:
    rows = max(_chunk_rows(_pad64(d)) * _pad64(d), _chunk_rows(_pad64(dv)) * _pad64(dv))
    return (
        f"var<workgroup> sa: array<vec4<f32>, {SLICE * 16}>;\n"
        f"var<workgroup> sb: array<vec4<f32>, {max(SLICE * 16, rows // 4)}>;\n"
        "var<workgroup> sp: array<vec4<f32>, 1024>;\n"
    )


def _row_sum(var: str) -> str:
    """Sum vec4 `var` (one value per row 4ty + p) over the 16 invocations sharing those rows."""
    return (
        f"  sa[tx * 16u + ty] = {var};\n  workgroupBarrier();\n"
        f"  {var} = vec4<f32>(0.0);\n"
        f"  for (var t = 0u; t < 16u; t++) {{ {var} += sa[t * 16u + ty]; }}\n"
        "  workgroupBarrier();\n"
    )


def forward_operands(plan: Plan, bind: _Bindings, node, dims):
    """q, k, v and the mask (None without one) of a forward attention node, bound in `bind`."""
    B, Hq, _, Tq, Tk, _, _ = dims
    q, k, v = (_Operand(plan, bind, i, plan.graph.nodes[i].type.shape) for i in node.inputs[:3])
    mask = _Operand(plan, bind, node.inputs[3], (B, Hq, Tq, Tk)) if len(node.inputs) > 3 else None
    return q, k, v, mask


def _inputs(plan: Plan, kernel: Kernel):
    graph = plan.graph
    node = graph.nodes[kernel.node]
    types = [graph.nodes[i].type for i in node.inputs]
    dims = attention_dims(*types[:3])
    return node, dims


HEADER = """@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {
  let ty = tid / 16u; let tx = tid % 16u;
"""
LANES = "vec4<i32>(0, 1, 2, 3)"


def _transpose_to_shared(name: str) -> str:
    """Store vec4s name0..name3 (rows 4ty + p, columns 4tx + c) into sp as
    [column][vec4 of the four rows], the layout `_accumulate_rows` reads."""
    return "".join(
        f"    sp[(4u * tx + {c}u) * 16u + ty] = "
        f"vec4<f32>({', '.join(f'{name}{p}.{ch}' for p in range(4))});\n"
        for c, ch in enumerate("xyzw")
    )


def _output_row(attrs, Hq: int, Tq: int, b: str, h: str, i: str) -> str:
    """WGSL index of output row (b, h, i) of [B, Hq, Tq, Dv], stored [B, Tq, Hq, Dv] under
    the `tokens_first` layout."""
    if attrs.get("tokens_first"):
        return f"({b} * {Tq}u + {i}) * {Hq}u + {h}"
    return f"({b} * {Hq}u + {h}) * {Tq}u + {i}"


def _store_rows(out: str, acc: str, row0: str, rows: int, row_index: str, dim: int, base: int):
    """out[base + row_index(row) * dim + d] = acc[p * nj + j][c] for the block's rows."""
    nj = _pad64(dim) // BLOCK
    stores = "".join(
        f"""      for (var c = 0u; c < 4u; c++) {{
        let d = {64 * j}u + 4u * tx + c;
        if (d < {dim}u) {{ {out}[{base}u + row * {dim}u + d] = {acc}[p * {nj}u + {j}u][c]; }}
      }}
"""
        for j in range(nj)
    )
    return f"""  for (var p = 0u; p < 4u; p++) {{
    let r = {row0} + 4u * ty + p;
    if (r < {rows}u) {{
      let row = {row_index};
{stores}    }}
  }}
"""


def blocks_forward(plan: Plan, kernel: Kernel) -> KernelSource:
    """The forward over 64-query blocks; `attention_rows.attention_forward` chooses it."""
    node, dims = _inputs(plan, kernel)
    B, Hq, Hkv, Tq, Tk, D, Dv = dims
    attrs = node.attrs
    bind = _Bindings(plan, kernel.node)
    out = f"buf{bind.out_buffer}"
    q, k, v, mask = forward_operands(plan, bind, node, dims)
    group = Hq // Hkv
    nqb = math.ceil(Tq / BLOCK)
    nj = _pad64(Dv) // BLOCK
    logits = "".join(
        _logits(
            attrs, mask, "b", "h", f"vec4<i32>(i0 + {p})", f"j0 + {LANES}", Tq, Tk, f"s{p}", f"x{p}"
        )
        for p in range(4)
    )
    maxes = ", ".join(f"max(max(x{p}.x, x{p}.y), max(x{p}.z, x{p}.w))" for p in range(4))
    sums = ", ".join(f"dot(p{p}, vec4<f32>(1.0))" for p in range(4))
    body = (
        HEADER
        + f"  let qb = {nqb - 1}u - wid.x;  // the longest causal rows first\n"
        + f"  let h = wid.y; let b = wid.z; let hk = h / {group}u;\n"
        + f"  let q0 = qb * {BLOCK}u;\n"
        + _key_range(attrs, Tq, Tk)
        + (_visible_keys(mask, "h", 1, "q0", BLOCK, Tq, Tk, BLOCK) if mask else "")
        + f"  var m = vec4<f32>({NEG_MAX});\n  var l = vec4<f32>(0.0);\n"
        + f"  var o: array<vec4<f32>, {4 * nj}>;\n"
        + f"  for (var k0i = lo; k0i < hi; k0i += {BLOCK}i) {{\n"
        + "    let k0 = u32(k0i);\n"
        + _score_product("s", q, "b", "h", "q0", Tq, k, "b", "hk", "k0", Tk, D)
        + "    let i0 = i32(q0 + 4u * ty); let j0 = vec4<i32>(k0i + 4 * i32(tx));\n"
        + logits
        + f"    sa[tx * 16u + ty] = vec4<f32>({maxes});\n    workgroupBarrier();\n"
        + "    var mnew = m;\n"
        + "    for (var t = 0u; t < 16u; t++) { mnew = max(mnew, sa[t * 16u + ty]); }\n"
        + "    let alpha = exp(m - mnew);\n    m = mnew;\n"
        + "".join(f"    let p{p} = exp(x{p} - vec4<f32>(mnew.{'xyzw'[p]}));\n" for p in range(4))
        + f"    l = l * alpha + vec4<f32>({sums});\n"
        + "    for (var p = 0u; p < 4u; p++) {\n"
        + f"      for (var j = 0u; j < {nj}u; j++) {{ o[p * {nj}u + j] *= alpha[p]; }}\n    }}\n"
        + _transpose_to_shared("p")
        + "    workgroupBarrier();\n"
        + _accumulate_rows("o", "sp", v, "b", "hk", "k0", Tk, Dv)
        + "  }\n"
        + _row_sum("l")
        + "  for (var p = 0u; p < 4u; p++) {\n"
        + "    let inv = select(0.0, 1.0 / l[p], l[p] > 0.0);\n"
        + f"    for (var j = 0u; j < {nj}u; j++) {{ o[p * {nj}u + j] *= inv; }}\n"
        + "    let i = q0 + 4u * ty + p;\n"
        + f"    if (tx == 0u && i < {Tq}u) {{\n"
        + f"      {out}[{B * Hq * Tq * Dv}u + (b * {Hq}u + h) * {Tq}u + i] = "
        + f"select({POS_INF}, m[p] + log(l[p]), l[p] > 0.0);\n    }}\n  }}\n"
        + _store_rows(out, "o", "q0", Tq, _output_row(attrs, Hq, Tq, "b", "h", "r"), Dv, 0)
        + "}\n"
    )
    shared = _shared(D, Dv) + (VISIBLE_KEYS_SHARED if mask else "")
    return KernelSource(
        _assemble(bind, body + q.function, shared),
        bind.order,
        (nqb, Hq, B),
        f"attention%{node.id}",
    )


def _grad_operands(plan: Plan, bind: _Bindings, node, B, Hq, Tq, Tk):
    graph = plan.graph
    q, k, v, dout, lse, delta = (
        _Operand(plan, bind, i, graph.nodes[i].type.shape) for i in node.inputs[:6]
    )
    mask = _Operand(plan, bind, node.inputs[6], (B, Hq, Tq, Tk)) if len(node.inputs) > 6 else None
    return q, k, v, dout, lse, delta, mask


def _row_stats(lse: _Operand, delta: _Operand, first: str, Tq: int) -> str:
    """vec4s lse4 and dl4 of the log-sum-exp and delta of queries first + 0..3."""
    idx = [f"min({first} + {c}u, {Tq - 1}u)" for c in range(4)]
    lses = ", ".join(lse.load("b", "h", i) for i in idx)
    deltas = ", ".join(delta.load("b", "h", i) for i in idx)
    return f"      let lse4 = vec4<f32>({lses});\n      let dl4 = vec4<f32>({deltas});\n"


def _grad_scores(attrs, mask, i_vec, j_vec, Tq, Tk, lse_of, delta_of) -> str:
    """pr{p} = exp(x - lse) and ds{p} = pr (dp - delta) slope scale, for the four rows p."""
    lines = []
    for p in range(4):
        lines.append(
            _logits(attrs, mask, "b", "h", i_vec(p), j_vec(p), Tq, Tk, f"s{p}", f"x{p}", f"g{p}")
        )
        lines.append(
            f"    let pr{p} = exp(x{p} - {lse_of(p)});\n"
            f"    let ds{p} = pr{p} * (dp{p} - {delta_of(p)}) * g{p} * "
            f"{literal(attrs['scale'], 'f32')};\n"
        )
    return "".join(lines)


@archetype("attention_grad_q")
def attention_grad_q(plan: Plan, kernel: Kernel) -> KernelSource:
    node, (B, Hq, Hkv, Tq, Tk, D, Dv) = _inputs(plan, kernel)
    attrs = node.attrs
    bind = _Bindings(plan, kernel.node)
    out = f"buf{bind.out_buffer}"
    q, k, v, dout, lse, delta, mask = _grad_operands(plan, bind, node, B, Hq, Tq, Tk)
    group = Hq // Hkv
    nqb = math.ceil(Tq / BLOCK)
    nj = _pad64(D) // BLOCK
    body = (
        HEADER
        + f"  let qb = {nqb - 1}u - wid.x;\n"
        + f"  let h = wid.y; let b = wid.z; let hk = h / {group}u;\n"
        + f"  let q0 = qb * {BLOCK}u;\n"
        + _key_range(attrs, Tq, Tk)
        + _row_stats(lse, delta, "q0 + 4u * ty", Tq)
        + f"  var acc: array<vec4<f32>, {4 * nj}>;\n"
        + f"  for (var k0i = lo; k0i < hi; k0i += {BLOCK}i) {{\n"
        + "    let k0 = u32(k0i);\n"
        + _score_product("s", q, "b", "h", "q0", Tq, k, "b", "hk", "k0", Tk, D)
        + _score_product("dp", dout, "b", "h", "q0", Tq, v, "b", "hk", "k0", Tk, Dv)
        + "    let i0 = i32(q0 + 4u * ty); let j0 = vec4<i32>(k0i + 4 * i32(tx));\n"
        + _grad_scores(
            attrs,
            mask,
            lambda p: f"vec4<i32>(i0 + {p})",
            lambda p: f"j0 + {LANES}",
            Tq,
            Tk,
            lambda p: f"vec4<f32>(lse4.{'xyzw'[p]})",
            lambda p: f"vec4<f32>(dl4.{'xyzw'[p]})",
        )
        + _transpose_to_shared("ds")
        + "    workgroupBarrier();\n"
        + _accumulate_rows("acc", "sp", k, "b", "hk", "k0", Tk, D)
        + "  }\n"
        + _store_rows(out, "acc", "q0", Tq, f"(b * {Hq}u + h) * {Tq}u + r", D, 0)
        + "}\n"
    )
    return KernelSource(
        _assemble(bind, body, _shared(D, Dv)),
        bind.order,
        (nqb, Hq, B),
        f"attention_grad_q%{node.id}",
    )


@archetype("attention_grad_kv")
def attention_grad_kv(plan: Plan, kernel: Kernel) -> KernelSource:
    node, (B, Hq, Hkv, Tq, Tk, D, Dv) = _inputs(plan, kernel)
    attrs = node.attrs
    bind = _Bindings(plan, kernel.node)
    out = f"buf{bind.out_buffer}"
    q, k, v, dout, lse, delta, mask = _grad_operands(plan, bind, node, B, Hq, Tq, Tk)
    group = Hq // Hkv
    nkb = math.ceil(Tk / BLOCK)
    row_index = f"(b * {Hkv}u + hk) * {Tk}u + r"
    # Rows (4ty + p) are keys here and columns (4tx + c) queries.
    body = (
        HEADER
        + f"  let kb = wid.x; let hk = wid.y; let b = wid.z;\n  let k0 = kb * {BLOCK}u;\n"
        + _query_range(attrs, Tq, Tk)
        + f"  var dk: array<vec4<f32>, {4 * _pad64(D) // BLOCK}>;\n"
        + f"  var dv: array<vec4<f32>, {4 * _pad64(Dv) // BLOCK}>;\n"
        + f"  for (var g = 0u; g < {group}u; g++) {{\n"
        + f"    let h = hk * {group}u + g;\n"
        + f"    for (var q0i = qlo; q0i < qhi; q0i += {BLOCK}i) {{\n"
        + "      let q0 = u32(q0i);\n"
        + _row_stats(lse, delta, "q0 + 4u * tx", Tq)
        + _score_product("s", k, "b", "hk", "k0", Tk, q, "b", "h", "q0", Tq, D)
        + _score_product("dp", v, "b", "hk", "k0", Tk, dout, "b", "h", "q0", Tq, Dv)
        + "    let j0 = i32(k0 + 4u * ty); let i0 = vec4<i32>(q0i + 4 * i32(tx));\n"
        + _grad_scores(
            attrs,
            mask,
            lambda p: f"i0 + {LANES}",
            lambda p: f"vec4<i32>(j0 + {p})",
            Tq,
            Tk,
            lambda p: "lse4",
            lambda p: "dl4",
        )
        + _transpose_to_shared("pr")
        + "    workgroupBarrier();\n"
        + _accumulate_rows("dv", "sp", dout, "b", "h", "q0", Tq, Dv)
        + _transpose_to_shared("ds")
        + "    workgroupBarrier();\n"
        + _accumulate_rows("dk", "sp", q, "b", "h", "q0", Tq, D)
        + "    }\n  }\n"
        + _store_rows(out, "dk", "k0", Tk, row_index, D, 0)
        + _store_rows(out, "dv", "k0", Tk, row_index, Dv, B * Hkv * Tk * D)
        + "}\n"
    )
    return KernelSource(
        _assemble(bind, body, _shared(D, Dv)),
        bind.order,
        (nkb, Hkv, B),
        f"attention_grad_kv%{node.id}",
    )
