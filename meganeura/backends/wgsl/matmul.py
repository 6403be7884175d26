"""Matmul kernels: batched, strided operands (transposes and broadcasts read in place), with
the pointwise DAG that reads the product fused into the store (an epilogue). What every
variant shares is in matmul_operands; the tiled SIMT kernels are in matmul_simt.

Variants, chosen per kernel:
- GEMV, for a few rows (M <= GEMV_ROWS): each weight is read once, by invocations that read
  it contiguously (vec4 loads when the layout allows) and reduce in workgroup memory.
  Decoding, small-batch training and their backward passes land here. Few columns make
  narrow workgroups (enough of them for every SM), and a short row is read in straight-line
  code: a decoding step's small products are one memory round trip each.
- matrix units (subgroup matrices, f16 operands, f32 accumulation), when the executor's
  start-up check found them correct: f16 operands that tile exactly are loaded by the
  matrix loads themselves (73 TFLOP/s at 4096^3 on an H200). Operands staged through
  workgroup memory as f16 (any shape, and f32 operands under matmul_precision="high") are
  used only where the executor measured that staging beats the f32 kernels: on an H200
  through Dawn it did not (9.5 TFLOP/s against 32).
- tiled SIMT f32 otherwise: 128 x 128 tiles with 8 x 8 outputs per invocation for large
  products (32 TFLOP/s at 4096^3 on an H200); for the rest, tiles from 64 x 64 down to
  16 x 16 chosen by the number of workgroups they make, k split inside the workgroup.

rms_norm_matmul and layer_norm_matmul run through the same variants (but never the matrix
loads of f16 operands, which cannot normalize): each computes the statistics of its rows
first and normalizes A as it loads it (the norm prologue, see norm_prologue).
"""

from __future__ import annotations

import math

from meganeura.backends.wgsl.kernels import KernelSource, archetype
from meganeura.backends.wgsl.matmul_operands import Matmul, Operand, kernel_source
from meganeura.backends.wgsl.matmul_simt import tiled
from meganeura.lower.plan import Kernel, Plan

GEMV_ROWS = 8
GEMV_UNROLL = 4  # weight loads in flight per invocation, in a loop over a long row
GEMV_PIECES = 16  # rows of up to this many pieces per invocation are read without a loop
GEMV_WORKGROUPS = 256  # two workgroups for each SM of a large GPU (132 on an H200)
# Matrix-unit tiles: one subgroup of 32 per workgroup (subgroup-matrix offsets must be
# uniform), computing a grid of 16 x 16 result matrices (rows, columns) over k steps of MU_BK.
MU_TILES = (4, 4)
MU_BK = 32
MU_PAD = 8  # f16 elements added to each staged row: fewer bank conflicts, rows stay 16-byte aligned
MU_DIRECT_F16 = True  # f16 operands that tile exactly are read by the matrix loads themselves
GEMV_COLUMN_LANES = 2  # vec4 lanes per weight row in the column GEMV: 32-byte pieces
MATRIX_UNIT_SYNTAXES = ("load_layout", "load_flag")


@archetype("matmul")
def matmul(plan: Plan, kernel: Kernel) -> KernelSource:
    mm = Matmul(plan, kernel)
    syntax = plan.options.get("matrix_unit")
    if mm.M <= GEMV_ROWS:
        if mm.b.s_row == 1:
            return _gemv_contiguous_k(mm)
        return _gemv_columns(mm)
    # A norm prologue normalizes A as it loads it: never by the matrix loads themselves.
    if syntax and MU_DIRECT_F16 and mm.prologue is None and _direct_operands(mm):
        return matrix_unit_direct(mm, syntax)
    staged = plan.options.get("staged_matrix_units")
    if syntax and staged and (mm.dtype == "f16" or plan.options.get("matmul_precision") == "high"):
        return matrix_unit_kernel(mm, syntax)
    return tiled(mm)


# -- GEMV -----------------------------------------------------------------------------------


def _gemv_teams(N: int, nbatch: int, widths=(8, 4, 2)) -> int:
    """Output columns per workgroup: the most that still make GEMV_WORKGROUPS workgroups
    (else the fewest), so a short GEMV reaches every SM and a long one keeps large groups."""
    return next((w for w in widths if math.ceil(N / w) * nbatch >= GEMV_WORKGROUPS), widths[-1])


def _k_pieces(step: int, K: int, first: str, piece) -> str:
    """Statements running `piece(k, name)` at k = first, first + step, ... < K. Up to
    GEMV_PIECES pieces are written out in straight-line code, the loads of every whole piece
    first: one memory round trip, whatever the compiler makes of loops. Longer rows loop,
    GEMV_UNROLL pieces at a time."""
    pieces = math.ceil(K / step)
    if pieces > GEMV_PIECES:
        lets = "".join(f"      let k{u} = k + {u * step}u;\n" for u in range(GEMV_UNROLL))
        main = lets + "".join(
            load + use for load, use in (piece(f"k{u}", f"w{u}") for u in range(GEMV_UNROLL))
        )
        last = (GEMV_UNROLL - 1) * step
        load, use = piece("k", "w")
        return (
            f"    var k = {first};\n"
            f"    for (; k + {last}u < {K}u; k += {GEMV_UNROLL * step}u) {{\n{main}    }}\n"
            f"    for (; k < {K}u; k += {step}u) {{\n{load}{use}    }}\n"
        )
    whole = K // step  # pieces every invocation reads; the rest may run past K
    lets = "".join(f"    let k{p} = {first} + {p * step}u;\n" for p in range(pieces))
    parts = [piece(f"k{p}", f"w{p}") for p in range(pieces)]
    loads = "".join(load for load, _ in parts[:whole])
    uses = "".join(use for _, use in parts[:whole])
    tail = "".join(
        f"    if (k{p} < {K}u) {{\n{load}{use}    }}\n"
        for p, (load, use) in enumerate(parts)
        if p >= whole
    )
    return lets + loads + uses + tail


def _gemv_contiguous_k(mm: Matmul) -> KernelSource:
    """Weights contiguous along k (x @ W^T with W [N, K], nn.Linear's layout): a team of 32
    invocations per output column reads its weight row in 16-byte pieces, and the teams of a
    workgroup reduce their sums in workgroup memory."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    # A computed x is evaluated element by element, the weights still read in vec4s.
    vec = K % 4 == 0 and mm.use_vec4(b, False) and (a.computed or mm.use_vec4(a, True))
    if vec:
        mm.bind.vector.add(mm.plan.buffer_of[b.base])
        if not a.computed:
            mm.bind.vector.add(mm.plan.buffer_of[a.base])
    step = 128 if vec else 32
    teams = _gemv_teams(N, mm.nbatch)
    size = 32 * teams

    def piece(k: str, w: str) -> tuple[str, str]:
        if vec:
            load = f"      let {w} = vec4<f32>({b.buf}[(brow + {k}) / 4u]);\n"
            x = f"vec4<f32>({a.buf}[(a0 + {{}}u + {k}) / 4u])"
            if a.computed:
                x = (
                    "vec4<f32>("
                    + ", ".join(a.at(f"a0 + {{0}}u + {k} + {j}u") for j in range(4))
                    + ")"
                )
            uses = [
                f"      acc{m} += dot({mm.load_a(x.format(m * a.s_row), f'{m}u', k, True)}, {w});"
                for m in range(M)
            ]
        else:
            load = f"      let {w} = f32({b.buf}[brow + {k} * {b.s_row}u]);\n"
            x = a.at(f"a0 + {{}}u + {k} * {a.s_col}u")
            uses = [
                f"      acc{m} += {mm.load_a(x.format(m * a.s_row), f'{m}u', k)} * {w};"
                for m in range(M)
            ]
        return load, "\n".join(uses) + "\n"

    reduce_rows = "".join(f"  red[{m * size}u + tid] = acc{m};\n" for m in range(M))
    tree = "".join(
        f"        red[{m * size}u + tid] += red[{m * size}u + tid + s];\n" for m in range(M)
    )
    body = f"""@compute @workgroup_size({size})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {{
  let team = tid / 32u; let lane = tid % 32u;
  let n = wid.x * {teams}u + team; let bz = wid.z;
  let a0 = {a.origin(mm.batch)};
  let brow = {b.origin(mm.batch)} + min(n, {N - 1}u) * {b.s_col}u;
{mm.row_statistics(M, "0u", size, "tid")}{"".join(f"  var acc{m} = 0.0f;" + chr(10) for m in range(M))}  if (n < {N}u) {{
{_k_pieces(step, K, f"lane * {step // 32}u", piece)}  }}
{reduce_rows}  workgroupBarrier();
  for (var s = 16u; s > 0u; s = s >> 1u) {{
    if (lane < s) {{
{tree}    }}
    workgroupBarrier();
  }}
  if (lane < {M}u && n < {N}u) {{
    let acc = red[lane * {size}u + team * 32u];
    let idx = bz * {M * N}u + lane * {N}u + n;
{mm.store("acc", "idx", "    ")}  }}
}}
"""
    shared = f"var<workgroup> red: array<f32, {size * M}>;\n"
    return kernel_source(mm, body, (math.ceil(N / teams), 1, mm.nbatch), shared)


def _gemv_columns(mm: Matmul) -> KernelSource:
    """Any other weight layout (W [K, N] rows, as in x @ W or dY @ W): neighbouring
    invocations read neighbouring columns (four at a time where rows are 16-byte aligned),
    and each workgroup splits k among many slices, reduced in workgroup memory."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    vec = N % 4 == 0 and mm.use_vec4(b, True)
    if vec:
        mm.bind.vector.add(mm.plan.buffer_of[b.base])
    width = 4 if vec else 1
    # 32 bytes of a weight row per workgroup (one memory sector), or 16 where that leaves
    # too few workgroups.
    lanes = 8
    if vec:
        lanes = _gemv_teams(N, mm.nbatch, (4 * GEMV_COLUMN_LANES, 4)) // 4
    slices = 256 // lanes
    cols = lanes * width
    vt = "vec4<f32>" if vec else "f32"

    def piece(k: str, w: str) -> tuple[str, str]:
        if vec:
            load = f"      let {w} = vec4<f32>({b.buf}[(b0 + {k} * {b.s_row}u) / 4u]);\n"
        else:
            load = f"      let {w} = f32({b.buf}[b0 + {k} * {b.s_row}u]);\n"
        x = a.at(f"a0 + {{}}u + {k} * {a.s_col}u")
        uses = "".join(
            f"      acc{m} += {mm.load_a(x.format(m * a.s_row), f'{m}u', k)} * {w};\n"
            for m in range(M)
        )
        return load, uses

    reductions = []
    for m in range(M):
        reductions.append(
            f"""  red[tid] = acc{m};
  workgroupBarrier();
  for (var s = {slices // 2}u; s > 0u; s = s >> 1u) {{
    if (ks < s) {{ red[tid] += red[tid + s * {lanes}u]; }}
    workgroupBarrier();
  }}
  if (ks == 0u) {{
    let total = red[lane];
    for (var c = 0u; c < {width}u; c++) {{
      let n = n0 + c;
      if (n < {N}u) {{
        let acc = {"total[c]" if vec else "total"};
        let idx = bz * {M * N}u + {m * N}u + n;
{mm.store("acc", "idx", "        ")}      }}
    }}
  }}
  workgroupBarrier();
"""
        )
    body = f"""@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {{
  let lane = tid % {lanes}u; let ks = tid / {lanes}u;
  let n0 = wid.x * {cols}u + lane * {width}u; let bz = wid.z;
  let a0 = {a.origin(mm.batch)};
  let b0 = {b.origin(mm.batch)} + min(n0, {N - width}u) * {b.s_col}u;
{mm.row_statistics(M, "0u", 256, "tid")}{"".join(f"  var acc{m} = {vt}(0.0);" + chr(10) for m in range(M))}  if (n0 < {N}u) {{
{_k_pieces(slices, K, "ks", piece)}  }}
{"".join(reductions)}}}
"""
    shared = f"var<workgroup> red: array<{vt}, 256>;\n"
    return kernel_source(mm, body, (math.ceil(N / cols), 1, mm.nbatch), shared)


# -- matrix units ------------------------------------------------------------------------------


def _matrix_load(
    syntax: str, kind: str, ptr: str, offset: str, stride: int, col_major: bool = False
) -> str:
    ty = f"subgroup_matrix_{kind}<f16, 16, 16>"
    if syntax == "load_flag":
        return f"subgroupMatrixLoad<{ty}>(&{ptr}, {offset}, {str(col_major).lower()}, {stride}u)"
    layout = "col_major" if col_major else "row_major"
    return f"subgroupMatrixLoad<{ty}, {layout}>(&{ptr}, {offset}, {stride}u)"


def _matrix_store(syntax: str, ptr: str, offset: str, value: str, stride: int) -> str:
    if syntax == "load_flag":
        return f"subgroupMatrixStore(&{ptr}, {offset}, {value}, false, {stride}u)"
    return f"subgroupMatrixStore<row_major>(&{ptr}, {offset}, {value}, {stride}u)"


def _direct_operands(mm: Matmul) -> bool:
    """f16 operands whose 16 x 16 blocks can be loaded straight from their buffers: whole
    tiles only, one unit stride each, other strides and origins 16-byte aligned."""
    tr, tc = MU_TILES
    if mm.dtype != "f16" or mm.M % (16 * tr) or mm.N % (16 * tc) or mm.K % 16:
        return False
    for x in (mm.a, mm.b):
        if x.computed or 1 not in (x.s_row, x.s_col):
            return False
        other = x.s_col if x.s_row == 1 else x.s_row
        if any(st % 8 for st in (other, x.offset, *x.batch_strides)):
            return False
    return True


def _matrix_unit_store(mm: Matmul, syntax: str, tr: int, tc: int) -> str:
    """Each result matrix through the 16 x 16 scratch tile into the output (or epilogue)."""
    M, N = mm.M, mm.N
    stores = []
    for i in range(tr):
        for j in range(tc):
            stores.append(
                f"""  {_matrix_store(syntax, "Cs", "0u", f"acc{i}_{j}", 16)};
  workgroupBarrier();
  for (var t = 0u; t < 8u; t++) {{
    let e = lane + t * 32u;
    let gm = m0 + {16 * i}u + e / 16u;
    let gn = n0 + {16 * j}u + e % 16u;
    if (gm < {M}u && gn < {N}u) {{
      let acc = Cs[e];
      let idx = bz * {M * N}u + gm * {N}u + gn;
{mm.store("acc", "idx", "      ")}    }}
  }}
  workgroupBarrier();
"""
            )
    return "".join(stores)


MATRIX_UNIT_HEADER = (
    "enable subgroups;\nenable chromium_experimental_subgroup_matrix;\n"
    "diagnostic(off, chromium_experimental.subgroup_matrix_uniformity);\n"
)


def _matrix_unit_entry(mm: Matmul, bm: int, bn: int) -> str:
    """The entry point of a one-subgroup matrix-unit kernel: its tile's origins."""
    return f"""@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {{
  let bz = wid.z;
  let a0 = {mm.a.origin(mm.batch)};
  let b0 = {mm.b.origin(mm.batch)};
  let m0 = wid.y * {bm}u;
  let n0 = wid.x * {bn}u;
"""


def _matrix_unit_accumulators(tr: int, tc: int) -> str:
    return "".join(
        f"  var acc{i}_{j} = subgroup_matrix_result<f32, 16, 16>();\n"
        for i in range(tr)
        for j in range(tc)
    )


def matrix_unit_direct(mm: Matmul, syntax: str) -> KernelSource:
    """One subgroup per workgroup, (tile rows x 16) x (tile cols x 16) outputs, each 16 x 16
    operand block loaded by the matrix load itself from the f16 buffers (row- or
    column-major as the operand lies); no staging, no barriers in the k loop."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    tr, tc = MU_TILES
    bm, bn = tr * 16, tc * 16
    a_cm, b_cm = a.s_row == 1 and a.s_col != 1, b.s_row == 1 and b.s_col != 1
    a_stride, b_stride = (a.s_col if a_cm else a.s_row), (b.s_col if b_cm else b.s_row)
    loads = []
    for i in range(tr):
        off = f"a0 + (m0 + {16 * i}u) * {a.s_row}u + k * {a.s_col}u"
        loads.append(f"    let l{i} = {_matrix_load(syntax, 'left', a.buf, off, a_stride, a_cm)};")
    for j in range(tc):
        off = f"b0 + k * {b.s_row}u + (n0 + {16 * j}u) * {b.s_col}u"
        loads.append(f"    let r{j} = {_matrix_load(syntax, 'right', b.buf, off, b_stride, b_cm)};")
    mmas = [
        f"    acc{i}_{j} = subgroupMatrixMultiplyAccumulate(l{i}, r{j}, acc{i}_{j});"
        for i in range(tr)
        for j in range(tc)
    ]
    body = f"""{_matrix_unit_entry(mm, bm, bn)}{_matrix_unit_accumulators(tr, tc)}  for (var k = 0u; k < {K}u; k += 16u) {{
{chr(10).join(loads)}
{chr(10).join(mmas)}
  }}
{_matrix_unit_store(mm, syntax, tr, tc)}}}
"""
    shared = "var<workgroup> Cs: array<f32, 256>;\n"
    grid = (N // bn, M // bm, mm.nbatch)
    return kernel_source(mm, body, grid, shared, MATRIX_UNIT_HEADER)


def _stage_f16(
    x: Operand,
    vec: bool,
    name: str,
    stride: int,
    rows: int,
    cols: int,
    row0: str,
    col0: str,
    row_limit: int,
    col_limit: int,
    origin: str,
    load=None,
) -> str:
    """Statements staging the rows x cols tile of x at (row0, col0) into the f16 array
    `name` ([row][col], row stride `stride`), zero outside (row_limit, col_limit). With
    `vec`, four elements along the contiguous direction per load; `load(value, row, col)`
    (scalar loads) rewrites each loaded value (a norm prologue)."""
    if not vec:
        value = x.at(f"{origin} + gr * {x.s_row}u + gc * {x.s_col}u")
        if load is not None:
            value = load(value, "r", "gc")
        fast_cols = x.s_col == 1
        index = (
            f"let r = e / {cols}u; let c = e % {cols}u;"
            if fast_cols
            else f"let r = e % {rows}u; let c = e / {rows}u;"
        )
        return f"""    for (var e = lane; e < {rows * cols}u; e += 32u) {{
      {index}
      let gr = {row0} + r; let gc = {col0} + c;
      var v = 0.0f;
      if (gr < {row_limit}u && gc < {col_limit}u) {{ v = {value}; }}
      {name}[r * {stride}u + c] = f16(v);
    }}
"""
    if x.s_col == 1:  # four columns per load
        index = f"let r = e / {cols // 4}u; let c = (e % {cols // 4}u) * 4u;"
        at = f"(({origin} + gr * {x.s_row}u + gc) / 4u)"
        places = [f"r * {stride}u + c + {i}u" for i in range(4)]
    else:  # four rows per load
        index = f"let c = e / {rows // 4}u; let r = (e % {rows // 4}u) * 4u;"
        at = f"(({origin} + gr + gc * {x.s_col}u) / 4u)"
        places = [f"(r + {i}u) * {stride}u + c" for i in range(4)]
    stores = " ".join(f"{name}[{p}] = f16(v.{ch});" for p, ch in zip(places, "xyzw", strict=True))
    return f"""    for (var e = lane; e < {rows * cols // 4}u; e += 32u) {{
      {index}
      let gr = {row0} + r; let gc = {col0} + c;
      var v = vec4<f32>(0.0);
      if (gr < {row_limit}u && gc < {col_limit}u) {{ v = vec4<f32>({x.buf}[{at}]); }}
      {stores}
    }}
"""


def matrix_unit_kernel(mm: Matmul, syntax: str) -> KernelSource:
    """One subgroup per workgroup computes a (tile rows x 16) x (tile cols x 16) output
    block. Operand tiles are staged in workgroup memory as f16 (16-byte loads where the
    layout allows); results pass through a 16 x 16 scratch tile so the store can
    bound-check and run the epilogue."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    tr, tc = MU_TILES
    bm, bn, bk = tr * 16, tc * 16, MU_BK
    AS, BS = bk + MU_PAD, bn + MU_PAD
    # op(B) is k x n; staged as [k][n] it is the tile of rows k and columns n.
    vec_a = (
        mm.prologue is None
        and K % 4 == 0
        and (M % 4 == 0 or a.s_col == 1)
        and mm.use_vec4(a, a.s_col == 1)
    )
    vec_b = (
        (N % 4 == 0 if b.s_col == 1 else K % 4 == 0)
        and (b.s_col == 1 or b.s_row == 1)
        and mm.use_vec4(b, b.s_col == 1)
    )
    for vec, x in ((vec_a, a), (vec_b, b)):
        if vec:
            mm.bind.vector.add(mm.plan.buffer_of[x.base])
    stage_a = _stage_f16(a, vec_a, "As", AS, bm, bk, "m0", "k0", M, K, "a0", mm.load_a)
    stage_b = _stage_f16(b, vec_b, "Bs", BS, bk, bn, "k0", "n0", K, N, "b0")
    mma = []
    for kk in range(0, bk, 16):
        mma.append("    {")
        for i in range(tr):
            offset = f"{16 * i * AS + kk}u"
            mma.append(f"      let l{i} = {_matrix_load(syntax, 'left', 'As', offset, AS)};")
        for j in range(tc):
            offset = f"{kk * BS + 16 * j}u"
            mma.append(f"      let r{j} = {_matrix_load(syntax, 'right', 'Bs', offset, BS)};")
        for i in range(tr):
            for j in range(tc):
                mma.append(
                    f"      acc{i}_{j} = subgroupMatrixMultiplyAccumulate(l{i}, r{j}, acc{i}_{j});"
                )
        mma.append("    }")
    body = f"""{_matrix_unit_entry(mm, bm, bn)}{mm.row_statistics(bm, "m0", 32, "lane")}{_matrix_unit_accumulators(tr, tc)}  for (var k0 = 0u; k0 < {K}u; k0 += {bk}u) {{
{stage_a}{stage_b}    workgroupBarrier();
{chr(10).join(mma)}
    workgroupBarrier();
  }}
{_matrix_unit_store(mm, syntax, tr, tc)}}}
"""
    shared = (
        f"var<workgroup> As: array<f16, {bm * AS}>;\n"
        f"var<workgroup> Bs: array<f16, {bk * BS}>;\n"
        "var<workgroup> Cs: array<f32, 256>;\n"
    )
    grid = (math.ceil(N / bn), math.ceil(M / bm), mm.nbatch)
    return kernel_source(mm, body, grid, shared, MATRIX_UNIT_HEADER)
