"""Matmuls on matrix units (subgroup matrices: f16 operands, f32 accumulation).

A workgroup of several subgroups computes a tile of the product. Each k step, all of its
invocations stage the operands' tiles in workgroup memory as f16 (16-byte loads along each
operand's contiguous direction where the layout allows, all issued before any store; f32
operands and a norm prologue's normalized rows are converted on the way), then each
subgroup multiplies its own block of 16 x 16 matrices out of them. Subgroups find their
block from the `subgroup_id` built-in: matrix loads want offsets the compiler knows to be
uniform across the subgroup. On an H200 through Dawn, 128 x 256 tiles of eight subgroups
run a 4096^3 f16 product at ~155 TFLOP/s, against ~74 for one subgroup per workgroup
loading its operands straight from storage, and ~9.5 for one subgroup staging them alone.

Results go straight to the output by the matrix stores where whole tiles land in an f32
output with no epilogue; otherwise through a 16 x 16 scratch tile per subgroup, so the store
can bound-check and run the epilogue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meganeura.backends.wgsl.kernels import KernelSource
from meganeura.backends.wgsl.matmul_operands import Matmul, Operand, kernel_source

MATRIX_UNIT_SYNTAXES = ("load_layout", "load_flag")
SUBGROUP = 32  # invocations per subgroup the tiles assume (the start-up check verifies it)
PAD = 8  # f16 elements added to each staged row: fewer bank conflicts, rows stay 16-byte aligned
WORKGROUP_STORAGE = 32768  # bytes of workgroup memory a kernel may use unless told more
MU_WORKGROUPS = 264  # two workgroups for each SM of a large GPU (132 on an H200)
HEADER = (
    "enable subgroups;\nenable chromium_experimental_subgroup_matrix;\nrequires subgroup_id;\n"
    "diagnostic(off, chromium_experimental.subgroup_matrix_uniformity);\n"
)


@dataclass(frozen=True)
class UnitTile:
    """A workgroup's rows x cols block of the product, staged `depth` k at a time, computed by
    a grid of sub_rows x sub_cols subgroups, each owning an equal block of 16 x 16 matrices."""

    rows: int
    cols: int
    depth: int
    sub_rows: int
    sub_cols: int

    @property
    def threads(self) -> int:
        return SUBGROUP * self.sub_rows * self.sub_cols

    @property
    def matrices(self) -> tuple[int, int]:
        """16 x 16 result matrices per subgroup, (rows, cols)."""
        return self.rows // self.sub_rows // 16, self.cols // self.sub_cols // 16

    def storage(self, scratch: bool) -> int:
        """Bytes of workgroup memory: both staged tiles (f16) and the f32 scratch tiles."""
        staged = 2 * (self.rows * (self.depth + PAD) + self.depth * (self.cols + PAD))
        return staged + (4 * 256 * self.sub_rows * self.sub_cols if scratch else 0)


# Largest first. Measured at 4096^3 f16 on an H200 (one subgroup = 16 x 16 matrices):
# 128 x 256 by 2 x 4 subgroups of 4 x 4 matrices 155-157 TFLOP/s, 64 x 128 by 2 x 2 of 2 x 4
# 151-152; 128 x 128 by 2 x 2 of 4 x 4 132-138.
UNIT_TILES = (
    UnitTile(128, 256, 32, 2, 4),
    UnitTile(128, 256, 16, 2, 4),
    UnitTile(64, 128, 32, 2, 2),
    UnitTile(64, 64, 32, 2, 2),
)


def choose_unit_tile(
    mm: Matmul, budget: int, tiles: tuple[UnitTile, ...] = UNIT_TILES
) -> tuple[UnitTile, bool]:
    """The largest tile that fits the workgroup memory and still makes MU_WORKGROUPS
    workgroups (else the smallest that fits), and whether the matrix stores write its
    results straight to the output: small products spread over every SM."""
    fitting = []
    for tile in tiles:
        direct = _direct_store(mm, tile)
        if tile.storage(not direct) <= budget:
            fitting.append((tile, direct))
    if not fitting:
        raise ValueError(f"{mm.label}: no matrix-unit tile fits {budget} bytes of workgroup memory")
    for tile, direct in fitting:
        if math.ceil(mm.M / tile.rows) * math.ceil(mm.N / tile.cols) * mm.nbatch >= MU_WORKGROUPS:
            return tile, direct
    return fitting[-1]


def matrix_load(
    syntax: str, kind: str, ptr: str, offset: str, stride: int, col_major: bool = False
) -> str:
    ty = f"subgroup_matrix_{kind}<f16, 16, 16>"
    if syntax == "load_flag":
        return f"subgroupMatrixLoad<{ty}>(&{ptr}, {offset}, {str(col_major).lower()}, {stride}u)"
    layout = "col_major" if col_major else "row_major"
    return f"subgroupMatrixLoad<{ty}, {layout}>(&{ptr}, {offset}, {stride}u)"


def matrix_store(syntax: str, ptr: str, offset: str, value: str, stride: int) -> str:
    if syntax == "load_flag":
        return f"subgroupMatrixStore(&{ptr}, {offset}, {value}, false, {stride}u)"
    return f"subgroupMatrixStore<row_major>(&{ptr}, {offset}, {value}, {stride}u)"


def _stage(
    mm: Matmul,
    x: Operand,
    vec: bool,
    name: str,
    stride: int,
    tile: tuple[int, int],
    at: tuple[str, str],
    limits: tuple[int, int],
    origin: str,
    threads: int,
    normalize: bool,
) -> tuple[str, str]:
    """(loads, stores): straight-line statements staging the rows x cols tile of x at
    (row0, col0) into the f16 array `name` ([row][col], row stride `stride`), zero outside
    `limits`. Every invocation first loads its share into registers, then stores it. With
    `vec`, four elements along x's contiguous direction per load; `normalize` passes the
    values through the norm prologue (A only)."""
    (rows, cols), (row0, col0), (row_limit, col_limit) = tile, at, limits
    along_cols = x.s_col == 1 if vec else True
    width = 4 if vec else 1
    count = rows * cols // width
    per = math.ceil(count / threads)
    exact = row_limit % rows == 0 and col_limit % cols == 0
    loads, stores = [], []
    ty = "vec4<f32>" if vec else "f32"
    for i in range(per):
        e = f"(tid + {i * threads}u)"
        if along_cols:
            r, c = f"({e} / {cols // width}u)", f"(({e} % {cols // width}u) * {width}u)"
        else:
            r, c = f"(({e} % {rows // width}u) * {width}u)", f"({e} / {rows // width}u)"
        gr, gc = f"({row0} + {r})", f"({col0} + {c})"
        index = f"{origin} + {gr} * {x.s_row}u + {gc} * {x.s_col}u"
        value = f"{ty}({x.buf}[({index}) / 4u])" if vec else x.at(index)
        if normalize:
            value = mm.load_a(value, r, gc, vec)
        conditions = []
        if count % threads and i == per - 1:
            conditions.append(f"{e} < {count}u")
        if not exact:
            conditions += [f"{gr} < {row_limit}u", f"{gc} < {col_limit}u"]
        if conditions:
            loads.append(
                f"    var {name}v{i} = {ty}(0.0);\n"
                f"    if ({' && '.join(conditions)}) {{ {name}v{i} = {value}; }}\n"
            )
        else:
            loads.append(f"    let {name}v{i} = {value};\n")
        guard = f"if ({e} < {count}u) " if count % threads and i == per - 1 else ""
        if not vec:
            stores.append(f"    {guard}{{ {name}[{r} * {stride}u + {c}] = f16({name}v{i}); }}\n")
            continue
        if along_cols:
            places = [f"{r} * {stride}u + {c} + {j}u" for j in range(4)]
        else:
            places = [f"({r} + {j}u) * {stride}u + {c}" for j in range(4)]
        parts = " ".join(f"{name}[p{j}] = f16({name}v{i}.{ch});" for j, ch in enumerate("xyzw"))
        lets = " ".join(f"let p{j} = {p};" for j, p in enumerate(places))
        stores.append(f"    {guard}{{ {lets} {parts} }}\n")
    return "".join(loads), "".join(stores)


def _vec_a(mm: Matmul) -> bool:
    a = mm.a
    if a.s_col == 1:
        return mm.K % 4 == 0 and mm.use_vec4(a, True)
    return mm.prologue is None and mm.M % 4 == 0 and mm.use_vec4(a, False)


def _vec_b(mm: Matmul) -> bool:
    b = mm.b
    if b.s_col == 1:
        return mm.N % 4 == 0 and mm.use_vec4(b, True)
    return b.s_row == 1 and mm.K % 4 == 0 and mm.use_vec4(b, False)


def _direct_store(mm: Matmul, tile: UnitTile) -> bool:
    """Whole tiles into an f32 output with no epilogue: the matrix stores write it."""
    out_dtype = mm.graph.nodes[mm.kernel.node].type.dtype
    return (
        mm.kernel.core is None
        and out_dtype == "f32"
        and mm.M % tile.rows == 0
        and mm.N % tile.cols == 0
        and mm.bind.out_buffer not in mm.bind.vector
    )


def matrix_unit_kernel(mm: Matmul, syntax: str, budget: int = WORKGROUP_STORAGE) -> KernelSource:
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    tile, direct = choose_unit_tile(mm, budget, mm.plan.options.get("unit_tiles", UNIT_TILES))
    bm, bn, bk = tile.rows, tile.cols, tile.depth
    tr, tc = tile.matrices
    AS, BS = bk + PAD, bn + PAD
    vec_a, vec_b = _vec_a(mm), _vec_b(mm)
    for vec, x in ((vec_a, a), (vec_b, b)):
        if vec:
            mm.bind.vector.add(mm.plan.buffer_of[x.base])
    statistics = mm.row_statistics(bm, "m0", tile.threads, "tid")
    # op(B) is k x n; staged as [k][n] it is the tile of rows k and columns n.
    load_a, store_a = _stage(
        mm, a, vec_a, "As", AS, (bm, bk), ("m0", "k0"), (M, K), "a0", tile.threads, True
    )
    load_b, store_b = _stage(
        mm, b, vec_b, "Bs", BS, (bk, bn), ("k0", "n0"), (K, N), "b0", tile.threads, False
    )
    mma = []
    for kk in range(0, bk, 16):
        mma.append("    {")
        for i in range(tr):
            offset = f"(sm + {16 * i}u) * {AS}u + {kk}u"
            mma.append(f"      let l{i} = {matrix_load(syntax, 'left', 'As', offset, AS)};")
        for j in range(tc):
            offset = f"{kk * BS}u + sn + {16 * j}u"
            mma.append(f"      let r{j} = {matrix_load(syntax, 'right', 'Bs', offset, BS)};")
        for i in range(tr):
            for j in range(tc):
                mma.append(
                    f"      acc{i}_{j} = subgroupMatrixMultiplyAccumulate(l{i}, r{j}, acc{i}_{j});"
                )
        mma.append("    }")
    accumulators = "".join(
        f"  var acc{i}_{j} = subgroup_matrix_result<f32, 16, 16>();\n"
        for i in range(tr)
        for j in range(tc)
    )
    body = f"""@compute @workgroup_size({tile.threads})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32,
        @builtin(subgroup_id) sg: u32, @builtin(subgroup_invocation_id) lane: u32) {{
  let bz = wid.z;
  let a0 = {a.origin(mm.batch)};
  let b0 = {b.origin(mm.batch)};
  let m0 = wid.y * {bm}u;
  let n0 = wid.x * {bn}u;
  let sm = (sg / {tile.sub_cols}u) * {16 * tr}u;
  let sn = (sg % {tile.sub_cols}u) * {16 * tc}u;
{statistics}{accumulators}  for (var k0 = 0u; k0 < {K}u; k0 += {bk}u) {{
{load_a}{load_b}{store_a}{store_b}    workgroupBarrier();
{chr(10).join(mma)}
    workgroupBarrier();
  }}
{_store(mm, syntax, tr, tc, direct)}}}
"""
    shared = (
        f"var<workgroup> As: array<f16, {bm * AS}>;\nvar<workgroup> Bs: array<f16, {bk * BS}>;\n"
    )
    if not direct:
        shared += f"var<workgroup> Cs: array<f32, {256 * tile.sub_rows * tile.sub_cols}>;\n"
    grid = (math.ceil(N / bn), math.ceil(M / bm), mm.nbatch)
    return kernel_source(mm, body, grid, shared, HEADER)


def _store(mm: Matmul, syntax: str, tr: int, tc: int, direct: bool) -> str:
    """Each subgroup's result matrices into the output: by the matrix stores, or through its
    16 x 16 scratch tile (the store bound-checks and runs the epilogue)."""
    M, N = mm.M, mm.N
    stores = []
    for i in range(tr):
        for j in range(tc):
            row, col = f"(m0 + sm + {16 * i}u)", f"(n0 + sn + {16 * j}u)"
            if direct:
                offset = f"bz * {M * N}u + {row} * {N}u + {col}"
                stores.append(f"  {matrix_store(syntax, mm.out, offset, f'acc{i}_{j}', N)};\n")
                continue
            stores.append(
                f"""  {matrix_store(syntax, "Cs", "sg * 256u", f"acc{i}_{j}", 16)};
  workgroupBarrier();
  for (var t = 0u; t < 256u; t += {SUBGROUP}u) {{
    let e = t + lane;
    let gm = {row} + e / 16u;
    let gn = {col} + e % 16u;
    if (gm < {M}u && gn < {N}u) {{
      let acc = Cs[sg * 256u + e];
      let idx = bz * {M * N}u + gm * {N}u + gn;
{mm.store("acc", "idx", "      ")}    }}
  }}
  workgroupBarrier();
"""
            )
    return "".join(stores)
