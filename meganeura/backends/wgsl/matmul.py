"""Matmul kernels: batched, strided operands (transposes and broadcasts read in place), with
the pointwise DAG that reads the product fused into the store (an epilogue).

Variants, chosen per kernel:
- GEMV, for a few rows (M <= GEMV_ROWS): each weight is read once, by invocations that read
  it contiguously (vec4 loads when the layout allows) and reduce in workgroup memory.
  Decoding, small-batch training and their backward passes land here.
- matrix units (subgroup matrices, f16 operands, f32 accumulation), when the executor's
  start-up check found them correct: f16 operands that tile exactly are loaded by the
  matrix loads themselves (73 TFLOP/s at 4096^3 on an H200). Operands staged through
  workgroup memory as f16 (any shape, and f32 operands under matmul_precision="high") are
  used only where the executor measured that staging beats the f32 kernels: on an H200
  through Dawn it did not (9.5 TFLOP/s against 32).
- tiled SIMT f32 otherwise: 128 x 128 tiles with 8 x 8 outputs per invocation for large
  products (32 TFLOP/s at 4096^3 on an H200), 64 x 64 tiles with 4 x 4 for the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meganeura.backends.wgsl.emit import STORAGE_TYPE, Emitter, prelude_for, store_value
from meganeura.backends.wgsl.kernels import KernelSource, _Bindings, archetype
from meganeura.backends.wgsl.norm_prologue import NormPrologue
from meganeura.lower.plan import Kernel, Plan, strided_view
from meganeura.ops.linalg import matmul_dims

GEMV_ROWS = 8
GEMV_UNROLL = 4  # weight loads in flight per invocation
BM, BN, BK = 64, 64, 16  # SIMT tile
LARGE, LARGE_BK = 128, 8  # SIMT tile of large products: 8 x 8 outputs per invocation
LARGE_TILES_MIN = 128  # enough 128 x 128 tiles to fill a GPU
LARGE_STAGING = 2 * 2 * LARGE_BK * LARGE * 4  # bytes of the large kernel's staged operands
WEBGPU_WORKGROUP_STORAGE = 16384  # workgroup memory every WebGPU device offers
# Matrix-unit tiles: one subgroup of 32 per workgroup (subgroup-matrix offsets must be
# uniform), computing a grid of 16 x 16 result matrices (rows, columns) over k steps of MU_BK.
MU_TILES = (4, 4)
MU_BK = 32
MU_PAD = 8  # f16 elements added to each staged row: fewer bank conflicts, rows stay 16-byte aligned
MU_DIRECT_F16 = True  # f16 operands that tile exactly are read by the matrix loads themselves
GEMV_COLUMN_LANES = 2  # vec4 lanes per weight row in the column GEMV: 32-byte pieces
MATRIX_UNIT_SYNTAXES = ("load_layout", "load_flag")


class _VecBindings(_Bindings):
    """Bindings where some buffers are declared as arrays of vec4 for 16-byte loads."""

    def __init__(self, plan: Plan, out_node: int):
        super().__init__(plan, out_node)
        self.vector: set[int] = set()

    def declarations(self) -> str:
        lines = []
        for n, buf in enumerate(self.order):
            access = "read_write" if n == 0 else "read"
            ty = STORAGE_TYPE[self.dtypes[buf]]
            if buf in self.vector:
                ty = f"vec4<{ty}>"
            lines.append(f"@group(0) @binding({n}) var<storage, {access}> buf{buf}: array<{ty}>;")
        return "\n".join(lines)


@dataclass
class _Operand:
    """op(X) as rows x cols of a buffer: element (r, c) of batch bz sits at
    origin + r * s_row + c * s_col."""

    base: int  # the materialized node whose buffer holds it
    buf: str
    s_row: int
    s_col: int
    offset: int
    batch_strides: list[int]

    def origin(self, batch: tuple[int, ...]) -> str:
        terms = [f"{self.offset}u"] if self.offset else []
        for d, (size, st) in enumerate(zip(batch, self.batch_strides, strict=True)):
            if size == 1 or st == 0:
                continue
            inner = math.prod(batch[d + 1 :])
            c = f"(bz / {inner}u)" if inner > 1 else "bz"
            if d > 0:
                c = f"({c} % {size}u)"
            terms.append(f"{c} * {st}u")
        return " + ".join(terms) or "0u"

    def aligned4(self, cols_contiguous: bool) -> bool:
        """Rows start on 16-byte boundaries and run contiguously: vec4 loads are possible."""
        strides = [self.s_row if cols_contiguous else self.s_col, self.offset, *self.batch_strides]
        return (self.s_col if cols_contiguous else self.s_row) == 1 and all(
            st % 4 == 0 for st in strides
        )


class _Matmul:
    """What every variant needs: sizes, operands, bindings and the epilogue."""

    def __init__(self, plan: Plan, kernel: Kernel):
        graph = plan.graph
        self.plan, self.kernel, self.graph = plan, kernel, graph
        self.core = kernel.core if kernel.core is not None else kernel.node
        self.node = graph.nodes[self.core]
        self.out_node = graph.nodes[kernel.node]
        # A norm_matmul op's inputs are x, the norm's parameters and b; it never transposes x.
        ta, tb = self.node.attrs.get("trans_a", False), self.node.attrs["trans_b"]
        a_id, b_id = self.node.inputs[0], self.node.inputs[-1]
        a_type, b_type = graph.nodes[a_id].type, graph.nodes[b_id].type
        self.batch, self.M, self.K, self.N = matmul_dims(a_type, b_type, ta, tb)
        self.nbatch = math.prod(self.batch)
        self.dtype = a_type.dtype
        self.bind = _VecBindings(plan, kernel.node)
        self.out = f"buf{self.bind.out_buffer}"
        self.a = self._operand(a_id, ta)
        self.b = self._operand(b_id, tb)
        self.prologue = None
        if self.node.op in ("rms_norm_matmul", "layer_norm_matmul"):
            a = self.a
            self.prologue = NormPrologue(
                plan, self.node, a.buf, a.s_row, a.s_col, self.M, self.K, self.bind.name_of
            )
        self.label = f"{self.node.op}%{self.core}" + (
            f"+{self.out_node.op}%{kernel.node}" if kernel.core is not None else ""
        )

    def _operand(self, nid: int, trans: bool) -> _Operand:
        base, strides, offset = strided_view(self.graph, nid, self.plan.materialized)
        shape = self.graph.nodes[nid].type.shape
        s_row, s_col = (strides[-1], strides[-2]) if trans else (strides[-2], strides[-1])
        lead = len(self.batch) - (len(shape) - 2)
        bstrides = [0] * lead + [0 if shape[d] == 1 else strides[d] for d in range(len(shape) - 2)]
        return _Operand(base, self.bind.name_of(base), s_row, s_col, offset, bstrides)

    def epilogue_reads(self) -> set[int]:
        """Buffers the epilogue loads (besides the product itself)."""
        if self.kernel.core is None:
            return set()
        out, stack, seen = set(), [self.kernel.node], set()
        while stack:
            i = stack.pop()
            if i in seen or i == self.core:
                continue
            seen.add(i)
            if i in self.plan.materialized and i != self.kernel.node:
                out.add(self.plan.buffer_of[i])
            else:
                stack.extend(self.graph.nodes[i].inputs)
        return out

    def use_vec4(self, operand: _Operand, cols_contiguous: bool) -> bool:
        buf = self.plan.buffer_of[operand.base]
        others = [o for o in (self.a, self.b) if self.plan.buffer_of[o.base] == buf]
        ok = all(o.aligned4(cols_contiguous) for o in others) and len(others) == 1
        scalar = self.epilogue_reads() | {self.bind.out_buffer}
        if self.prologue is not None:
            scalar |= {self.plan.buffer_of[p] for p in self.prologue.bases}
        return ok and buf not in scalar

    def load_a(self, value: str, row: str, k: str, vec: bool = False) -> str:
        """A's element as the product uses it: `value` (loaded, f32; with `vec` the vec4 of
        columns k..k+3) at tile row `row` and column `k`, normalized under a norm prologue."""
        return value if self.prologue is None else self.prologue.load(value, row, k, vec)

    def row_statistics(self, rows: int, first: str, threads: int, tid: str) -> str:
        """Statements computing the norm prologue's statistics of the `rows` rows of A from
        row `first` (the kernel's tile), before the main loop; empty without a prologue."""
        if self.prologue is None:
            return ""
        vec = self.plan.buffer_of[self.a.base] in self.bind.vector
        return self.prologue.statistics(rows, first, threads, tid, vec)

    def store(self, acc: str, idx: str, indent: str) -> str:
        """Statements writing product value `acc` (f32) at output index `idx`, through the
        epilogue when the kernel has one."""
        if self.kernel.core is None:
            value = (
                acc if self.out_node.type.dtype == "f32" else f"{self.out_node.type.dtype}({acc})"
            )
            return f"{indent}{self.out}[{idx}] = {value};\n"
        product = acc if self.dtype == "f32" else f"{self.dtype}({acc})"
        em = Emitter(
            self.graph,
            self.plan.materialized - {self.kernel.node},
            self.bind.name_of,
            indent,
            bound={self.core: f"mm_{idx}"},
        )
        value = em.value(self.kernel.node, idx)
        lines = [f"{indent}let mm_{idx} = {product};", *em.lines]
        lines.append(f"{indent}{self.out}[{idx}] = {store_value(value, self.out_node.type.dtype)};")
        return "\n".join(lines) + "\n"

    def assemble(self, body: str, shared: str = "", header: str = "") -> str:
        if self.prologue is not None:
            shared += self.prologue.shared
        decls = self.bind.declarations()
        if "f16" in body or "f16" in decls or "f16" in shared:
            header = "enable f16;\n" + header
        return f"{header}{decls}\n{shared}{prelude_for(body)}\n{body}"


@archetype("matmul")
def matmul(plan: Plan, kernel: Kernel) -> KernelSource:
    mm = _Matmul(plan, kernel)
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
    if math.ceil(mm.M / LARGE) * math.ceil(mm.N / LARGE) * mm.nbatch >= LARGE_TILES_MIN:
        # The large tiles stage 16 KiB, WebGPU's default workgroup memory: a norm prologue's
        # statistics need a device that offers more.
        storage = plan.options.get("workgroup_storage", WEBGPU_WORKGROUP_STORAGE)
        if mm.prologue is None or LARGE_STAGING + mm.prologue.shared_bytes(LARGE, 256) <= storage:
            return _tiled_large(mm)
    return _tiled(mm)


def _source(mm: _Matmul, body: str, grid, shared: str = "", header: str = "") -> KernelSource:
    return KernelSource(mm.assemble(body, shared, header), mm.bind.order, grid, mm.label)


# -- GEMV -----------------------------------------------------------------------------------


def _gemv_contiguous_k(mm: _Matmul) -> KernelSource:
    """Weights contiguous along k (x @ W^T with W [N, K], nn.Linear's layout): a team of 32
    invocations per output column reads its weight row in 16-byte pieces."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    vec = K % 4 == 0 and mm.use_vec4(b, False) and mm.use_vec4(a, True)
    if vec:
        mm.bind.vector |= {mm.plan.buffer_of[a.base], mm.plan.buffer_of[b.base]}
    step = 128 if vec else 32
    unroll = 4 if 4 * step <= K else 1

    def piece(k: str) -> str:
        if vec:
            w = f"{b.buf}[(brow + {k}) / 4u]"
            lines = [f"      let w_{k} = vec4<f32>({w});"]
            lines += [
                f"      acc{m} += dot({mm.load_a(x, f'{m}u', k, vec=True)}, w_{k});"
                for m in range(M)
                for x in [f"vec4<f32>({a.buf}[(a0 + {m * a.s_row}u + {k}) / 4u])"]
            ]
        else:
            lines = [f"      let w_{k} = f32({b.buf}[brow + {k} * {b.s_row}u]);"]
            lines += [
                f"      acc{m} += {mm.load_a(x, f'{m}u', k)} * w_{k};"
                for m in range(M)
                for x in [f"f32({a.buf}[a0 + {m * a.s_row}u + {k} * {a.s_col}u])"]
            ]
        return "\n".join(lines) + "\n"

    ks = [f"k{u}" for u in range(unroll)]
    main = "".join(f"      let k{u} = k + {u * step}u;\n" for u in range(unroll)) + "".join(
        piece(k) for k in ks
    )
    main_loop = (
        f"    for (; k + {(unroll - 1) * step}u < {K}u; k += {unroll * step}u) {{\n{main}    }}\n"
        if unroll > 1
        else ""
    )
    reduce_rows = "".join(f"  red[{m * 256}u + tid] = acc{m};\n" for m in range(M))
    tree = "".join(
        f"        red[{m * 256}u + tid] += red[{m * 256}u + tid + s];\n" for m in range(M)
    )
    grid_x = math.ceil(N / 8)
    body = f"""@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32) {{
  let team = tid / 32u; let lane = tid % 32u;
  let n = wid.x * 8u + team; let bz = wid.z;
  let a0 = {a.origin(mm.batch)};
  let brow = {b.origin(mm.batch)} + min(n, {N - 1}u) * {b.s_col}u;
{mm.row_statistics(M, "0u", 256, "tid")}{"".join(f"  var acc{m} = 0.0f;" + chr(10) for m in range(M))}  if (n < {N}u) {{
    var k = lane * {step // 32}u;
{main_loop}    for (; k < {K}u; k += {step}u) {{
{piece("k")}    }}
  }}
{reduce_rows}  workgroupBarrier();
  for (var s = 16u; s > 0u; s = s >> 1u) {{
    if (lane < s) {{
{tree}    }}
    workgroupBarrier();
  }}
  if (lane < {M}u && n < {N}u) {{
    let acc = red[lane * 256u + team * 32u];
    let idx = bz * {M * N}u + lane * {N}u + n;
{mm.store("acc", "idx", "    ")}  }}
}}
"""
    shared = f"var<workgroup> red: array<f32, {256 * M}>;\n"
    return _source(mm, body, (grid_x, 1, mm.nbatch), shared)


def _gemv_columns(mm: _Matmul) -> KernelSource:
    """Any other weight layout (W [K, N] rows, as in x @ W or dY @ W): neighbouring
    invocations read neighbouring columns (four at a time where rows are 16-byte aligned),
    and each workgroup splits k among many slices, reduced in workgroup memory."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    vec = N % 4 == 0 and mm.use_vec4(b, True)
    if vec:
        mm.bind.vector.add(mm.plan.buffer_of[b.base])
    width = 4 if vec else 1
    lanes = GEMV_COLUMN_LANES if vec else 8  # 32 bytes of a weight row: one memory sector
    slices = 256 // lanes
    cols = lanes * width
    vt = "vec4<f32>" if vec else "f32"
    if vec:
        weight = f"vec4<f32>({b.buf}[(b0 + k * {b.s_row}u) / 4u])"
    else:
        weight = f"f32({b.buf}[b0 + k * {b.s_row}u])"
    fmas = "".join(
        f"      acc{m} += {mm.load_a(x, f'{m}u', 'k')} * w;\n"
        for m in range(M)
        for x in [f"f32({a.buf}[a0 + {m * a.s_row}u + k * {a.s_col}u])"]
    )
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
    for (var k = ks; k < {K}u; k += {slices}u) {{
      let w = {weight};
{fmas}    }}
  }}
{"".join(reductions)}}}
"""
    shared = f"var<workgroup> red: array<{vt}, 256>;\n"
    return _source(mm, body, (math.ceil(N / cols), 1, mm.nbatch), shared)


# -- tiled SIMT -------------------------------------------------------------------------------


def _tiled(mm: _Matmul) -> KernelSource:
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    # Tile loads walk the operand's contiguous direction so neighbouring invocations read
    # neighbouring addresses.
    load_a = (
        "      let kk = e % 16u; let mm = e / 16u;\n"
        if a.s_col == 1
        else "      let mm = e % 64u; let kk = e / 64u;\n"
    )
    load_b = (
        "      let nn = e % 64u; let kk = e / 64u;\n"
        if b.s_col == 1 or b.s_row != 1
        else "      let kk = e % 16u; let nn = e / 16u;\n"
    )
    a_value = mm.load_a(f"f32({a.buf}[a0 + gm * {a.s_row}u + gk * {a.s_col}u])", "mm", "gk")
    body = f"""@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>,
        @builtin(local_invocation_index) tid: u32) {{
  let bz = wid.z;
  let a0 = {a.origin(mm.batch)};
  let b0 = {b.origin(mm.batch)};
  let m0 = wid.y * {BM}u;
  let n0 = wid.x * {BN}u;
{mm.row_statistics(BM, "m0", 256, "tid")}  var acc: array<f32, 16>;
  for (var k0 = 0u; k0 < {K}u; k0 += {BK}u) {{
    for (var l = 0u; l < 4u; l++) {{
      let e = tid + l * 256u;
{load_a}      let gm = m0 + mm; let gk = k0 + kk;
      var v = 0.0f;
      if (gm < {M}u && gk < {K}u) {{ v = {a_value}; }}
      As[kk * {BM}u + mm] = v;
    }}
    for (var l = 0u; l < 4u; l++) {{
      let e = tid + l * 256u;
{load_b}      let gk = k0 + kk; let gn = n0 + nn;
      var v = 0.0f;
      if (gk < {K}u && gn < {N}u) {{ v = f32({b.buf}[b0 + gk * {b.s_row}u + gn * {b.s_col}u]); }}
      Bs[kk * {BN}u + nn] = v;
    }}
    workgroupBarrier();
    for (var kk = 0u; kk < {BK}u; kk++) {{
      var ar: array<f32, 4>;
      var br: array<f32, 4>;
      for (var q = 0u; q < 4u; q++) {{
        ar[q] = As[kk * {BM}u + lid3.y + 16u * q];
        br[q] = Bs[kk * {BN}u + lid3.x + 16u * q];
      }}
      for (var p = 0u; p < 4u; p++) {{
        for (var q = 0u; q < 4u; q++) {{ acc[p * 4u + q] += ar[p] * br[q]; }}
      }}
    }}
    workgroupBarrier();
  }}
  for (var p = 0u; p < 4u; p++) {{
    let gm = m0 + lid3.y + 16u * p;
    for (var q = 0u; q < 4u; q++) {{
      let gn = n0 + lid3.x + 16u * q;
      if (gm < {M}u && gn < {N}u) {{
        let acc_pq = acc[p * 4u + q];
        let idx = bz * {M * N}u + gm * {N}u + gn;
{mm.store("acc_pq", "idx", "        ")}      }}
    }}
  }}
}}
"""
    shared = (
        f"var<workgroup> As: array<f32, {BK * BM}>;\nvar<workgroup> Bs: array<f32, {BK * BN}>;\n"
    )
    grid = (math.ceil(N / BN), math.ceil(M / BM), mm.nbatch)
    return _source(mm, body, grid, shared)


def _tiled_large(mm: _Matmul) -> KernelSource:
    """128 x 128 tiles, 8 x 8 outputs per invocation (two 4 x 4 blocks 64 apart in each
    direction, so the staged tiles are read as conflict-free vec4s), k in steps of 8 with two
    staging buffers: the next step's operands are fetched into registers while this step
    computes, and one barrier per step suffices."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    # op(B) is k x n; seen as n "rows" of k it stages exactly like op(A).
    bt = _Operand(b.base, b.buf, b.s_col, b.s_row, b.offset, b.batch_strides)
    steps = math.ceil(K / LARGE_BK)

    def operand(x: _Operand, name: str, rows: int, start: str):
        """Index lets, four guarded global loads into registers {name}0..3, and the store of
        those registers into stage `st` of the tile `name` ([k][128 / 4 vec4])."""
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
            v = f"f32({x.buf}[{origin} + min({start} + {r}, {rows - 1}u) * {x.s_row}u + {kk} * {x.s_col}u])"
            return mm.load_a(v, r, kk) if name == "As" else v

        loads = " ".join(
            f"{name}{i} = select(0.0, {value(r, k)}, {start} + {r} < {rows}u && k0 + {k} < {K}u);"
            for i, (r, k) in enumerate(at)
        )
        return index, loads, store

    ia, la, sa = operand(a, "As", M, "m0")
    ib, lb, sb = operand(bt, "Bs", N, "n0")
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
  let n0 = wid.x * {LARGE}u;
{mm.row_statistics(LARGE, "m0", 256, "tid")}  {ia}
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
  for (var ri = 0u; ri < 8u; ri++) {{
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
}}
"""
    shared = (
        f"var<workgroup> As: array<vec4<f32>, {2 * LARGE_BK * LARGE // 4}>;\n"
        f"var<workgroup> Bs: array<vec4<f32>, {2 * LARGE_BK * LARGE // 4}>;\n"
    )
    grid = (math.ceil(N / LARGE), math.ceil(M / LARGE), mm.nbatch)
    return _source(mm, body, grid, shared)


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


def _direct_operands(mm: _Matmul) -> bool:
    """f16 operands whose 16 x 16 blocks can be loaded straight from their buffers: whole
    tiles only, one unit stride each, other strides and origins 16-byte aligned."""
    tr, tc = MU_TILES
    if mm.dtype != "f16" or mm.M % (16 * tr) or mm.N % (16 * tc) or mm.K % 16:
        return False
    for x in (mm.a, mm.b):
        if 1 not in (x.s_row, x.s_col):
            return False
        other = x.s_col if x.s_row == 1 else x.s_row
        if any(st % 8 for st in (other, x.offset, *x.batch_strides)):
            return False
    return True


def _matrix_unit_store(mm: _Matmul, syntax: str, tr: int, tc: int) -> str:
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


def matrix_unit_direct(mm: _Matmul, syntax: str) -> KernelSource:
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
    accs = "".join(
        f"  var acc{i}_{j} = subgroup_matrix_result<f32, 16, 16>();\n"
        for i in range(tr)
        for j in range(tc)
    )
    body = f"""@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {{
  let bz = wid.z;
  let a0 = {a.origin(mm.batch)};
  let b0 = {b.origin(mm.batch)};
  let m0 = wid.y * {bm}u;
  let n0 = wid.x * {bn}u;
{accs}  for (var k = 0u; k < {K}u; k += 16u) {{
{chr(10).join(loads)}
{chr(10).join(mmas)}
  }}
{_matrix_unit_store(mm, syntax, tr, tc)}}}
"""
    shared = "var<workgroup> Cs: array<f32, 256>;\n"
    grid = (N // bn, M // bm, mm.nbatch)
    return _source(mm, body, grid, shared, MATRIX_UNIT_HEADER)


def _stage_f16(
    x: _Operand,
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
        value = f"f32({x.buf}[{origin} + gr * {x.s_row}u + gc * {x.s_col}u])"
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


def matrix_unit_kernel(mm: _Matmul, syntax: str) -> KernelSource:
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
    accs = "".join(
        f"  var acc{i}_{j} = subgroup_matrix_result<f32, 16, 16>();\n"
        for i in range(tr)
        for j in range(tc)
    )
    body = f"""@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lane: u32) {{
  let bz = wid.z;
  let a0 = {a.origin(mm.batch)};
  let b0 = {b.origin(mm.batch)};
  let m0 = wid.y * {bm}u;
  let n0 = wid.x * {bn}u;
{mm.row_statistics(bm, "m0", 32, "lane")}{accs}  for (var k0 = 0u; k0 < {K}u; k0 += {bk}u) {{
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
    return _source(mm, body, grid, shared, MATRIX_UNIT_HEADER)
