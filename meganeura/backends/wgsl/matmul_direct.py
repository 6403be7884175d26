"""Direct products: small x @ W^T products read straight from storage, k split over lanes.

The split SIMT tiles (matmul_simt) stage both operands through workgroup memory: fetch a
step into registers, store it, wait at a barrier, read it back, multiply. For the products
of a short prompt (128 rows times 576 to 3072 columns) every step of that chain waits on the
one before it, and a workgroup's few steps never fill the GPU's memory pipeline.

Here nothing is staged. A workgroup of WG = 64 invocations holds groups of `lanes`
consecutive invocations; each group owns RM x RN = 4 x 8 outputs (4 rows of A, 8 weight
rows) and splits k among its lanes, lane s taking the vec4s s, s + lanes, ... of every row.
A lane loads its 4 A vec4s and 8 weight vec4s for UNROLL k-quads at once (12 16-byte loads
per k-quad, all independent, read by the lanes of a group as contiguous runs), and keeps
its 32 partial sums in registers (vec4 accumulators, or f32 ones for long k: Layout). At the
end the group's lanes add up their
partial sums in a reduce-scatter of subgroup shuffles (each exchange halves what a lane
holds: 31 shuffles for 32 outputs over 8 lanes), which leaves lane s the totals of outputs
s * 32 / lanes onwards, and the lanes store them through the epilogue. Without subgroup
operations (or with subgroups smaller than a group) the partial sums meet in workgroup
memory instead, after one barrier.

On an H200 (device time per product, 30 weight copies rotated; the split tiles as chosen
against the best direct layout): SmolLM2-135M's 128-token q/k/v 13.6 -> 10.7 us, o 12.4 ->
10.6-11.3, gate/up 27.2 -> 26.0, down 26.3 -> 17.7. Workgroups of 64 invocations beat 128
and 256; 4 x 8 outputs per group beat 4 x 4 and 8 x 8; two k-quads per loop iteration
beat one and four (one: a prefill 3.12 ms against 2.57); 8 lanes per group suit k = 576
and 16 k = 1536 (LONG_K; 16 everywhere: 2.75 ms). Inside that prefill the q/k/v, o and down
products direct took its device time from 2.763 to 2.548 ms, then 2.379 with the down
product's partial sums in f32 accumulators; its gate/up product stays on split tiles
(`fits`).

What the split tiles do besides, this kernel does too:
- a deferred RMSNorm (rms_norm_matmul, NormPrologue.defer): A's loads apply the norm's
  weight, each lane sums the squares of the A elements it loads, the group adds them up
  and each output row is scaled by its 1 / rms at the end;
- a paired epilogue (Kernel.pair, SwiGLU of a gate/up product): a group's first 4 columns
  are product columns of the first half, its last 4 the same columns of the second half,
  and the reduce-scatter's order leaves each lane whole pairs;
- row writes (Kernel.writes, a KV-cache write of RoPE-ed rows): the workgroup's columns hold
  whole RoPE pairs, as the split tiles' do, and after a storage barrier it stores the rows
  elements anchored at the outputs it stored (matmul_simt._row_writes).
A Q4_1 weight stays on the split tiles, which decode each weight vec4 once per workgroup as
they stage it; here every lane would decode each one it reads (a prefill with Q4_1 weights
took 3.16 ms of device time against 2.66).

A layer norm (layer_norm_matmul), which cannot wait for the end, computes its rows'
statistics first (NormPrologue.statistics, in workgroup memory of its own: there is no
staging memory to lend it) and normalizes A as it is loaded.

`fits` says which products it takes: both operands contiguous along k (x @ W^T), buffers
read as vec4s, k a multiple of 4, and a split tile of at most MAX_TILE outputs; matmul.py
sends those of the products that would go to the split tiles here.
"""

from __future__ import annotations

import dataclasses
import math

from meganeura.backends.wgsl.kernels import SUBGROUP_BUILTINS, SUBGROUPS_ENABLE, KernelSource
from meganeura.backends.wgsl.matmul_operands import Matmul, kernel_source
from meganeura.backends.wgsl.matmul_simt import (
    _pair_columns,
    _pair_origin,
    _paired_rows,
    _row_writes,
    choose_tile,
)

WG = 64  # invocations per workgroup
RM, RN = 4, 8  # outputs of a group of lanes: rows of A x weight rows
TILE_ROWS = 16  # rows of A a workgroup covers: TILE_ROWS / RM groups along the rows
UNROLL = 2  # k-quads a lane loads per loop iteration
LONG_K = 1024  # from this k on, 16 lanes per group (else 8) and scalar partial sums
MAX_TILE = 16 * 32  # the largest split tile (outputs) whose products the direct kernel takes


@dataclasses.dataclass(frozen=True)
class Layout:
    """A workgroup's `rows` x `cols` outputs: groups of `lanes` invocations, each group
    RM x RN outputs. A lane keeps its partial sum of each output as a vec4 (four independent
    fma chains), or with `scalar` as an f32 (a dot of each pair of vec4s): on an H200, SmolLM2-135M's down product of a 128-token
    prompt (k = 1536, 16 lanes) took 21.5 us scalar against 27.5 in vec4s (a prefill's device
    time 2.543 -> 2.379 ms), while its q/k/v product (k = 576, 8 lanes) took 23.4 against
    20.9 (2.438 ms with every product scalar)."""

    lanes: int
    scalar: bool

    @property
    def col_groups(self) -> int:
        return WG // self.lanes // (TILE_ROWS // RM)

    @property
    def rows(self) -> int:
        return TILE_ROWS

    @property
    def cols(self) -> int:
        return self.col_groups * RN


def layout(K: int) -> Layout:
    long = K >= LONG_K
    return Layout(16 if long else 8, scalar=long)


def fits(mm: Matmul) -> bool:
    """Whether the direct kernel can run product `mm` (see the module docstring), and pays:
    where the split tiles would take tiles of at most MAX_TILE outputs. Larger split tiles
    read each operand fewer times over than the direct kernel's 16-row tiles; on an H200,
    a 128-token prompt's gate/up product (128 x 3072 over k = 576, 32 x 32 split tiles)
    stayed faster on them (a prefill's device time 2.548 ms against 2.570 with it direct)."""
    a, b, K = mm.a, mm.b, mm.K
    if a.s_col != 1 or b.s_row != 1 or K % 4 or K == 0 or a.computed:
        return False
    tile = choose_tile(mm.M, mm.N, mm.nbatch)
    if tile.rows * tile.cols > MAX_TILE:
        return False
    return mm.use_vec4(a, True) and mm.use_vec4(b, False)


def direct(mm: Matmul) -> KernelSource:
    """The direct kernel for product `mm` (which `fits`)."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    L = layout(K)
    S, TM, TN = L.lanes, L.rows, L.cols
    V, VS = RM * RN, RM * RN // L.lanes  # outputs of a group, of a lane after the reduce
    K4 = K // 4
    sums = bool(mm.plan.options.get("subgroup_sums"))
    H = N // 2 if mm.kernel.pair else 0
    write = mm.kernel.writes[0] if mm.kernel.writes else None
    Pd = write.pair if write is not None else 0
    paired = bool(H or Pd)
    # Tile column of a group's column j: plain, gn RN + j; paired (SwiGLU halves or RoPE
    # pairs), the group's first RN / 2 columns from the tile's first half, its last RN / 2
    # the same columns of the second half.
    half = TN // 2
    if paired:

        def tile_col(j: str) -> str:
            return (
                f"(gn * {RN // 2}u + ({j}) % {RN // 2}u + select(0u, {half}u, ({j}) >= {RN // 2}u))"
            )
    else:

        def tile_col(j: str) -> str:
            return f"(gn * {RN}u + {j})"

    # The product column of a tile column, which is also the weight row it reads.
    if Pd:
        column = _pair_columns(Pd, half)
    elif H:
        column = _paired_rows(H, half)
    else:

        def column(tc: str) -> str:
            return f"n0 + {tc}"

    deferred = mm.prologue is not None and mm.prologue.can_defer()
    if deferred:
        mm.prologue.defer()
    mm.bind.vector.add(mm.plan.buffer_of[a.base])
    mm.bind.vector.add(mm.plan.buffer_of[b.base])
    bt = dataclasses.replace(b, s_row=b.s_col, s_col=b.s_row)  # n rows along k

    lines = [
        f"  let bz = wid.z; let s = tid % {S}u; let g = tid / {S}u;",
        f"  let gm = g / {L.col_groups}u; let gn = g % {L.col_groups}u;",
        f"  let a0 = {a.origin(mm.batch)}; let b0 = {bt.origin(mm.batch)};",
        f"  let m0 = wid.y * {TM}u; let n0 = wid.x * {half if paired else TN}u;",
    ]
    lines.append(_pair_origin(Pd, half).rstrip("\n"))
    # A layer norm's statistics of the tile's rows, in workgroup memory of their own.
    lines.append("" if deferred else mm.row_statistics(TM, "m0", WG, "tid").rstrip("\n"))
    for i in range(RM):
        lines.append(
            f"  let ar{i} = (a0 + min(m0 + gm * {RM}u + {i}u, {M - 1}u) * {a.s_row}u) / 4u;"
        )
    for j in range(RN):
        row = f"min({column(tile_col(f'{j}u'))}, {N - 1}u)"
        lines.append(f"  let br{j} = (b0 + {row} * {bt.s_row}u) / 4u;")
    zero = "0.0f" if L.scalar else "vec4<f32>(0.0)"
    for i in range(RM):
        lines.append("  " + " ".join(f"var c{i}_{j} = {zero};" for j in range(RN)))
    if deferred:
        lines.append("  " + " ".join(f"var nm_sq{i} = 0.0f;" for i in range(RM)))
    step = S * UNROLL
    iterations = math.ceil(K4 / step)
    exact = K4 % step == 0
    loop = [f"  for (var kv = s; kv < {iterations * step}u; kv += {step}u) {{"]
    for u in range(UNROLL):
        k = f"kv + {u * S}u" if u else "kv"
        if not exact:
            loop.append(f"    let ok{u} = {k} < {K4}u; let kq{u} = min({k}, {K4 - 1}u);")
            k = f"kq{u}"
        for i in range(RM):
            # Past k (the last iteration's lanes beyond K4 read a clamped vec4) A is 0,
            # after any normalization (a layer norm's shift would make it nonzero).
            raw = f"vec4<f32>({a.buf}[ar{i} + {k}])"
            if deferred:
                if not exact:
                    raw = f"select(vec4<f32>(0.0), {raw}, ok{u})"
                loop.append(f"    let x{u}_{i} = {raw};")
                loop.append(f"    nm_sq{i} += {mm.prologue.square_sum(f'x{u}_{i}')};")
                raw = mm.load_a(f"x{u}_{i}", "0u", f"4u * ({k})", True)
            else:
                raw = mm.load_a(raw, f"gm * {RM}u + {i}u", f"4u * ({k})", True)
                if not exact:
                    raw = f"select(vec4<f32>(0.0), {raw}, ok{u})"
            loop.append(f"    let a{u}_{i} = {raw};")
        for j in range(RN):
            loop.append(f"    let w{u}_{j} = vec4<f32>({b.buf}[br{j} + {k}]);")
    for u in range(UNROLL):
        for i in range(RM):
            loop.append(
                "    "
                + " ".join(
                    f"c{i}_{j} += dot(a{u}_{i}, w{u}_{j});"
                    if L.scalar
                    else f"c{i}_{j} = fma(a{u}_{i}, w{u}_{j}, c{i}_{j});"
                    for j in range(RN)
                )
            )
    loop.append("  }")
    lines += loop

    # Slot order of the reduce-scatter: lane s keeps slots s VS .. s VS + VS - 1. Row-major,
    # or, under a paired epilogue, each column next to its partner.
    order = []
    for i in range(RM):
        if H:
            for j in range(RN // 2):
                order += [(i, j), (i, j + RN // 2)]
        else:
            order += [(i, j) for j in range(RN)]
    lines.append(
        "  "
        + " ".join(f"var out{t} = 0.0f;" for t in range(VS))
        + (" " + " ".join(f"var tot{i} = 0.0f;" for i in range(RM)) if deferred else "")
    )
    # A lane's partial sum of each output, in slot order.
    partials = [f"c{i}_{j}" if L.scalar else f"dot(c{i}_{j}, vec4<f32>(1.0))" for i, j in order]
    shuffle = _shuffle_reduce(partials, S, VS, deferred)
    shared = _shared_reduce(partials, S, VS, deferred)
    if sums:
        lines.append(f"  if (sg_size >= {S}u) {{\n{shuffle}  }} else {{\n{shared}  }}")
    else:
        lines.append(shared.rstrip("\n"))
    lines += _finish(mm, VS, M, N, H, tile_col, column, deferred)
    if write is not None:
        lines.append(_row_writes(mm, write, TM, TN, column, WG).rstrip("\n"))
    builtins = SUBGROUP_BUILTINS if sums else ""
    body = (
        f"@compute @workgroup_size({WG})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>,"
        f" @builtin(local_invocation_index) tid: u32{builtins}) {{\n"
        + "\n".join(line for line in lines if line)
        + "\n}\n"
    )
    memory = f"var<workgroup> dp_red: array<f32, {WG * (V + (RM if deferred else 0))}>;\n"
    grid = (math.ceil(N / TN), math.ceil(M / TM), mm.nbatch)
    return kernel_source(mm, body, grid, memory, SUBGROUPS_ENABLE if sums else "")


def _shuffle_reduce(partials: list[str], S: int, VS: int, deferred: bool) -> str:
    """The reduce-scatter through subgroup shuffles: at each exchange with the lane `m`
    apart, a lane keeps one half of its values (the upper where its bit m is set), adds its
    partner's copy of that half and sends the other; after log2(S) exchanges lane s holds the
    totals of slots s VS .. s VS + VS - 1. The squares of a deferred norm are summed whole."""
    lines, m, n = [], S // 2, 0
    for e, value in enumerate(partials):
        lines.append(f"    let r0_{e} = {value};")
    names = [f"r0_{e}" for e in range(len(partials))]
    while m >= 1:
        n += 1
        half = len(names) // 2
        lo, hi = names[:half], names[half:]
        lines.append(f"    let up{n} = (s & {m}u) != 0u;")
        for x in range(half):
            lines.append(
                f"    let r{n}_{x} = select({lo[x]}, {hi[x]}, up{n})"
                f" + subgroupShuffleXor(select({hi[x]}, {lo[x]}, up{n}), {m}u);"
            )
        names = [f"r{n}_{x}" for x in range(half)]
        m //= 2
    assert len(names) == VS
    lines += [f"    out{t} = {name};" for t, name in enumerate(names)]
    if deferred:
        for i in range(RM):
            lines.append(f"    tot{i} = nm_sq{i};")
            m = S // 2
            while m >= 1:
                lines.append(f"    tot{i} += subgroupShuffleXor(tot{i}, {m}u);")
                m //= 2
    return "\n".join(lines) + "\n"


def _shared_reduce(partials: list[str], S: int, VS: int, deferred: bool) -> str:
    """The same totals through workgroup memory: every lane stores its values, then lane s
    of a group adds the group's copies of slots s VS .. s VS + VS - 1 (and of the squares)."""
    V = len(partials)
    lines = [f"    dp_red[tid * {V}u + {e}u] = {value};" for e, value in enumerate(partials)]
    if deferred:
        lines += [f"    dp_red[{WG * V}u + tid * {RM}u + {i}u] = nm_sq{i};" for i in range(RM)]
    lines.append("    workgroupBarrier();")
    lines.append(f"    for (var l = 0u; l < {S}u; l++) {{")
    lines.append(f"      let at = (g * {S}u + l) * {V}u + s * {VS}u;")
    lines += [f"      out{t} += dp_red[at + {t}u];" for t in range(VS)]
    if deferred:
        lines += [
            f"      tot{i} += dp_red[{WG * V}u + (g * {S}u + l) * {RM}u + {i}u];" for i in range(RM)
        ]
    lines.append("    }")
    return "\n".join(lines) + "\n"


def _finish(mm, VS, M, N, H, tile_col, column, deferred) -> list[str]:
    """Lane s stores its VS totals: all of one row of its group (VS divides RN), through the
    epilogue, scaled by the row's 1 / rms under a deferred RMSNorm."""
    lines = [
        f"  let e0 = s * {VS}u;",
        f"  let gm_row = m0 + gm * {RM}u + e0 / {RN}u;",
    ]
    scale = ""
    if deferred:
        rows = " + ".join(f"select(0.0, tot{i}, e0 / {RN}u == {i}u)" for i in range(RM))
        lines.append(f"  let dp_rs = {mm.prologue.rstd(f'({rows})')};")
        scale = " * dp_rs"
    if H:
        store = mm.store_pair("lo_v", "hi_v", "idx", "    ")
        for p in range(VS // 2):
            lines += [
                f"  {{ let jj = (e0 % {RN}u) / 2u + {p}u; let gn_col = n0 + gn * {RN // 2}u + jj;",
                f"    if (gm_row < {M}u && gn_col < {H}u) {{",
                f"    let lo_v = out{2 * p}{scale}; let hi_v = out{2 * p + 1}{scale};",
                f"    let idx = bz * {M * H}u + gm_row * {H}u + gn_col;",
                store.rstrip("\n"),
                "  } }",
            ]
        return lines
    store = mm.store("acc_v", "idx", "    ")
    for t in range(VS):
        lines += [
            f"  {{ let gn_col = {column(tile_col(f'e0 % {RN}u + {t}u'))};",
            f"    if (gm_row < {M}u && gn_col < {N}u) {{",
            f"    let acc_v = out{t}{scale};",
            f"    let idx = bz * {M * N}u + gm_row * {N}u + gn_col;",
            store.rstrip("\n"),
            "  } }",
        ]
    return lines
