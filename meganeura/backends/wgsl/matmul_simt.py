"""Tiled SIMT matmuls (any operand dtype, f32 accumulation).

Large products (enough 128 x 128 tiles to fill a GPU) take 128 x 128 tiles with 8 x 8 outputs
per invocation. The rest take the largest tile, from 64 x 64 down to 16 x 16, that still
makes enough workgroups; a tile smaller than 64 x 64 keeps 256 invocations with 4 x 4 outputs
each by splitting k among groups of them inside the workgroup, so a small product (an LLM
prefill: 128 rows) runs on every SM in few serial steps, in one kernel.

With a norm prologue (rms_norm_matmul, layer_norm_matmul) the kernels first compute the
statistics of their tile's rows over the whole of k in the staging memory, which then holds
operands as before: each invocation keeps the statistics of the rows it loads in registers.
The split tiles defer an RMSNorm instead (NormPrologue.defer): they sum the squares of the
rows as they stage them and scale their outputs at the end, reading each row once.

Under a paired epilogue (Kernel.pair: SwiGLU of a gate/up product's two halves), a split
tile's first half of columns stages weight rows n0 + c and its second half rows H + n0 + c,
so the finish has gate and up of the same columns and stores the epilogue of each pair.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from meganeura.backends.wgsl.emit import Emitter, store_value
from meganeura.backends.wgsl.kernels import KernelSource
from meganeura.backends.wgsl.matmul_operands import Matmul, Operand, kernel_source
from meganeura.backends.wgsl.update import clamped_position, row_destination, rows_layout

LARGE, LARGE_BK = 128, 8  # SIMT tile of large products: 8 x 8 outputs per invocation
LARGE_TILES_MIN = 128  # enough 128 x 128 tiles to fill a GPU
TILE_SHAPES = ((64, 64), (32, 64), (32, 32), (16, 32), (16, 16))  # (rows, cols), largest first
# About two workgroups for each SM of a large GPU (132 on an H200). 240 rather than 256: a
# 128-token prompt's q/k/v product (128 x 960) then takes 16 x 32 tiles (240 workgroups)
# rather than 16 x 16 (480), and a SmolLM2-135M prefill's device time went 3.23 -> 3.19 ms
# on an H200; its other products keep their tiles.
TILED_WORKGROUPS = 240
TILE_VEC4 = 1024  # workgroup memory of a tile: 16 KiB, WebGPU's default limit
# Tiles that stage one step twice as deep at a time instead of two, a barrier before the next
# step's store (see Tile.stages). On an H200, 128-row products (q/k/v, o, gate/up, down of
# SmolLM2-135M), two stages against one: 16 x 32 18.3 / 17.5 / 36.8 / 41.6 against 14.2 /
# 13.9 / 34.7 / 31.2 us, 32 x 16 alike; but 16 x 16 12.7 against 13.6 (o) and 32 x 32 27.1
# against 28.9 (gate/up), the tiles those products take, so the square tiles keep two.
ONE_STAGE_TILES = ((16, 32), (32, 16))
# vec4s added to each k row of a stage where the padded stages still fit TILE_VEC4: with a
# stride of rows / 4 + 1 vec4s, the two invocations that load one row's two k-quads store
# their four values 16 banks apart instead of into the same bank. (More workgroup memory than
# TILE_VEC4 to make room for the pad slowed the square tiles by a third on an H200.)
STAGE_PAD = 1


@dataclass(frozen=True)
class Tile:
    """A workgroup's block of rows x cols outputs. Its 256 invocations form `splits` groups,
    each a (rows / 4) x (cols / 4) grid of invocations owning 4 x 4 outputs. Every staged step
    of `depth` k is shared out among the groups (group g takes k g, g + splits, ...: groups in
    one subgroup read neighbouring rows of the staged tiles), and the groups' partial sums
    meet in workgroup memory at the end: more, smaller tiles with fewer serial steps each,
    in one kernel."""

    rows: int
    cols: int

    @property
    def splits(self) -> int:
        return 256 * 16 // (self.rows * self.cols)

    @property
    def stages(self) -> int:
        """Staging buffers: with two, the next step is stored while this one is read (one
        barrier a step); with one, each step is twice as deep and the store waits for a
        second barrier."""
        return 1 if (self.rows, self.cols) in ONE_STAGE_TILES else 2

    @property
    def depth(self) -> int:
        """k per step: `stages` stages of both operand tiles fit the workgroup memory."""
        fit = TILE_VEC4 * 4 // (self.stages * (self.rows + self.cols))
        return 1 << (fit.bit_length() - 1)


def choose_tile(M: int, N: int, nbatch: int) -> Tile:
    """The largest tile shape that still makes TILED_WORKGROUPS workgroups (else the
    smallest), its long side along the longer of M and N: a small product runs as many small
    tiles over every SM rather than as a few large ones that leave most of the GPU idle (128
    prefill rows times 576 columns made 18 workgroups of 64 x 64)."""
    for rows, cols in TILE_SHAPES:
        if M > N:
            rows, cols = cols, rows
        if math.ceil(M / rows) * math.ceil(N / cols) * nbatch >= TILED_WORKGROUPS:
            return Tile(rows, cols)
    return Tile(*TILE_SHAPES[-1])


def tiled(mm: Matmul) -> KernelSource:
    """128 x 128 tiles where there are enough of them to fill a GPU, else the tile that
    choose_tile picks."""
    if not splits(mm.M, mm.N, mm.nbatch):
        return _tiled_large(mm)
    return _tiled_split(mm, choose_tile(mm.M, mm.N, mm.nbatch))


def splits(M: int, N: int, nbatch: int) -> bool:
    """Whether a product goes to the split tiles (else to the 128 x 128 tiles)."""
    return math.ceil(M / LARGE) * math.ceil(N / LARGE) * nbatch < LARGE_TILES_MIN


def _tiled_split(mm: Matmul, tile: Tile) -> KernelSource:
    """One workgroup per tile, its k split among the groups of `tile`. Operand tiles are
    fetched with 16-byte loads along each operand's contiguous direction where the layout
    allows, into registers while the previous step computes, then stored k-major into the
    other of two stages (one barrier per step; or, for ONE_STAGE_TILES, into the one stage
    after a second barrier); each invocation reads its 4 x 4 block's
    operands as two vec4s per k. The stores avoid bank conflicts between the two invocations
    that load one row's two k-quads: a k row of the stages is padded by STAGE_PAD vec4s where
    that still fits TILE_VEC4, and k rows of 16 floats take the rotated stores of `_stage`."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    R, C, S, D = tile.rows, tile.cols, tile.splits, tile.depth
    GX, P = C // 4, R * C // 16  # invocations per group along n, per group in all
    # A paired epilogue (Kernel.pair): the tile's first C / 2 columns are product columns
    # n0 + c of the first half, its last C / 2 those of the second half (H + n0 + c), and
    # the finish stores the epilogue of each pair at column n0 + c of the H-wide output.
    H = N // 2 if mm.kernel.pair else 0
    # Row writes (Kernel.writes) under RoPE: the tile's first C / 2 columns are the first
    # columns of RoPE pairs (c, c + Pd), its last C / 2 their partners, so that the write's
    # rotations read columns this workgroup stored.
    write = mm.kernel.writes[0] if mm.kernel.writes else None
    Pd = write.pair if write is not None else 0
    columns = _pair_columns(Pd, C // 2) if Pd else None
    b_row = _paired_rows(H, C // 2) if H else columns
    # k rows of the stages: R / 4 (C / 4) vec4s, padded where that still fits TILE_VEC4.
    pad = STAGE_PAD if tile.stages * D * ((R + C) // 4 + 2 * STAGE_PAD) <= TILE_VEC4 else 0
    a_stride, b_stride = R // 4 + pad, C // 4 + pad
    b_at = tile.stages * D * a_stride  # where the B stages start in `tile` (vec4s)
    # op(B) is k x n; seen as n "rows" of k it stages exactly like op(A).
    bt = dataclasses.replace(b, s_row=b.s_col, s_col=b.s_row)
    # 16-byte loads: along k (both operands of x @ W^T), or along rows (A^T, B as [K, N]).
    vec_a = (K % 4 == 0 and K > 0) if a.s_col == 1 else (M % 4 == 0 and a.s_row == 1)
    vec_b = (K % 4 == 0 and K > 0) if b.s_row == 1 else (N % 4 == 0 and b.s_col == 1)
    vec_a = vec_a and mm.use_vec4(a, a.s_col == 1)
    # A decoded weight (read along k) is staged four weights at a time, as vec4 loads are.
    vec_b = vec_b and (mm.use_vec4(b, b.s_row != 1) or (bool(b.decoded) and b.s_row == 1))
    # A norm prologue normalizes the vec4 of one row (k..k+3), not one of four rows.
    vec_a = vec_a and (mm.prologue is None or a.s_col == 1)
    for vec, x in ((vec_a, a), (vec_b, b)):
        if vec and not x.decoded:
            mm.bind.vector.add(mm.plan.buffer_of[x.base])
    # An RMSNorm whose rows are staged as vec4s along k sums their squares as it stages them
    # and scales the outputs at the end (NormPrologue.defer); other norms first compute the
    # statistics of the tile's rows, in `tile`, before the loads that read them.
    deferred = mm.prologue is not None and mm.prologue.can_defer() and vec_a and a.s_col == 1
    if deferred:
        mm.prologue.defer()
    statistics = "" if deferred else mm.row_statistics(R, "m0", 256, "tid", scratch="tile")
    ia, fa, sa = _stage(
        mm, a, vec_a, "pa", 0, R, D, M, "m0", "a0", a_stride, normalized=True, square_sums=deferred
    )
    ib, fb, sb = _stage(mm, bt, vec_b, "pb", b_at, C, D, N, "n0", "b0", b_stride, row_of=b_row)
    k_row = f"cur * {D}u + grp + {S}u * kk" if S > 1 else f"cur * {D}u + kk"
    store = "" if H else mm.store("acc_v", "idx", "        ")
    rounds = math.ceil(R * D / 4 / 256)  # rounds of A loads per step (two for 32 x 16)
    finish_rows = ["4u * ty + 0u", "4u * ty + 1u", "4u * ty + 2u", "4u * ty + 3u"]
    # Output vec4s of the finish through `tile` (o = i * OP + q: row i of the 4 x 4 blocks,
    # block q of OP), each summed over the groups' partial sums; paired, only the blocks of
    # the first half, each with its partner GX / 2 blocks on.
    OP, OX = (P // 2, GX // 2) if H else (P, GX)
    if S > 1 or H:
        finish_rows = [
            f"4u * (((tid + {256 * t}u) % {OP}u) / {OX}u) + (tid + {256 * t}u) / {OP}u"
            for t in range(math.ceil(4 * OP / 256))
        ]
    scale = _deferred_scales(mm, R, rounds, finish_rows) if deferred else ""

    def column(tc: str) -> str:  # the product column of tile column tc
        return f"n0 + {tc}" if columns is None else columns(f"({tc})")

    row_scale = (lambda i: f" * nm_rs[{i}]") if deferred else (lambda i: "")
    if H:
        finish = _paired_finish(mm, M, H, S, P, GX, deferred, row_scale)
    elif S == 1:
        finish = f"""  var accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
  for (var i = 0u; i < 4u; i++) {{
    let gm = m0 + 4u * ty + i;
    for (var c = 0u; c < 4u; c++) {{
      let gn = {column("4u * tx + c")};
      if (gm < {M}u && gn < {N}u) {{
        let acc_v = accs[i][c]{row_scale("i")};
        let idx = bz * {M * N}u + gm * {N}u + gn;
{store}      }}
    }}
  }}
"""
    else:
        # The groups' partial sums through `tile` (_partial_sums), summed per output vec4.
        finish = f"""{_partial_sums(P, deferred)}  for (var o = tid; o < {4 * P}u; o += 256u) {{
    let i = o / {P}u; let q = o % {P}u;
    var sum = tile[o];
    for (var s = 1u; s < {S}u; s++) {{ sum += tile[(s * 4u + i) * {P}u + q]; }}
    let gm = m0 + 4u * (q / {GX}u) + i;
    for (var c = 0u; c < 4u; c++) {{
      let gn = {column(f"4u * (q % {GX}u) + c")};
      if (gm < {M}u && gn < {N}u) {{
        let acc_v = sum[c]{row_scale("o / 256u")};
        let idx = bz * {M * N}u + gm * {N}u + gn;
{store}      }}
    }}
  }}
"""
    steps = math.ceil(K / D)
    body = f"""@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {{
  let bz = wid.z;
  let grp = tid / {P}u; let lid = tid % {P}u;
  let tx = lid % {GX}u; let ty = lid / {GX}u;
  let a0 = {a.origin(mm.batch)};
  let b0 = {bt.origin(mm.batch)};
  let m0 = wid.y * {R}u;
  let n0 = wid.x * {C // 2 if H or Pd else C}u;
{_pair_origin(Pd, C // 2)}{statistics}{ia}{ib}  var acc0 = vec4<f32>(0.0); var acc1 = vec4<f32>(0.0);
  var acc2 = vec4<f32>(0.0); var acc3 = vec4<f32>(0.0);
  {{
    let k0 = 0u; let st = 0u;
{fa}{fb}{sa}{sb}  }}
  workgroupBarrier();
  for (var step = 0u; step < {steps}u; step++) {{
    let cur = {"step % 2u" if tile.stages == 2 else "0u"};
    let more = step + 1u < {steps}u;
    if (more) {{
      let k0 = (step + 1u) * {D}u;
{fa}{fb}    }}
    for (var kk = 0u; kk < {D // S}u; kk++) {{
      let k = {k_row};
      let av = tile[k * {a_stride}u + ty];
      let bv = tile[{b_at}u + k * {b_stride}u + tx];
      acc0 += av.x * bv; acc1 += av.y * bv; acc2 += av.z * bv; acc3 += av.w * bv;
    }}
{"" if tile.stages == 2 else "    workgroupBarrier();" + chr(10)}    if (more) {{
      let st = {"1u - cur" if tile.stages == 2 else "0u"};
{sa}{sb}    }}
    workgroupBarrier();
  }}
{scale}{finish}{_row_writes(mm, write, R, C, column) if write else ""}}}
"""
    # The stages, and the groups' partial sums at the end (S groups x 4 P = 1024 vec4s).
    shared = f"var<workgroup> tile: array<vec4<f32>, {max(TILE_VEC4, 1024)}>;\n"
    # Paired or not, a workgroup covers C product columns (C / 2 of each half or pair side).
    grid = (math.ceil(N / C), math.ceil(M / R), mm.nbatch)
    return kernel_source(mm, body, grid, shared)


def _pair_columns(Pd: int, half: int):
    """Under a row write with RoPE pairs (c, c + Pd) in blocks of 2 Pd columns, the product
    column of tile column r (a WGSL expression), also the weight row it stages: the pair's
    first column lo(n0 + r) in the tile's first `half` columns, its partner
    lo(n0 + r - half) + Pd in the last, where lo(u) is the u-th first column. Where `half`
    divides Pd, lo(n0 + r) is p0 + r with p0 = lo(n0), computed once (`_pair_origin`)."""
    if Pd % half == 0:
        return _paired_rows(Pd, half, "p0")

    def lo(u: str) -> str:
        return f"({u}) / {Pd}u * {2 * Pd}u + ({u}) % {Pd}u"

    return lambda r: (
        f"select({lo(f'n0 + {r} - {half}u')} + {Pd}u, {lo(f'n0 + {r}')}, {r} < {half}u)"
    )


def _pair_origin(Pd: int, half: int) -> str:
    """The statement computing p0 of _pair_columns from n0, where it uses one."""
    return f"  let p0 = n0 / {Pd}u * {2 * Pd}u + n0 % {Pd}u;\n" if Pd and Pd % half == 0 else ""


def _paired_rows(H: int, half: int, origin: str = "n0"):
    """Under a paired epilogue, the weight row that tile column r stages (a WGSL expression):
    n0 + r in the tile's first `half` columns (the product's first half), H + n0 + r - half
    in its last (the second half's same columns). (`origin` in place of n0: see
    _pair_columns.)"""
    return lambda r: f"select({H}u + {origin} + {r} - {half}u, {origin} + {r}, {r} < {half}u)"


def _partial_sums(P: int, deferred: bool) -> str:
    """Each group's 4 x 4 blocks into `tile` for a split tile's finish: row i of group g's
    blocks at (g * 4 + i) * P + lid, neighbouring invocations at neighbouring vec4s (after a
    barrier where the deferred RMSNorm's scales used `tile` last), then a barrier."""
    return f"""{"  workgroupBarrier();" + chr(10) if deferred else ""}  tile[(grp * 4u) * {P}u + lid] = acc0;
  tile[(grp * 4u + 1u) * {P}u + lid] = acc1;
  tile[(grp * 4u + 2u) * {P}u + lid] = acc2;
  tile[(grp * 4u + 3u) * {P}u + lid] = acc3;
  workgroupBarrier();
"""


def _paired_finish(mm: Matmul, M: int, H: int, S: int, P: int, GX: int, deferred, row_scale):
    """The finish of a split tile under a paired epilogue: every group's partial sums (one
    group when S is 1) through `tile`; invocation o sums output vec4 q of the first half and
    its partner q + GX / 2 of the second, and stores the epilogue of the four pairs at the
    H-wide output's columns n0 + 4 (q % GX) + c."""
    OP, OX = P // 2, GX // 2
    store = mm.store_pair("lo_v", "hi_v", "idx", "        ")
    return f"""{_partial_sums(P, deferred)}  for (var o = tid; o < {4 * OP}u; o += 256u) {{
    let i = o / {OP}u; let qh = o % {OP}u;
    let q = (qh / {OX}u) * {GX}u + qh % {OX}u;
    var lo = tile[i * {P}u + q];
    var hi = tile[i * {P}u + q + {OX}u];
    for (var s = 1u; s < {S}u; s++) {{
      lo += tile[(s * 4u + i) * {P}u + q];
      hi += tile[(s * 4u + i) * {P}u + q + {OX}u];
    }}
    let gm = m0 + 4u * (q / {GX}u) + i;
    for (var c = 0u; c < 4u; c++) {{
      let gn = n0 + 4u * (q % {GX}u) + c;
      if (gm < {M}u && gn < {H}u) {{
        let lo_v = lo[c]{row_scale("o / 256u")};
        let hi_v = hi[c]{row_scale("o / 256u")};
        let idx = bz * {M * H}u + gm * {H}u + gn;
{store}      }}
    }}
  }}
"""


def _row_writes(mm: Matmul, write, R: int, C: int, column, invocations: int = 256) -> str:
    """After a split tile's finish, the row write (Kernel.writes, row_writes.RowWrite) of the
    R x C elements it stored, element e by invocation e % `invocations` (the workgroup's
    size; the direct products use it too): each element anchored at one
    of them is evaluated, reading the product back after a storage barrier (this workgroup
    stored the anchor and its RoPE partner), and stored at the write's run-time position, as
    write_rows stores it in place. The position and the table entries are loaded before the
    barrier. (Each invocation rotating a pair it summed itself, without the barrier, took a
    128-token prefill 43 us longer on an H200: the paired finish keeps 64 invocations busy.)"""
    graph = mm.graph
    node = graph.nodes[write.node]
    rows_id = node.inputs[1]
    out = mm.bind.output(write.node)
    table = mm.table(write.columns)
    materialized = mm.plan.materialized - {write.node}
    first = Emitter(graph, materialized, mm.bind.name_of, "  ")
    clamped_position(first, node, "rw_p")
    M, N, T = mm.M, mm.N, write.tokens
    layout = rows_layout(graph, node)
    before, after = first.lines, []
    for j in range(math.ceil(R * C / invocations)):
        e, gm, gn, c, v = (f"rw_{x}{j}" for x in ("e", "m", "n", "c", "v"))
        before.append(
            f"  let {e} = tid + {invocations * j}u; let {gm} = m0 + {e} / {C}u;"
            f" let {gn} = {column(f'{e} % {C}u')};\n"
            f"  let {c} = {table}[min({gn}, {N - 1}u)];"
        )
        em = Emitter(graph, materialized, mm.bind.name_of, "    ")
        value = em.value(rows_id, v)
        at = row_destination(layout, v, "rw_p")
        guard = f"{e} < {R * C}u && " if (j + 1) * invocations > R * C else ""
        after.append(
            f"  if ({guard}{gm} < {M}u && {gn} < {N}u && {c} >= 0i) {{\n"
            f"    let rw_r{j} = bz * {M}u + {gm};\n"
            f"    let {v} = u32({c}) + rw_r{j} / {T}u * {write.sequence_stride}u"
            f" + rw_r{j} % {T}u * {write.row_stride}u;\n"
            + "".join(line + "\n" for line in em.lines)
            + f"    {out}[{at}] = {store_value(value, node.type.dtype)};\n  }}"
        )
    return "\n".join([*before, "  storageBarrier();", *after]) + "\n"


def _deferred_scales(mm: Matmul, R: int, rounds: int, rows: list[str]) -> str:
    """After the main loop of a split tile under a deferred RMSNorm: the 1 / rms of each of
    the tile's R rows from the square sums the A loads kept (invocation e = tid + 256 j of
    round j loaded row (e / 2) % R, `_stage`), through `tile`, then in registers nm_rs[i] the
    scale of local row `rows[i]` for the invocation's outputs."""
    per_row = 256 * rounds // (2 * R)  # invocations whose loads read a row, in pairs
    parts = "".join(f"    tile[{256 * j}u + tid].x = nm_sq{j};\n" for j in range(rounds))
    total = f"tile[2u * tid + {2 * R}u * t].x + tile[2u * tid + {2 * R}u * t + 1u].x"
    at = 256 * rounds
    rstd = mm.prologue.rstd("nm_total")
    reads = "".join(
        f"  nm_rs[{i}] = tile[{at}u + min({row}, {R - 1}u)].x;\n" for i, row in enumerate(rows)
    )
    return f"""  {{
{parts}    workgroupBarrier();
    if (tid < {R}u) {{
      var nm_total = 0.0f;
      for (var t = 0u; t < {per_row}u; t++) {{ nm_total += {total}; }}
      tile[{at}u + tid].x = {rstd};
    }}
    workgroupBarrier();
  }}
  var nm_rs: array<f32, {len(rows)}>;
{reads}"""


def _stage(
    mm: Matmul,
    x: Operand,
    vec: bool,
    name: str,
    at: int,
    tile_rows: int,
    depth: int,
    rows: int,
    start: str,
    origin: str,
    stride: int,
    normalized: bool = False,
    square_sums: bool = False,
    row_of=None,
) -> tuple[str, str, str]:
    """Staging of one operand, seen as rows x k, into `tile` at vec4 `at`: stage `st` holds
    k rows of tile_rows / 4 vec4s, `stride` vec4s apart. Returns the per-invocation index lets and register
    declarations, the fetch of step k0 into registers, and their store into stage st.
    `normalized` (A) passes the loads through the matmul's norm prologue, if it has one,
    and holds the statistics of the rows they read in registers (after the index lets).
    `square_sums` (a deferred RMSNorm, vec4 loads along k): round j of the loads also adds
    the squares of the row's elements it loads to nm_sq{j}. `row_of(r)` gives the operand
    row that tile row r stages (by default start + r); where an invocation loads four rows at
    once, row_of(r) + i must be the row of tile row r + i (r a multiple of 4, i < 4)."""
    K = mm.K
    quads = tile_rows // 4
    row_of = row_of or (lambda r: f"{start} + {r}")
    along_k = x.s_col == 1
    count = tile_rows * depth // 4  # vec4s per stage
    lets, fetch, store = [], [], []

    def normalize(value: str, row: str, k: str, vec: bool = False) -> str:
        return mm.load_a(value, row, k, vec) if normalized else value

    for j in range(math.ceil(count / 256)):
        e = f"(tid + {256 * j}u)" if j else "tid"
        r, k, reg = f"{name}r{j}", f"{name}k{j}", f"{name}{j}"
        g = row_of(r)  # the operand row of tile row r (an expression safe to add to)
        if along_k:  # two invocations per row, four k each: 32 contiguous bytes
            lets.append(
                f"  let {r} = ({e} / 2u) % {tile_rows}u;"
                f" let {k} = 4u * ({e} % 2u + 2u * ({e} / {2 * tile_rows}u));"
            )
            parts = [(g, f"k0 + {k} + {i}u", r) for i in range(4)]
            at_row = f"min({g}, {rows - 1}u) * {x.s_row}u"
            at_vec = f"({origin} + {at_row} + min(k0 + {k}, {K - 4}u)) / 4u"
            in_range = f"{g} < {rows}u && k0 + {k} < {K}u"
            if stride % 8 == 4:
                # A k row of 16 floats (mod 32): invocations e and e + 1, one row's two
                # k-quads, would store into one bank at each of the four stores; the odd one
                # stores its values in the order y, x, w, z instead, 16 banks on. (On an H200:
                # SmolLM2's o and down products 13.0 / 28.1 -> 12.6 / 26.7 us. Rows of 32
                # floats, whose pairs also share banks, stored by a swizzle of their quads
                # instead: gate/up 28.1 -> 27.6 us but a prefill no faster; not kept.)
                odd = f"{name}x{j}"
                lets.append(f"  let {odd} = {e} % 2u == 1u;")
                put = "\n".join(
                    f"      tile[{at}u + (st * {depth}u + {k} + select({i}u, {i ^ 1}u, {odd}))"
                    f" * {stride}u + {r} / 4u][{r} % 4u] = select({reg}.{ch}, {reg}.{'yxwz'[i]},"
                    f" {odd});"
                    for i, ch in enumerate("xyzw")
                )
            else:
                put = "\n".join(
                    f"      tile[{at}u + (st * {depth}u + {k} + {i}u) * {stride}u + {r} / 4u]"
                    f"[{r} % 4u] = {reg}.{ch};"
                    for i, ch in enumerate("xyzw")
                )
        else:  # four rows per invocation, one k
            lets.append(f"  let {r} = 4u * ({e} % {quads}u); let {k} = {e} / {quads}u;")
            parts = [(f"{g} + {i}u", f"k0 + {k}", f"{r} + {i}u") for i in range(4)]
            at_vec = (
                f"({origin} + min({g}, {rows - 4}u) + min(k0 + {k}, {K - 1}u) * {x.s_col}u) / 4u"
            )
            in_range = f"{g} < {rows}u && k0 + {k} < {K}u"
            put = f"      tile[{at}u + (st * {depth}u + {k}) * {stride}u + {r} / 4u] = {reg};"
        lets.append(f"  var {reg} = vec4<f32>(0.0);")
        load = ""
        if vec and x.decoded:  # a quantized weight: four weights of row start + r at k..k+3
            loaded = f"{x.decoded}(min({g}, {rows - 1}u), min(k0 + {k}, {K - 4}u))"
            value = f"select(vec4<f32>(0.0), {loaded}, {in_range})"
        elif vec and square_sums:  # the row's squares summed, its weight applied
            lets.append(f"  var nm_sq{j} = 0.0f;")
            raw = f"select(vec4<f32>(0.0), vec4<f32>({x.buf}[{at_vec}]), {in_range})"
            scaled = normalize(f"{reg}x", r, f"min(k0 + {k}, {K - 4}u)", True)
            load = (
                f"      let {reg}x = {raw};\n      {reg} = {scaled};\n"
                f"      nm_sq{j} += {mm.prologue.square_sum(f'{reg}x')};"
            )
        elif vec:  # along k under a prologue: the vec4 of one row at k..k+3
            loaded = normalize(f"vec4<f32>({x.buf}[{at_vec}])", r, f"min(k0 + {k}, {K - 4}u)", True)
            value = f"select(vec4<f32>(0.0), {loaded}, {in_range})"
        else:
            value = (
                "vec4<f32>("
                + ", ".join(
                    "select(0.0, "
                    + normalize(
                        x.at(
                            f"{origin} + min({row}, {rows - 1}u) * {x.s_row}u"
                            f" + min({kk}, {K - 1}u) * {x.s_col}u"
                        ),
                        local,
                        f"min({kk}, {K - 1}u)",
                    )
                    + f", {row} < {rows}u && {kk} < {K}u)"
                    for row, kk, local in parts
                )
                + ")"
            )
        load = load or f"      {reg} = {value};"
        if count % 256 and j == count // 256:  # a last, partial round of loads
            load = f"      if ({e} < {count}u) {{\n  {load}\n      }}"
            put = f"      if ({e} < {count}u) {{\n{put}\n      }}"
        fetch.append(load)
        store.append(put)
    return (
        "\n".join(lets) + "\n" + (mm.keep_statistics() if normalized else ""),
        "\n".join(fetch) + "\n",
        "\n".join(store) + "\n",
    )


def _tiled_large(mm: Matmul) -> KernelSource:
    """128 x 128 tiles, 8 x 8 outputs per invocation (two 4 x 4 blocks 64 apart in each
    direction, so the staged tiles are read as conflict-free vec4s), k in steps of 8 with two
    staging buffers: the next step's operands are fetched into registers while this step
    computes, and one barrier per step suffices. Under a paired epilogue (Kernel.pair) the
    tile's first 64 columns stage weight rows n0 + c and its last 64 rows H + n0 + c: each
    invocation's two column blocks are then gate and up of the same columns."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    H = N // 2 if mm.kernel.pair else 0
    half = LARGE // 2
    b_rows = _paired_rows(H, half) if H else None
    # op(B) is k x n; seen as n "rows" of k it stages exactly like op(A).
    bt = dataclasses.replace(b, s_row=b.s_col, s_col=b.s_row)
    steps = math.ceil(K / LARGE_BK)

    def operand(x: Operand, name: str, rows: int, start: str, row_of=None):
        """Index lets, four guarded global loads into registers {name}0..3, and the store of
        those registers into stage `st` of the tile `name` ([k][128 / 4 vec4]); `row_of(r)`
        the operand row of tile row r (by default start + r)."""
        row_of = row_of or (lambda r: f"{start} + {r}")
        if x.s_col == 1:  # contiguous along k: two invocations per row, four k each
            index = f"let {name}r = tid / 2u; let {name}k = (tid % 2u) * 4u;"
            at = [(f"{name}r", f"{name}k + {i}u") for i in range(4)]
            store = " ".join(
                f"{name}[(st * 8u + {name}k + {i}u) * 32u + {name}r / 4u][{name}r % 4u] = {name}{i};"
                for i in range(4)
            )
        else:  # contiguous along rows: four rows per invocation, one k
            index = f"let {name}r = (tid % 32u) * 4u; let {name}k = tid / 32u;"
            at = [(f"{name}r + {i}u", f"{name}k") for i in range(4)]
            regs = ", ".join(f"{name}{i}" for i in range(4))
            store = f"{name}[(st * 8u + {name}k) * 32u + tid % 32u] = vec4<f32>({regs});"
        origin = "a0" if name == "As" else "b0"

        def value(r: str, k: str) -> str:
            kk = f"min(k0 + {k}, {K - 1}u)"
            v = x.at(f"{origin} + min({row_of(r)}, {rows - 1}u) * {x.s_row}u + {kk} * {x.s_col}u")
            return mm.load_a(v, r, kk) if name == "As" else v

        loads = " ".join(
            f"{name}{i} = select(0.0, {value(r, k)}, {row_of(r)} < {rows}u && k0 + {k} < {K}u);"
            for i, (r, k) in enumerate(at)
        )
        if x.decoded and x.s_col == 1:  # a quantized weight: its four weights in one decode
            r, k = f"{name}r", f"{name}k"
            g = row_of(r)
            loads = (
                f"let {name}v = select(vec4<f32>(0.0), {x.decoded}(min({g}, {rows - 1}u),"
                f" min(k0 + {k}, {K - 4}u)), {g} < {rows}u && k0 + {k} < {K}u); "
                + " ".join(f"{name}{i} = {name}v.{ch};" for i, ch in enumerate("xyzw"))
            )
        keep = mm.keep_statistics() if name == "As" else ""
        if keep:  # a norm prologue: the statistics of the rows it loads, in registers
            index += "\n" + keep.rstrip("\n")
        return index, loads, store

    # Before the loads that read them: the statistics of the tile's rows, in `As`.
    statistics = mm.row_statistics(LARGE, "m0", 256, "tid", scratch="As")
    ia, la, sa = operand(a, "As", M, "m0")
    ib, lb, sb = operand(bt, "Bs", N, "n0", b_rows)
    fmas = []
    for half, av in enumerate(("a0v", "a1v")):
        for i, ch in enumerate("xyzw"):
            r = half * 4 + i
            fmas.append(
                f"      acc[{r * 2}] += {av}.{ch} * b0v; acc[{r * 2 + 1}] += {av}.{ch} * b1v;"
            )
    body = f"""@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {{
  let bz = wid.z;
  let tx = tid % 16u; let ty = tid / 16u;
  let a0 = {a.origin(mm.batch)};
  let b0 = {bt.origin(mm.batch)};
  let m0 = wid.y * {LARGE}u;
  let n0 = wid.x * {half if H else LARGE}u;
{statistics}  {ia}
  {ib}
  var acc: array<vec4<f32>, 16>;
  var As0 = 0.0f; var As1 = 0.0f; var As2 = 0.0f; var As3 = 0.0f;
  var Bs0 = 0.0f; var Bs1 = 0.0f; var Bs2 = 0.0f; var Bs3 = 0.0f;
  {{
    let k0 = 0u; let st = 0u;
    {la}
    {lb}
    {sa}
    {sb}
  }}
  workgroupBarrier();
  for (var step = 0u; step < {steps}u; step++) {{
    let cur = step % 2u;
    let more = step + 1u < {steps}u;
    if (more) {{
      let k0 = (step + 1u) * {LARGE_BK}u;
      {la}
      {lb}
    }}
    for (var kk = 0u; kk < {LARGE_BK}u; kk++) {{
      let row = (cur * 8u + kk) * 32u;
      let a0v = As[row + ty]; let a1v = As[row + 16u + ty];
      let b0v = Bs[row + tx]; let b1v = Bs[row + 16u + tx];
{chr(10).join(fmas)}
    }}
    if (more) {{
      let st = 1u - cur;
      {sa}
      {sb}
    }}
    workgroupBarrier();
  }}
{_large_paired_finish(mm, M, H) if H else _large_finish(mm, M, N)}}}
"""
    shared = (
        f"var<workgroup> As: array<vec4<f32>, {2 * LARGE_BK * LARGE // 4}>;\n"
        f"var<workgroup> Bs: array<vec4<f32>, {2 * LARGE_BK * LARGE // 4}>;\n"
    )
    grid = (math.ceil(H / half) if H else math.ceil(N / LARGE), math.ceil(M / LARGE), mm.nbatch)
    return kernel_source(mm, body, grid, shared)


def _large_finish(mm: Matmul, M: int, N: int) -> str:
    """The stores of a 128 x 128 tile's 8 x 8 outputs per invocation, through the epilogue."""
    return f"""  for (var ri = 0u; ri < 8u; ri++) {{
    let gm = m0 + (ri / 4u) * 64u + 4u * ty + ri % 4u;
    for (var cj = 0u; cj < 2u; cj++) {{
      for (var lane = 0u; lane < 4u; lane++) {{
        let gn = n0 + cj * 64u + 4u * tx + lane;
        if (gm < {M}u && gn < {N}u) {{
          let acc_v = acc[ri * 2u + cj][lane];
          let idx = bz * {M * N}u + gm * {N}u + gn;
{mm.store("acc_v", "idx", "          ")}        }}
      }}
    }}
  }}
"""


def _large_paired_finish(mm: Matmul, M: int, H: int) -> str:
    """Under a paired epilogue: each invocation's first column block holds the first half's
    columns n0 + 4 tx + lane, its second the second half's same columns; the epilogue of
    each pair goes to column n0 + 4 tx + lane of the H-wide output."""
    return f"""  for (var ri = 0u; ri < 8u; ri++) {{
    let gm = m0 + (ri / 4u) * 64u + 4u * ty + ri % 4u;
    for (var lane = 0u; lane < 4u; lane++) {{
      let gn = n0 + 4u * tx + lane;
      if (gm < {M}u && gn < {H}u) {{
        let lo_v = acc[ri * 2u][lane];
        let hi_v = acc[ri * 2u + 1u][lane];
        let idx = bz * {M * H}u + gm * {H}u + gn;
{mm.store_pair("lo_v", "hi_v", "idx", "        ")}      }}
    }}
  }}
"""
