"""Attention forward for few query rows (decode, short prefill chunks), and the choice of kernel.

The 64 x 64 block kernels of `attention.py` give each workgroup 64 queries of one head. With
one query (decode) that workgroup computes 63 rows of padding and walks the keys alone; with
128 queries and 9 heads it launches 18 workgroups on a GPU with 132 SMs. This kernel gives a
workgroup few rows -- `heads` query heads sharing one kv head (so K and V are read once for
the group) times `queries` queries, 16 rows at most -- and spreads their work over its 256
invocations by key. Per block of `keys` keys (64 for head dims up to 64):

- the K block, loaded into registers while the previous block was computed (consecutive
  invocations, consecutive elements), is staged in workgroup memory; invocation (key j, row
  group) computes its rows' scores against key j from the staged queries with vec4 reads
  (mask values, when there is a mask, are also loaded a block ahead);
- one invocation per row takes the block's maximum and the online-softmax rescale factor;
- the score owners write p = exp(logit - running max) to workgroup memory, while the staged
  V block replaces the K block;
- invocation (vec4 column of the value, row, key subset) rescales its partial output and row
  sum, and adds p V over its subset's keys, four keys per read of p.

Before the walk, the workgroup narrows its keys to the blocks that hold a key its mask does
not hide (-inf) from all its rows (`attention._visible_keys`): a prefill of 128 tokens into a
512-slot KV cache walks the written slots only, and a decode split over unwritten slots walks
nothing and leaves the empty partial softmax (max NEG_MAX, sum 0) it left when it walked
them: the combination weighs it by exp(NEG_MAX - max) = 0 (rows that no split sees still
give 0 and log-sum-exp +inf).

The key subsets' partial sums (under the same running max) are added once at the end. Output
rows and log-sum-exps are written as `attention.py`'s forward writes them, so the backward
kernels there read them unchanged. Workgroup memory stays under 28 KiB (K or V block 16 KiB
with padding, query rows 8 KiB), registers hold two prefetched blocks of 16 floats each.

Which kernel (`forward_layout`): this one when the head dims are at most 256 and either
Tq <= FEW_QUERIES = 16 (64-query blocks would be at least 75% padding) or the 64-query
blocks would give fewer than FILL_WORKGROUPS = 128 workgroups (about the SMs of a large GPU).
Query heads per workgroup: the largest divisor of the GQA group that fits. Queries per
workgroup: the largest count that still gives FILL_WORKGROUPS workgroups, or 1 when none does
-- a workgroup's time is one walk over its keys whatever its row count, so when the GPU
cannot be filled, the fewest rows per workgroup finish first. SmolLM2-135M (9 query heads
over 3 kv heads, head dim 64): decode runs 3 workgroups of 3 rows, a 128-token prefill 129
workgroups of 3 heads x 3 queries. Where that layout would run 2 queries or more against at
most 1024 keys (short prefill chunks), the team kernel of `attention_team.py` runs instead
(`attention_team.team_layout`).

When even that launches fewer than FILL_WORKGROUPS / 2 workgroups, each walking at least
SPLIT_BLOCKS key blocks (decode: batch x kv heads far below the SM count), the keys are split
over several workgroups per row group (flash-decoding), in whole blocks: each writes its
unnormalized output, running max and sum to scratch buffers, and a second dispatch combines
them (f32 outputs only). SmolLM2-135M decoding over a 512-slot cache: 3 x 8 workgroups.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from meganeura.backends.wgsl import attention_team, attention_units
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
    blocks_forward,
    forward_operands,
)
from meganeura.backends.wgsl.emit import prelude_for
from meganeura.backends.wgsl.kernels import KernelSource, _assemble, _Bindings, archetype
from meganeura.lower.plan import Kernel, Plan

WG = 256  # invocations per workgroup
FIRST_PART = 1000  # placeholder binding of the first scratch buffer while the body is written
FEW_QUERIES = 16  # up to this many queries, 64-query blocks are mostly padding
FILL_WORKGROUPS = 128  # about the SM count of a large GPU (132 on H100 and H200)
MAX_ROWS = 16  # rows (head, query) per workgroup
MAX_KEYS = 64  # keys per block
TILE_FLOATS = 4096  # a staged K or V block: 16 KiB
QUERY_FLOATS = 2048  # the staged query rows: 8 KiB
MAX_HEAD_DIM = TILE_FLOATS // 16  # at least 16 keys per block
SPLIT_BLOCKS = 4  # key blocks per walk from which splitting the keys pays for a second dispatch


@dataclass(frozen=True)
class RowsLayout:
    """How the few-rows kernel splits the work: per workgroup `heads` query heads of one kv
    group times `queries` queries; keys walked in blocks of `keys`."""

    heads: int
    queries: int
    keys: int
    splits: int = 1  # key ranges walked by separate workgroups, combined by a second dispatch

    @property
    def rows(self) -> int:
        return self.heads * self.queries


def _pad4(n: int) -> int:
    return -(-n // 4) * 4


def forward_layout(B, Hq, Hkv, Tq, Tk, D, Dv) -> RowsLayout | None:
    """The few-rows kernel's layout for these dims, or None where the 64-query block kernel
    is the better one (see the module docstring for the rule)."""
    widest = max(_pad4(D), _pad4(Dv))
    if widest > MAX_HEAD_DIM:
        return None
    if Tq > FEW_QUERIES and math.ceil(Tq / BLOCK) * Hq * B >= FILL_WORKGROUPS:
        return None
    max_rows = min(MAX_ROWS, QUERY_FLOATS // _pad4(D), WG * 4 // _pad4(Dv))
    group = Hq // Hkv
    heads = max(h for h in range(1, min(group, max_rows) + 1) if group % h == 0)
    groups = (Hq // heads) * B
    fitting = [
        n
        for n in range(1, min(Tq, max_rows // heads) + 1)
        if math.ceil(Tq / n) * groups >= FILL_WORKGROUPS
    ]
    keys = min(MAX_KEYS, 1 << (TILE_FLOATS // widest).bit_length() - 1)
    queries = max(fitting, default=1)
    # Too few workgroups to fill the GPU, each walking many key blocks one after another
    # (decode): split the keys over more workgroups, at the price of a combining dispatch.
    launched = math.ceil(Tq / queries) * groups
    blocks = math.ceil(Tk / keys)
    splits = 1
    if launched < FILL_WORKGROUPS // 2 and blocks >= SPLIT_BLOCKS:
        splits = min(blocks, FILL_WORKGROUPS // launched)
    return RowsLayout(heads, queries, keys, splits)


def _tile_element(n: int, dp: int) -> str:
    """WGSL setting key and d of element tid + 256 n of a [keys, dp] block."""
    if WG % dp == 0:  # the same d for every n: one division, shared by the unrolled copies
        return f"let key = tid / {dp}u + {n * WG // dp}u; let d = tid % {dp}u;"
    return f"let e = tid + {n * WG}u; let key = e / {dp}u; let d = e % {dp}u;"


def _tile_loads(reg: str, x: _Operand, row0: str, keys: int, dim: int) -> str:
    """reg[n] = x[b, hk, row0 + key, d] for element tid + 256 n of the [keys, dim padded to 4]
    block (0 past the head dim and from key `hi` on): consecutive invocations, consecutive
    elements."""
    dp = _pad4(dim)
    lines = []
    for n in range(math.ceil(keys * dp / WG)):
        guard = [f"key < {keys}u"] if (n + 1) * WG > keys * dp else []
        guard += [f"d < {dim}u"] if dp != dim else []
        guard.append("i32(kk) < hi")
        lines.append(
            f"    {{ {_tile_element(n, dp)} let kk = {row0} + key;\n"
            f"      {reg}[{n}] = 0.0;\n"
            f"      if ({' && '.join(guard)}) {{ {reg}[{n}] = {x.load('b', 'hk', 'kk', 'd')}; }} }}\n"
        )
    return "".join(lines)


def _tile_stores(reg: str, keys: int, dim: int, stride: int) -> str:
    """tile[key * stride + d / 4][d % 4] = reg[n]: the block `_tile_loads` read, staged."""
    dp = _pad4(dim)
    lines = []
    for n in range(math.ceil(keys * dp / WG)):
        store = f"tile[key * {stride}u + d / 4u][d % 4u] = {reg}[{n}];"
        if (n + 1) * WG > keys * dp:
            store = f"if (key < {keys}u) {{ {store} }}"
        lines.append(f"    {{ {_tile_element(n, dp)} {store} }}\n")
    return "".join(lines)


@dataclass(frozen=True)
class _Shape:
    """Compile-time sizes of one few-rows kernel (see the module docstring)."""

    B: int
    Hq: int
    Tq: int
    Tk: int
    D: int
    Dv: int
    layout: RowsLayout
    attrs: dict = dataclasses.field(default_factory=dict, hash=False, compare=False)

    @property
    def d4(self) -> int:  # vec4s per q or k row
        return _pad4(self.D) // 4

    @property
    def v4(self) -> int:  # vec4s per v or output row
        return _pad4(self.Dv) // 4

    @property
    def k_stride(self) -> int:  # odd, so the vec4 reads of 8 neighbouring keys miss no bank
        return self.d4 + 1 - self.d4 % 2

    @property
    def row_groups(self) -> int:  # score invocations: key tid % keys, rows tid / keys + n groups
        return WG // self.layout.keys

    @property
    def slots(self) -> int:  # rows per score invocation
        return math.ceil(self.layout.rows / self.row_groups)

    @property
    def subsets(self) -> int:  # p V invocations: (value column, row, key subset of 4 or more)
        fit = 1 << (WG // (self.v4 * self.layout.rows)).bit_length() - 1
        return min(fit, self.layout.keys // 4)

    @property
    def workers(self) -> int:
        return self.v4 * self.layout.rows * self.subsets

    @property
    def ss_stride(self) -> int:  # vec4s per row of logits or p, one more than the keys need
        return self.layout.keys // 4 + 1

    @property
    def tile_len(self) -> int:  # a K block, a V block, or the partial outputs
        return max(self.layout.keys * max(self.k_stride, self.v4), self.workers)


def _head(s: _Shape, r: str) -> str:
    return f"(hb + {r} / {s.layout.queries}u)"


def _query(s: _Shape, r: str) -> str:
    return f"(q0 + {r} % {s.layout.queries}u)"


def _stage_queries(s: _Shape, q: _Operand) -> str:
    """sq[r * d4 + e] = vec4 e of query row r (0 past Tq and the head dim)."""
    return f"""  for (var e = tid; e < {s.layout.rows * s.d4}u; e += {WG}u) {{
    let r = e / {s.d4}u; let i = {_query(s, "r")}; let d0 = (e % {s.d4}u) * 4u;
    var x = vec4<f32>(0.0);
    for (var t = 0u; t < 4u; t++) {{
      let d = d0 + t;
      if (i < {s.Tq}u && d < {s.D}u) {{ x[t] = {q.load("b", _head(s, "r"), "i", "d")}; }}
    }}
    sq[e] = x;
  }}
"""


def _score_rows(s: _Shape, mask: _Operand | None) -> str:
    """Loop invariants of the score invocation: its rows r<n> (clamped: rc<n>), and the mask
    values of its first block in mk<n>."""
    lines = [f"  let j = tid % {s.layout.keys}u; let rg = tid / {s.layout.keys}u;\n"]
    for n in range(s.slots):
        lines.append(
            f"  let r{n} = rg + {s.row_groups * n}u; let rc{n} = min(r{n}, {s.layout.rows - 1}u);\n"
        )
        if mask is not None:
            lines.append(f"  var mk{n} = {_mask_load(s, mask, n, 'lo')};\n")
    return "".join(lines)


def _mask_load(s: _Shape, mask: _Operand, n: int, k0: str) -> str:
    """The mask of row slot n against key k0 + j (clamped into the mask)."""
    key = f"u32(min({k0} + i32(j), {s.Tk - 1}))"
    row = f"min({_query(s, f'rc{n}')}, {s.Tq - 1}u)"
    return mask.load("b", _head(s, f"rc{n}"), row, key)


def _scores(s: _Shape, attrs, mask: _Operand | None) -> str:
    """x<n>: the logits of row slots n against key k0 + j, also stored in ss; the next block's
    mask values requested."""
    lines = []
    for n in range(s.slots):
        lines.append(f"    var acc{n} = 0.0;\n")
        if mask is not None:
            lines.append(
                f"    let mask{n} = mk{n}; mk{n} = {_mask_load(s, mask, n, f'k0i + {s.layout.keys}')};\n"
            )
    lines.append(
        f"    for (var e = 0u; e < {s.d4}u; e++) {{\n"
        f"      let kv = tile[j * {s.k_stride}u + e];\n"
        + "".join(f"      acc{n} += dot(kv, sq[rc{n} * {s.d4}u + e]);\n" for n in range(s.slots))
        + "    }\n"
    )
    for n in range(s.slots):
        lines.append(
            _logits(
                attrs,
                f"mask{n}" if mask is not None else None,
                "b",
                "",
                f"i32({_query(s, f'r{n}')})",
                "k0i + i32(j)",
                s.Tq,
                s.Tk,
                f"acc{n}",
                f"x{n}",
                width=1,
            )
        )
        lines.append(
            f"    if (r{n} < {s.layout.rows}u) {{ ss[r{n} * {s.ss_stride}u + j / 4u][j % 4u] = x{n}; }}\n"
        )
    return "".join(lines)


def _block(s: _Shape, attrs, k: _Operand, v: _Operand, mask: _Operand | None) -> str:
    """One key block k0..k0 + keys - 1: scores, softmax statistics, p V."""
    R, KB, ss = s.layout.rows, s.layout.keys, s.ss_stride
    per_subset = KB // s.subsets
    return (
        _tile_stores("kr", KB, s.D, s.k_stride)
        + "    workgroupBarrier();\n"
        + _tile_loads("kr", k, f"k0 + {KB}u", KB, s.D)
        + _scores(s, attrs, mask)
        + "    workgroupBarrier();\n"
        f"    if (tid < {R}u) {{\n"
        f"      var m = {NEG_MAX};\n"
        f"      for (var e = 0u; e < {KB // 4}u; e++) {{\n"
        f"        let x = ss[tid * {ss}u + e]; m = max(m, max(max(x.x, x.y), max(x.z, x.w)));\n"
        "      }\n"
        "      let before = row_max[tid]; let after = max(before, m);\n"
        "      row_scale[tid] = exp(before - after); row_max[tid] = after;\n    }\n"
        + _tile_stores("vr", KB, s.Dv, s.v4)
        + "    workgroupBarrier();\n"
        + _tile_loads("vr", v, f"k0 + {KB}u", KB, s.Dv)
        + "".join(
            f"    if (r{n} < {R}u) {{ ss[r{n} * {ss}u + j / 4u][j % 4u] = exp(x{n} - row_max[r{n}]); }}\n"
            for n in range(s.slots)
        )
        + "    workgroupBarrier();\n"
        f"    if (tid < {s.workers}u) {{\n"
        "      o *= row_scale[pr]; l *= row_scale[pr];\n"
        f"      for (var n = 0u; n < {per_subset // 4}u; n++) {{\n"
        f"        let j4 = ks * {per_subset // 4}u + n; let p = ss[pr * {ss}u + j4];\n"
        f"        let vj = j4 * {4 * s.v4}u + c;\n"
        f"        o += p.x * tile[vj] + p.y * tile[vj + {s.v4}u] + p.z * tile[vj + {2 * s.v4}u] "
        f"+ p.w * tile[vj + {3 * s.v4}u];\n"
        "        l += p.x + p.y + p.z + p.w;\n"
        "      }\n    }\n    workgroupBarrier();\n"
    )


def _row_totals(s: _Shape) -> str:
    """Add the key subsets' partial sums: opens a block where invocation (row r, vec4 column
    c) of a real row holds its unnormalized output `acc` and softmax sum `total`."""
    R, Tq, v4, subsets = s.layout.rows, s.Tq, s.v4, s.subsets
    return (
        f"  if (tid < {s.workers}u) {{\n"
        f"    tile[(pr * {subsets}u + ks) * {v4}u + c] = o;\n"
        f"    if (c == 0u) {{ row_sums[pr * {subsets}u + ks] = l; }}\n"
        "  }\n  workgroupBarrier();\n"
        f"  let r = tid / {v4}u; let i = {_query(s, 'r')};\n"
        f"  if (r < {R}u && i < {Tq}u) {{\n"
        "    var acc = vec4<f32>(0.0); var total = 0.0;\n"
        f"    for (var e = 0u; e < {subsets}u; e++) {{\n"
        f"      acc += tile[(r * {subsets}u + e) * {v4}u + c]; total += row_sums[r * {subsets}u + e];\n"
        "    }\n"
    )


def _finish(s: _Shape, out: str) -> str:
    """Write each row's output and log-sum-exp."""
    Dv, Tq, Hq = s.Dv, s.Tq, s.Hq
    return (
        _row_totals(s) + "    acc *= select(0.0, 1.0 / total, total > 0.0);\n"
        f"    let row = (b * {Hq}u + {_head(s, 'r')}) * {Tq}u + i;\n"
        f"    let orow = {_output_row(s.attrs, Hq, Tq, 'b', _head(s, 'r'), 'i')};\n"
        "    for (var t = 0u; t < 4u; t++) {\n"
        "      let d = 4u * c + t;\n"
        f"      if (d < {Dv}u) {{ {out}[orow * {Dv}u + d] = acc[t]; }}\n"
        "    }\n"
        f"    if (c == 0u) {{\n"
        f"      {out}[{s.B * Hq * Tq * Dv}u + row] = "
        f"select({POS_INF}, row_max[r] + log(total), total > 0.0);\n"
        "    }\n  }\n"
    )


def _finish_partial(s: _Shape, out: str, first: int) -> str:
    """Write each row's unnormalized output, running max and sum into the scratch buffers
    (bindings `first`, `first` + 1) at this split's place."""
    rows = s.B * s.Hq * s.Tq
    return (
        _row_totals(s)
        + f"    let row = split * {rows}u + (b * {s.Hq}u + {_head(s, 'r')}) * {s.Tq}u + i;\n"
        f"    part{first}[row * {s.v4}u + c] = acc;\n"
        f"    if (c == 0u) {{ part{first + 1}[row] = vec2<f32>(row_max[r], total); }}\n"
        "  }\n"
        # The output is the combining dispatch's to write; naming it keeps its binding in the
        # pipeline's layout (a binding no statement names is left out).
        f"  if (tid > {WG}u) {{ {out}[0] = 0.0; }}\n"
    )


def _combine(s: _Shape, out: str, splits: int) -> str:
    """A dispatch merging the splits' partial softmaxes: invocation (row, vec4 column)."""
    rows, v4, Dv = s.B * s.Hq * s.Tq, s.v4, s.Dv
    return f"""@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {{
  let e = wid.x * 64u + lid;
  if (e >= {rows * v4}u) {{ return; }}
  let row = e / {v4}u; let c = e % {v4}u;
  var m = {NEG_MAX};
  for (var t = 0u; t < {splits}u; t++) {{ m = max(m, part2[t * {rows}u + row].x); }}
  var acc = vec4<f32>(0.0); var total = 0.0;
  for (var t = 0u; t < {splits}u; t++) {{
    let ml = part2[t * {rows}u + row];
    let w = exp(ml.x - m);
    acc += w * part1[(t * {rows}u + row) * {v4}u + c]; total += w * ml.y;
  }}
  acc *= select(0.0, 1.0 / total, total > 0.0);
  let orow = {_output_row(s.attrs, s.Hq, s.Tq, f"(row / {s.Hq * s.Tq}u)", f"((row / {s.Tq}u) % {s.Hq}u)", f"(row % {s.Tq}u)")};
  for (var t = 0u; t < 4u; t++) {{
    let d = 4u * c + t;
    if (d < {Dv}u) {{ {out}[orow * {Dv}u + d] = acc[t]; }}
  }}
  if (c == 0u) {{ {out}[{rows * Dv}u + row] = select({POS_INF}, m + log(total), total > 0.0); }}
}}
"""


def rows_forward(plan: Plan, kernel: Kernel, layout: RowsLayout) -> KernelSource:
    """The few-rows forward (module docstring) for the attention node of `kernel`."""
    node, dims = _inputs(plan, kernel)
    B, Hq, Hkv, Tq, Tk, D, Dv = dims
    if node.type.dtype != "f32":  # the combining dispatch writes f32
        layout = dataclasses.replace(layout, splits=1)
    bind = _Bindings(plan, kernel.node)
    q, k, v, mask = forward_operands(plan, bind, node, dims)
    s = _Shape(B, Hq, Tq, Tk, D, Dv, layout, node.attrs)
    R, KB = layout.rows, layout.keys
    nqb = math.ceil(Tq / layout.queries)
    splits = layout.splits
    chunk = math.ceil(math.ceil(Tk / KB) / splits) * KB  # keys per split, whole blocks
    # Blocks stay aligned to the split's start, so none crosses into the next split; keys of
    # a block outside [lo, hi) are masked by the logits' own causal and window conditions.
    split_range = (
        f"  let split = wid.x % {splits}u; let s0 = i32(split * {chunk}u);\n"
        f"  lo = select(s0, lo - (lo - s0) % {KB}i, lo > s0); hi = min(hi, s0 + {chunk}i);\n"
        if splits > 1
        else ""
    )
    body = (
        f"@compute @workgroup_size({WG})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {\n"
        f"  let q0 = ({nqb - 1}u - wid.x / {splits}u) * {layout.queries}u;  // longest causal rows first\n"
        f"  let hb = wid.y * {layout.heads}u; let b = wid.z; let hk = hb / {Hq // Hkv}u;\n"
        + _key_range(node.attrs, Tq, Tk, layout.queries)
        + split_range
        + (
            _visible_keys(mask, "hb", layout.heads, "q0", layout.queries, Tq, Tk, KB)
            if mask
            else ""
        )
        + _stage_queries(s, q)
        + f"  if (tid < {R}u) {{ row_max[tid] = {NEG_MAX}; }}\n"
        f"  var kr: array<f32, {math.ceil(KB * s.d4 * 4 / WG)}>;\n"
        f"  var vr: array<f32, {math.ceil(KB * s.v4 * 4 / WG)}>;\n"
        + _tile_loads("kr", k, "u32(lo)", KB, D)
        + _tile_loads("vr", v, "u32(lo)", KB, Dv)
        + _score_rows(s, mask)
        # p V invocation: value column c, row pr, key subset ks.
        + f"  let c = tid % {s.v4}u; let pr = (tid / {s.v4}u) % {R}u; let ks = tid / {s.v4 * R}u;\n"
        "  var o = vec4<f32>(0.0);\n  var l = 0.0;\n"
        f"  for (var k0i = lo; k0i < hi; k0i += {KB}i) {{\n"
        "    let k0 = u32(k0i);\n"
        + _block(s, node.attrs, k, v, mask)
        + "  }\n"
        + (
            _finish(s, f"buf{bind.out_buffer}")
            if splits == 1
            else _finish_partial(s, f"buf{bind.out_buffer}", FIRST_PART)
        )
        + "}\n"
    )
    body += q.function
    shared = (
        f"var<workgroup> tile: array<vec4<f32>, {s.tile_len}>;\n"
        f"var<workgroup> sq: array<vec4<f32>, {R * s.d4}>;\n"
        f"var<workgroup> ss: array<vec4<f32>, {R * s.ss_stride}>;\n"
        f"var<workgroup> row_sums: array<f32, {R * s.subsets}>;\n"
        f"var<workgroup> row_max: array<f32, {R}>;\n"
        f"var<workgroup> row_scale: array<f32, {R}>;\n"
    ) + (VISIBLE_KEYS_SHARED if mask else "")
    grid = (nqb * splits, Hq // layout.heads, B)
    label = f"attention%{node.id}"
    if splits == 1:
        return KernelSource(_assemble(bind, body, shared), bind.order, grid, label)
    # The partial results live in two scratch buffers, bound after the kernel's own buffers
    # (whose count is only known now); the combining dispatch binds the output, then them.
    first = len(bind.order)
    body = body.replace(f"part{FIRST_PART}", f"part{first}").replace(
        f"part{FIRST_PART + 1}", f"part{first + 1}"
    )
    shared += (
        f"@group(0) @binding({first}) var<storage, read_write> part{first}: array<vec4<f32>>;\n"
        f"@group(0) @binding({first + 1}) var<storage, read_write> part{first + 1}: "
        "array<vec2<f32>>;\n"
    )
    rows = B * Hq * Tq
    out = f"buf{bind.out_buffer}"
    combine = (
        f"@group(0) @binding(0) var<storage, read_write> {out}: array<f32>;\n"
        "@group(0) @binding(1) var<storage, read_write> part1: array<vec4<f32>>;\n"
        "@group(0) @binding(2) var<storage, read_write> part2: array<vec2<f32>>;\n"
        + _combine(s, out, splits)
    )
    combine = combine.replace("@compute", prelude_for(combine) + "\n@compute", 1)
    after = KernelSource(
        combine, [bind.out_buffer], (math.ceil(rows * s.v4 / 64), 1, 1), f"{label}+combine"
    )
    scratch = (splits * rows * s.v4 * 16, splits * rows * 8)
    source = KernelSource(_assemble(bind, body, shared), bind.order, grid, label, scratch)
    source.after.append(after)
    return source


@archetype("attention")
def attention_forward(plan: Plan, kernel: Kernel) -> KernelSource:
    """Where `forward_layout` picks the few-rows kernel: the team kernel of
    `attention_team.py` for short prefill chunks (`team_layout`), else the few-rows kernel.
    Elsewhere the 64-query block kernel, on matrix units where they work and the precision
    allows (`attention_units`)."""
    node, dims = _inputs(plan, kernel)
    layout = forward_layout(*dims)
    if layout is not None:
        team = attention_team.team_layout(*dims)
        if team is not None:
            return attention_team.team_forward(plan, kernel, team)
        return rows_forward(plan, kernel, layout)
    syntax = plan.options.get("matrix_unit")
    f16 = plan.graph.nodes[node.inputs[0]].type.dtype == "f16"
    high = plan.options.get("matmul_precision") == "high" and plan.options.get("f32_on_units")
    if syntax and (f16 or high) and attention_units.fits(plan, dims[5], dims[6]):
        return attention_units.units_forward(plan, kernel, syntax)
    return blocks_forward(plan, kernel)
