"""Attention forward on matrix units (subgroup matrices: f16 operands, f32 accumulation).

Used instead of the 64-query block kernel of `attention.py` where the executor's matrix
units work, for f16 inputs, and for f32 ones under matmul_precision="high" where f32
products on matrix units pay (`matmul.py` has the same rule): q, k and v are rounded to f16
as they are staged, scores and the output accumulate in f32, the softmax runs in f32.

One workgroup per (batch, query head, 64 queries), eight subgroups. The query block is
staged once as f16. Per block of 64 keys:

- the K block is staged as f16; subgroup s multiplies the 16 query rows of strip s % 4 by
  the 32 keys of half s / 4 (the head dim 16 at a time) into two 16 x 16 score matrices,
  stored to workgroup memory;
- while the V block replaces the K block, each lane takes 16 keys of one row (four lanes a
  row, in straight-line code): logits (scale, soft-cap, causal/window, mask), the online
  softmax's max and sum (the row's lanes meet through subgroup shuffles), and
  p = exp(logit - max) stored as f16;
- subgroup s multiplies the p rows of its strip by half s / 4 of the value columns (padded
  to a multiple of 32) into fresh accumulators, stored to workgroup memory, and each lane
  rescales its quarter of its row's output (kept in registers: result matrices cannot be
  scaled row by row) and adds them.

The key walk, the mask narrowing (`_visible_keys`) and the outputs (rows in the node's
layout, log-sum-exps after them) are those of the block kernel, so its backward kernels
(f32) read them unchanged.
"""

from __future__ import annotations

import math

from meganeura.backends.wgsl.attention import (
    BLOCK,
    NEG_MAX,
    POS_INF,
    VISIBLE_KEYS_SHARED,
    _inputs,
    _key_range,
    _logits,
    _Operand,
    _output_row,
    _visible_keys,
    forward_operands,
)
from meganeura.backends.wgsl.kernels import KernelSource, _assemble
from meganeura.backends.wgsl.matmul_operands import VecBindings
from meganeura.backends.wgsl.matmul_units import (
    HEADER,
    WORKGROUP_STORAGE,
    matrix_load,
    matrix_store,
)
from meganeura.lower.plan import Kernel, Plan, buffers_read

THREADS = 256  # eight subgroups of 32
LANES_PER_ROW = 4  # the softmax's lanes per query row, 16 keys each
PAD = 8  # f16 elements added to each staged row
MAX_HEAD_DIM = 128


def _pad16(n: int) -> int:
    return math.ceil(n / 16) * 16


def _pad32(n: int) -> int:
    return math.ceil(n / 32) * 32


def storage(D: int, Dv: int) -> int:
    """Bytes of workgroup memory for head dims D (queries, keys) and Dv (values)."""
    dp, dvp = _pad16(D), _pad32(Dv)
    staged = BLOCK * (dp + PAD) + BLOCK * (max(dp, dvp) + PAD) + BLOCK * (BLOCK + PAD)
    scratch = BLOCK * (max(BLOCK, dvp) + 4)
    return 2 * staged + 4 * scratch + 64  # + the visible-keys span


def fits(plan: Plan, D: int, Dv: int) -> bool:
    budget = plan.options.get("workgroup_storage", WORKGROUP_STORAGE)
    return max(D, Dv) <= MAX_HEAD_DIM and storage(D, Dv) <= budget


def _stage(
    dst: str,
    stride: int,
    x: _Operand,
    b: str,
    h: str,
    row0: str,
    rows: int,
    dim: int,
    padded: int,
    vec: bool,
):
    """Stage x[b, h, row0 + r, d] (64 rows, `padded` dims) into f16 array dst[r][d] (row
    stride `stride`), zero outside the rows and the `dim` dims; with `vec`, four dims per
    16-byte load."""
    if not vec:
        return f"""    for (var e = tid; e < {BLOCK * padded}u; e += {THREADS}u) {{
      let r = e / {padded}u; let d = e % {padded}u; let gr = {row0} + r;
      var v = 0.0f;
      if (gr < {rows}u && d < {dim}u) {{ v = {x.load(b, h, "gr", "d")}; }}
      {dst}[r * {stride}u + d] = f16(v);
    }}
"""
    stores = " ".join(f"{dst}[p + {c}u] = f16(v.{ch});" for c, ch in enumerate("xyzw"))
    return f"""    for (var e = tid; e < {BLOCK * padded // 4}u; e += {THREADS}u) {{
      let r = e / {padded // 4}u; let d = (e % {padded // 4}u) * 4u; let gr = {row0} + r;
      var v = vec4<f32>(0.0);
      if (gr < {rows}u && d < {dim}u) {{ v = vec4<f32>({x.buf}[({x.addr(b, h, "gr", "d")}) / 4u]); }}
      let p = r * {stride}u + d; {stores}
    }}
"""


def _vector_buffers(plan: Plan, bind: VecBindings, operands, dims, scalar) -> set[int]:
    """Buffers of the operands that are read as vec4s: contiguous along the head dim, every
    stride and the offset a multiple of 4, and no other read of the buffer in the kernel
    element by element (`scalar`: nodes read that way)."""
    graph = plan.graph
    reads = set(scalar)
    for x in operands:
        if x.computed:
            reads |= set(buffers_read(graph, [x.base], plan.materialized))
    scalar_buffers = {plan.buffer_of[n] for n in reads} | {bind.out_buffer}
    ok: dict[int, bool] = {}
    for x, dim in zip(operands, dims, strict=True):
        if x.computed:
            continue
        buf = plan.buffer_of[x.base]
        fits = dim % 4 == 0 and x.strides[-1] == 1 and x.offset % 4 == 0
        fits = fits and all(st % 4 == 0 for st in x.strides[:-1])
        ok[buf] = ok.get(buf, True) and fits and buf not in scalar_buffers
    return {buf for buf, good in ok.items() if good}


def _logit_function(attrs, mask: str | None, Tq: int, Tk: int) -> str:
    """WGSL `mn_logit(b, h, i, j, raw)`: the logit of query i and key j of head h from their
    raw dot product (scale, soft-cap, mask), -inf where the key is not visible."""
    logit = _logits(attrs, mask, "b", "h", "i", "j", Tq, Tk, "raw", "x", width=1)
    return f"fn mn_logit(b: u32, h: u32, i: i32, j: i32, raw: f32) -> f32 {{\n{logit}    return x;\n}}\n"


def units_forward(plan: Plan, kernel: Kernel, syntax: str) -> KernelSource:
    node, dims = _inputs(plan, kernel)
    B, Hq, Hkv, Tq, Tk, D, Dv = dims
    attrs = node.attrs
    bind = VecBindings(plan, kernel.node)
    out = f"buf{bind.out_buffer}"
    q, k, v, mask = forward_operands(plan, bind, node, dims)
    scalar = [mask.base] if mask is not None else []
    bind.vector = _vector_buffers(plan, bind, (q, k, v), (D, D, Dv), scalar)
    vec_q, vec_k, vec_v = (
        not x.computed and plan.buffer_of[x.base] in bind.vector for x in (q, k, v)
    )
    group = Hq // Hkv
    nqb = math.ceil(Tq / BLOCK)
    # Values padded to 32 columns: each half of a row's output matrices goes to one subgroup.
    dp, dvp = _pad16(D), _pad32(Dv)
    QS, KS, PS = dp + PAD, max(dp, dvp) + PAD, BLOCK + PAD
    SS = max(BLOCK, dvp) + 4  # f32 scratch: scores, then p V
    keys = BLOCK // LANES_PER_ROW  # of a block, per softmax lane
    cols = dvp // LANES_PER_ROW  # output columns per lane
    strip = "(16u * (sg % 4u))"  # the subgroup's 16 query rows in the block

    def store(name: str, col: str) -> str:
        return matrix_store(syntax, "Ss", f"{strip} * {SS}u + {col}", name, SS)

    # Subgroup sg: rows of strip sg % 4, keys (then value columns) of half sg / 4.
    scores = ["    {", "      let kh = 32u * (sg / 4u);"]
    scores += [f"      var s{j} = subgroup_matrix_result<f32, 16, 16>();" for j in range(2)]
    for d0 in range(0, dp, 16):
        left = matrix_load(syntax, "left", "Qs", f"{strip} * {QS}u + {d0}u", QS)
        scores.append(f"      {{ let lm = {left};")
        for j in range(2):
            # K rows [key][d] read column-major: the right matrix [d][key].
            offset = f"(kh + {16 * j}u) * {KS}u + {d0}u"
            right = matrix_load(syntax, "right", "KVs", offset, KS, True)
            scores.append(f"        s{j} = subgroupMatrixMultiplyAccumulate(lm, {right}, s{j});")
        scores.append("      }")
    scores += [f"      {store(f's{j}', f'kh + {16 * j}u')};" for j in range(2)]
    scores.append("    }")

    half = dvp // 32  # output matrices per subgroup
    products = ["    {", f"      let vh = {16 * half}u * (sg / 4u);"]
    products += [f"      var pv{j} = subgroup_matrix_result<f32, 16, 16>();" for j in range(half)]
    for c in range(BLOCK // 16):  # 16 keys at a time
        left = matrix_load(syntax, "left", "Ps", f"{strip} * {PS}u + {16 * c}u", PS)
        products.append(f"      {{ let lm = {left};")
        for j in range(half):
            right = matrix_load(syntax, "right", "KVs", f"{16 * c * KS + 16 * j}u + vh", KS)
            products.append(
                f"        pv{j} = subgroupMatrixMultiplyAccumulate(lm, {right}, pv{j});"
            )
        products.append("      }")
    products += [f"      {store(f'pv{j}', f'vh + {16 * j}u')};" for j in range(half)]
    products.append("    }")

    # Lane (row 8 sg + lane / 4, quarter lane % 4) of 16 keys: its logits, in straight-line
    # code (registers, not an indexed array); the row's four lanes meet through shuffles.
    mask_value = None
    if mask is not None:
        mask_value = mask.load("b", "h", f"u32(min(i, {Tq - 1}i))", f"u32(min(j, {Tk - 1}i))")
    softmax = [
        f"    let x{c} = mn_logit(b, h, i, k0i + i32(c0 + {c}u), Ss[row * {SS}u + c0 + {c}u]);"
        for c in range(keys)
    ]
    bmax = " ".join(f"bmax = max(bmax, x{c});" for c in range(keys))
    probabilities = "\n".join(
        f"    {{ let p = exp(x{c} - mnew); psum += p; Ps[row * {PS}u + c0 + {c}u] = f16(p); }}"
        for c in range(keys)
    )
    update = "\n".join(
        f"    o{c} = o{c} * alpha + Ss[row * {SS}u + d0 + {c}u];" for c in range(cols)
    )
    stores = "\n".join(
        f"    if (d0 + {c}u < {Dv}u) {{ {out}[orow * {Dv}u + d0 + {c}u] = o{c} * inv; }}"
        for c in range(cols)
    )
    registers = "".join(f"  var o{c} = 0.0f;\n" for c in range(cols))
    body = f"""{_logit_function(attrs, mask_value, Tq, Tk)}@compute @workgroup_size({THREADS})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32,
        @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32) {{
  let qb = {nqb - 1}u - wid.x;  // the longest causal rows first
  let h = wid.y; let b = wid.z; let hk = h / {group}u;
  let q0 = qb * {BLOCK}u;
{_key_range(attrs, Tq, Tk)}{_visible_keys(mask, "h", 1, "q0", BLOCK, Tq, Tk, BLOCK, THREADS) if mask else ""}  let row = 8u * sg + lane / {LANES_PER_ROW}u;  // this lane's query row in the block
  let c0 = (lane % {LANES_PER_ROW}u) * {keys}u;  // its keys of each block
  let d0 = (lane % {LANES_PER_ROW}u) * {cols}u;  // its output columns
  let i = i32(q0 + row);
  var m = {NEG_MAX};
  var l = 0.0f;
{registers}{_stage("Qs", QS, q, "b", "h", "q0", Tq, D, dp, vec_q)}  for (var k0i = lo; k0i < hi; k0i += {BLOCK}i) {{
    let k0 = u32(k0i);
    workgroupBarrier();
{_stage("KVs", KS, k, "b", "hk", "k0", Tk, D, dp, vec_k)}    workgroupBarrier();
{chr(10).join(scores)}
    workgroupBarrier();
{_stage("KVs", KS, v, "b", "hk", "k0", Tk, Dv, dvp, vec_v)}{chr(10).join(softmax)}
    var bmax = {NEG_MAX};
    {bmax}
    bmax = max(bmax, subgroupShuffleXor(bmax, 1u));
    bmax = max(bmax, subgroupShuffleXor(bmax, 2u));
    let mnew = max(m, bmax);
    let alpha = exp(m - mnew);
    m = mnew;
    var psum = 0.0f;
{probabilities}
    psum = psum + subgroupShuffleXor(psum, 1u);
    psum = psum + subgroupShuffleXor(psum, 2u);
    l = l * alpha + psum;
    workgroupBarrier();
{chr(10).join(products)}
    workgroupBarrier();
{update}
  }}
  let inv = select(0.0, 1.0 / l, l > 0.0);
  if (i < {Tq}i) {{
    let orow = {_output_row(attrs, Hq, Tq, "b", "h", "u32(i)")};
{stores}
    if (lane % {LANES_PER_ROW}u == 0u) {{
      {out}[{B * Hq * Tq * Dv}u + (b * {Hq}u + h) * {Tq}u + u32(i)] = select({POS_INF}, m + log(l), l > 0.0);
    }}
  }}
}}
"""
    shared = (
        f"var<workgroup> Qs: array<f16, {BLOCK * QS}>;\n"
        f"var<workgroup> KVs: array<f16, {BLOCK * KS}>;\n"
        f"var<workgroup> Ps: array<f16, {BLOCK * PS}>;\n"
        f"var<workgroup> Ss: array<f32, {BLOCK * SS}>;\n"
    ) + (VISIBLE_KEYS_SHARED if mask else "")
    source = HEADER + _assemble(bind, body + q.function, shared)
    return KernelSource(source, bind.order, (nqb, Hq, B), f"attention%{node.id}")
