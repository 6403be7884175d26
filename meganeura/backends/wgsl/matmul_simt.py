"""Tiled SIMT f32 matmuls (any operand dtype, f32 accumulation)."""

from __future__ import annotations

import math

from meganeura.backends.wgsl.kernels import KernelSource
from meganeura.backends.wgsl.matmul_operands import Matmul, Operand, kernel_source

BM, BN, BK = 64, 64, 16  # SIMT tile
LARGE, LARGE_BK = 128, 8  # SIMT tile of large products: 8 x 8 outputs per invocation
LARGE_TILES_MIN = 128  # enough 128 x 128 tiles to fill a GPU


def tiled(mm: Matmul) -> KernelSource:
    """128 x 128 tiles where there are enough of them to fill a GPU, 64 x 64 otherwise."""
    if math.ceil(mm.M / LARGE) * math.ceil(mm.N / LARGE) * mm.nbatch >= LARGE_TILES_MIN:
        return _tiled_large(mm)
    return _tiled(mm)


def _tiled(mm: Matmul) -> KernelSource:
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
    body = f"""@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>,
        @builtin(local_invocation_index) tid: u32) {{
  let bz = wid.z;
  let a0 = {a.origin(mm.batch)};
  let b0 = {b.origin(mm.batch)};
  let m0 = wid.y * {BM}u;
  let n0 = wid.x * {BN}u;
  var acc: array<f32, 16>;
  for (var k0 = 0u; k0 < {K}u; k0 += {BK}u) {{
    for (var l = 0u; l < 4u; l++) {{
      let e = tid + l * 256u;
{load_a}      let gm = m0 + mm; let gk = k0 + kk;
      var v = 0.0f;
      if (gm < {M}u && gk < {K}u) {{ v = f32({a.buf}[a0 + gm * {a.s_row}u + gk * {a.s_col}u]); }}
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
    return kernel_source(mm, body, grid, shared)


def _tiled_large(mm: Matmul) -> KernelSource:
    """128 x 128 tiles, 8 x 8 outputs per invocation (two 4 x 4 blocks 64 apart in each
    direction, so the staged tiles are read as conflict-free vec4s), k in steps of 8 with two
    staging buffers: the next step's operands are fetched into registers while this step
    computes, and one barrier per step suffices."""
    M, K, N = mm.M, mm.K, mm.N
    a, b = mm.a, mm.b
    # op(B) is k x n; seen as n "rows" of k it stages exactly like op(A).
    bt = Operand(b.base, b.buf, b.s_col, b.s_row, b.offset, b.batch_strides)
    steps = math.ceil(K / LARGE_BK)

    def operand(x: Operand, name: str, rows: int, start: str):
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
        loads = " ".join(
            f"{name}{i} = select(0.0, f32({x.buf}[{origin} + min({start} + {r}, {rows - 1}u) * {x.s_row}u"
            f" + min(k0 + {k}, {K - 1}u) * {x.s_col}u]), {start} + {r} < {rows}u && k0 + {k} < {K}u);"
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
  {ia}
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
    return kernel_source(mm, body, grid, shared)
