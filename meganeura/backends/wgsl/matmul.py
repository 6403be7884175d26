"""Matmul kernels: batched, strided operands (transposes and broadcasts read in place), with
the pointwise DAG that reads the product fused into the store (an epilogue). What every
variant shares is in matmul_operands; the tiled SIMT kernels are in matmul_simt.

Variants, chosen per kernel:
- GEMV, for a few rows (M <= GEMV_ROWS): each weight is read once, by invocations that read
  it contiguously (vec4 loads when the layout allows) and reduce in workgroup memory
  (through subgroup sums where the executor's check found them right, see kernels.py).
  Decoding, small-batch training and their backward passes land here. Few columns make
  narrow workgroups (enough of them for every SM), and a short row is read in straight-line
  code: a decoding step's small products are one memory round trip each.
- matrix units (subgroup matrices, f16 operands, f32 accumulation; see matmul_units), when
  the executor's start-up check found them correct: for f16 operands, and for f32 ones
  under matmul_precision="high" where the executor measured them faster than the f32
  kernels (they are rounded to f16 as they are staged).
- tiled SIMT f32 otherwise: 128 x 128 tiles with 8 x 8 outputs per invocation for large
  products (32 TFLOP/s at 4096^3 on an H200); for the rest, tiles from 64 x 64 down to
  16 x 16 chosen by the number of workgroups they make, k split inside the workgroup.
- direct products (matmul_direct), for x @ W^T products that would take small split
  tiles (a prompt's q/k/v, o and down projections): no staging, each group of lanes
  reading its rows along k straight from storage.

rms_norm_matmul and layer_norm_matmul run through the same variants: each computes the
statistics of its rows first and normalizes A as it loads it (the norm prologue, see
norm_prologue).
"""

from __future__ import annotations

import math

from meganeura.backends.wgsl import matmul_direct
from meganeura.backends.wgsl.kernels import (
    SUBGROUP_BUILTINS,
    SUBGROUPS_ENABLE,
    KernelSource,
    archetype,
)
from meganeura.backends.wgsl.matmul_operands import Matmul, kernel_source
from meganeura.backends.wgsl.matmul_simt import splits, tiled
from meganeura.backends.wgsl.matmul_units import WORKGROUP_STORAGE, matrix_unit_kernel
from meganeura.graph import Graph
from meganeura.lower.plan import Kernel, Plan
from meganeura.ops import get_op
from meganeura.ops.linalg import matmul_dims

GEMV_ROWS = 8
GEMV_UNROLL = 4  # weight loads in flight per invocation, in a loop over a long row
GEMV_PIECES = 16  # rows of up to this many pieces per invocation are read without a loop
GEMV_WORKGROUPS = 256  # two workgroups for each SM of a large GPU (132 on an H200)
UNITS_FILL = 132  # 64 x 64 tiles an f32 product needs to go on matrix units (an H200's SMs)
GEMV_COLUMN_LANES = 2  # vec4 lanes per weight row in the column GEMV: 32-byte pieces
GEMV_TEAMS = (128, 64, 32)  # invocations that may read one weight row (contiguous k)
GEMV_TEAM_PIECES = 8  # vec4 pieces of its row each of them reads, at least


@archetype("matmul")
def matmul(plan: Plan, kernel: Kernel) -> KernelSource:
    mm = Matmul(plan, kernel)
    variant = _variant(mm.M, mm.N, mm.nbatch, (mm.dtype, mm.b_dtype), plan.options)
    if variant == "gemv":
        if mm.b.s_row == 1:
            return _gemv_contiguous_k(mm)
        return _gemv_columns(mm)
    if variant == "units":
        budget = plan.options.get("workgroup_storage", WORKGROUP_STORAGE)
        return matrix_unit_kernel(mm, plan.options["matrix_unit"], budget)
    if splits(mm.M, mm.N, mm.nbatch) and matmul_direct.fits(mm):
        return matmul_direct.direct(mm)
    return tiled(mm)


def _variant(M: int, N: int, nbatch: int, dtypes: tuple[str, str], options: dict) -> str:
    """Which kernel a product gets: "gemv", "units" (matrix units) or "tiled" (SIMT)."""
    if M <= GEMV_ROWS:
        return "gemv"
    # f16 operands lose nothing on matrix units (f32 accumulation); f32 ones are rounded to
    # f16, so only under matmul_precision="high", where the executor measured it pays, and
    # for products that fill the GPU: those of a 128-token prompt (128 x 576 x 960 and
    # the like) ran slower on matrix units than on the SIMT tiles, whose k splits inside
    # the workgroup give them more workgroups (44.6 against 34.9 us on an H200).
    f16 = set(dtypes) == {"f16"}
    high = options.get("matmul_precision") == "high" and options.get("f32_on_units")
    fills = math.ceil(M / 64) * math.ceil(N / 64) * nbatch >= UNITS_FILL
    if options.get("matrix_unit") and (f16 or (high and fills)):
        return "units"
    return "tiled"


def _product_dims(graph: Graph, nid: int):
    """(M, N, batch count, operand dtypes) of product node `nid`, or None for another node."""
    node = graph.nodes[nid]
    if get_op(node.op).kind != "matmul":
        return None
    a, b = graph.nodes[node.inputs[0]].type, graph.nodes[node.inputs[-1]].type
    trans_a, trans_b = node.attrs.get("trans_a", False), node.attrs["trans_b"]
    batch, M, _, N = matmul_dims(a, b, trans_a, trans_b)
    return M, N, math.prod(batch), (a.dtype, b.dtype)


def product_variant(graph: Graph, nid: int, options: dict) -> str | None:
    """The kernel family of node `nid` if it is a product (a matmul or a norm-matmul):
    "gemv", "units" or "tiled" (see _variant); None for any other node."""
    dims = _product_dims(graph, nid)
    return None if dims is None else _variant(*dims, options)


def pairable(graph: Graph, nid: int, options: dict) -> bool:
    """Whether the kernel of product `nid` (a matmul or a norm-matmul) can run a paired
    epilogue (Kernel.pair): the SIMT tiles and the direct products can; GEMVs and matrix
    units cannot, and their product is stored for a kernel of its own to read."""
    return product_variant(graph, nid, options) == "tiled"


def row_writable(graph: Graph, nid: int, options: dict) -> bool:
    """Whether the kernel of product `nid` can store row writes after its output
    (Kernel.writes): the split SIMT tiles and the direct products that take some of their
    products can (each workgroup holds both columns of its RoPE pairs); the others cannot."""
    if product_variant(graph, nid, options) != "tiled":
        return False
    M, N, nbatch, _ = _product_dims(graph, nid)
    return splits(M, N, nbatch)


# -- GEMV -----------------------------------------------------------------------------------


def _gemv_teams(N: int, nbatch: int, widths=(8, 4, 2)) -> int:
    """Output columns per workgroup: the most that still make GEMV_WORKGROUPS workgroups
    (else the fewest), so a short GEMV reaches every SM and a long one keeps large groups."""
    return next((w for w in widths if math.ceil(N / w) * nbatch >= GEMV_WORKGROUPS), widths[-1])


def _gemv_team(K: int) -> int:
    """Invocations reading one weight row of K contiguous f32: the most that still leaves
    each GEMV_TEAM_PIECES vec4s. A long row read by more invocations is read in fewer round
    trips: 4096 x 4096 x W^T on an H200, 18.0 us with 128 per row against 19.3 with 32."""
    return next((t for t in GEMV_TEAMS if 4 * GEMV_TEAM_PIECES * t <= K), GEMV_TEAMS[-1])


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
    to 128 invocations per output column (_gemv_team) reads its weight row in 16-byte pieces,
    and the teams of a workgroup reduce their sums in workgroup memory."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    # A computed x is evaluated element by element, the weights still read in vec4s.
    vec = K % 4 == 0 and mm.use_vec4(b, False) and (a.computed or mm.use_vec4(a, True))
    if vec:
        mm.bind.vector.add(mm.plan.buffer_of[b.base])
        if not a.computed:
            mm.bind.vector.add(mm.plan.buffer_of[a.base])
    TL = _gemv_team(K) if vec else 32
    step = 4 * TL if vec else TL
    teams = _gemv_teams(N, mm.nbatch, tuple(w for w in (8, 4, 2, 1) if w * TL <= 256)[:3])
    size = TL * teams

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

    sums = bool(mm.plan.options.get("subgroup_sums"))
    if sums:  # each subgroup's total, then lane m of a team adds its team's for row m
        reduce = "".join(
            f"  let part{m} = subgroupAdd(acc{m});\n"
            f"  if (sg_id == 0u) {{ red[{m * size}u + tid] = part{m}; }}\n"
            for m in range(M)
        )
        reduce += "  workgroupBarrier();\n"
        total = f"""    var acc = 0.0f;
    for (var j = 0u; j < {TL}u; j += sg_size) {{ acc += red[lane * {size}u + team * {TL}u + j]; }}
"""
    else:  # a tree in workgroup memory
        reduce = "".join(f"  red[{m * size}u + tid] = acc{m};\n" for m in range(M))
        tree = "".join(
            f"        red[{m * size}u + tid] += red[{m * size}u + tid + s];\n" for m in range(M)
        )
        reduce += f"""  workgroupBarrier();
  for (var s = {TL // 2}u; s > 0u; s = s >> 1u) {{
    if (lane < s) {{
{tree}    }}
    workgroupBarrier();
  }}
"""
        total = f"    let acc = red[lane * {size}u + team * {TL}u];\n"
    body = f"""@compute @workgroup_size({size})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32{SUBGROUP_BUILTINS if sums else ""}) {{
  let team = tid / {TL}u; let lane = tid % {TL}u;
  let n = wid.x * {teams}u + team; let bz = wid.z;
  let a0 = {a.origin(mm.batch)};
  let brow = {b.origin(mm.batch)} + min(n, {N - 1}u) * {b.s_col}u;
{mm.row_statistics(M, "0u", size, "tid")}{"".join(f"  var acc{m} = 0.0f;" + chr(10) for m in range(M))}  if (n < {N}u) {{
{_k_pieces(step, K, f"lane * {step // TL}u", piece)}  }}
{reduce}  if (lane < {M}u && n < {N}u) {{
{total}    let idx = bz * {M * N}u + lane * {N}u + n;
{mm.store("acc", "idx", "    ")}  }}
}}
"""
    shared = f"var<workgroup> red: array<f32, {size * M}>;\n"
    header = SUBGROUPS_ENABLE if sums else ""
    return kernel_source(mm, body, (math.ceil(N / teams), 1, mm.nbatch), shared, header)


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
