"""Kernels reading GGUF-quantized weights (meganeura.ops.quant) straight from their blocks.

Bytes are read out of the u32 words holding them; an f16 scale sits at an even byte offset,
so it is one half of a word. `dequantize` is inlined into its readers, one value per read.
`quantized_matmul` gives each workgroup 8 output features (weight rows; 4 or 2 where 8 would
launch fewer than 256 workgroups) and a tile of rows of x; its 32 lanes per feature take
turns over the blocks of the weight row (Q4_1: over its nibble words), decode them once and
dot them with every row of the tile, and a sum across the lanes finishes (subgroup sums where
the executor's start-up check passed, see kernels.SUBGROUP_BUILTINS; else a tree in
workgroup memory). `rms_norm_quantized_matmul` first computes 1/rms of its rows of x and
normalizes x as it reads it (four columns at a time where x is bound as vec4s).
"""

from __future__ import annotations

import math

from meganeura.backends.wgsl.blocks import q4_1_nibbles, raw_words
from meganeura.backends.wgsl.emit import Emitter, inline_value, literal
from meganeura.backends.wgsl.kernels import (
    SUBGROUP_BUILTINS,
    SUBGROUPS_ENABLE,
    KernelSource,
    _assemble,
    _pointwise,
    archetype,
    epilogue_buffers,
    operand_view,
    product_store,
)
from meganeura.backends.wgsl.matmul_operands import VecBindings
from meganeura.lower.plan import Kernel, Plan, strided_view
from meganeura.ops.quant import BLOCK, QUANT_LAYOUTS

OUTPUTS = 8  # weight rows per workgroup, fewer (down to 2) where that leaves few workgroups
WORKGROUPS = 256  # two for each SM of a large GPU: a short product is one round of them
LANES = 32  # threads sharing one weight row
MAX_TILE = 8  # rows of x per workgroup
UNROLLED_ROUNDS = 8  # Q4_1 rows of up to 8 words per lane are read in straight-line code


def _byte(buf: str, b: str) -> str:
    return f"(({buf}[({b}) >> 2u] >> ((({b}) & 3u) * 8u)) & 0xffu)"


def _half(buf: str, b: str) -> str:
    return f"unpack2x16float({buf}[({b}) >> 2u])[(({b}) >> 1u) & 1u]"


def _value(qtype: str, buf: str, base: str, j: str) -> str:
    """Value `j` (0..31) of the block starting at byte `base`."""
    if qtype == "Q8_0":
        q = _byte(buf, f"{base} + 2u + {j}")
        return f"({_half(buf, base)} * f32(bitcast<i32>({q} << 24u) >> 24u))"
    start = 2 if qtype == "Q4_0" else 4
    packed = _byte(buf, f"{base} + {start}u + ({j} & 15u)")
    nibble = f"f32(select({packed} >> 4u, {packed} & 15u, {j} < 16u))"
    if qtype == "Q4_0":
        return f"(({nibble} - 8.0) * {_half(buf, base)})"
    return f"({nibble} * {_half(buf, base)} + {_half(buf, f'{base} + 2u')})"


# A dequantized weight that must be stored (a matmul operand, in a backward pass) is computed
# by the pointwise kernel.
archetype("dequantize")(_pointwise)


@inline_value("dequantize")
def _dequantize(em: Emitter, node, idx: str) -> str:
    qtype = node.attrs["qtype"]
    rows, cols = node.attrs["shape"]
    raw, offset = raw_words(em.graph, node, em.materialized)
    buf = em.binding_of(raw)
    r = em.index(Emitter.coord(idx, (rows, cols), 0))
    c = em.index(Emitter.coord(idx, (rows, cols), 1))
    row_bytes = cols // BLOCK * QUANT_LAYOUTS[qtype]
    start = f"{4 * offset}u + " if offset else ""
    base = em.index(f"{start}{r} * {row_bytes}u + ({c} / {BLOCK}u) * {QUANT_LAYOUTS[qtype]}u")
    j = em.index(f"{c} % {BLOCK}u")
    return _value(qtype, buf, base, j)


def _row_offset(var: str, shape, strides, offset: int) -> str:
    """Where row `var` (a linear index over the leading dims `shape`) of a strided x starts."""
    terms = [f"{offset}u"] if offset else []
    for d, (size, stride) in enumerate(zip(shape, strides, strict=True)):
        if size > 1 and stride:
            terms.append(f"{Emitter.coord(var, shape, d)} * {stride}u")
    return " + ".join(terms) or "0u"


def _dot_loop(qtype: str, w: str, x_at, blocks: int, tile: int, x_vec4=None) -> str:
    """The lanes' loop over weight row n, adding its dot products with the tile's rows of x
    into acc. Q4_1 blocks are whole words (the f16 pair d, m, then four words of nibbles), so
    a lane takes one nibble word at a time: values 4c..4c+3 (low nibbles) and 16+4c..19+4c
    (high), summed as d * (q . x) + m * sum(x). Other types go a block per lane, value by
    value. `x_at(k)` is the WGSL value of x at column k of row slot t; `x_vec4(k)`, where it
    gives one, columns k..k+3 in one load."""
    if qtype != "Q4_1":
        return f"""    for (var blk = lane; blk < {blocks}u; blk += {LANES}u) {{
      let base = n * {blocks * QUANT_LAYOUTS[qtype]}u + blk * {QUANT_LAYOUTS[qtype]}u;
      for (var j = 0u; j < {BLOCK}u; j++) {{
        let v = {_value(qtype, w, "base", "j")};
        let k = blk * {BLOCK}u + j;
        for (var t = 0u; t < {tile}u; t++) {{ acc[t] += v * {x_at("k")}; }}
      }}
    }}
"""
    words = QUANT_LAYOUTS[qtype] // 4

    def x4(k: str) -> str:
        whole = x_vec4(k) if x_vec4 is not None else None
        return whole or "vec4<f32>(" + ", ".join(x_at(f"{k} + {c}u") for c in range(4)) + ")"

    units = blocks * 4

    def load(u: str, n: str) -> str:
        """Word u of the row: the f16 pair d, m of its block (dm<n>) and its nibbles (q<n>)."""
        return (
            f"let base{n} = n * {blocks * words}u + ({u} / 4u) * {words}u;\n"
            f"let dm{n} = unpack2x16float({w}[base{n}]);\n"
            f"let q{n} = {w}[base{n} + 1u + {u} % 4u];\n"
        )

    def accumulate(u: str, n: str) -> str:
        """Add word u's values (loaded as dm<n>, q<n>) times x to acc, for every row slot."""
        return (
            f"let q = q{n}; let dm = dm{n}; let k = ({u} / 4u) * {BLOCK}u + 4u * ({u} % 4u);\n"
            f"let lo = {q4_1_nibbles('q')};\n"
            f"let hi = {q4_1_nibbles('(q >> 4u)')};\n"
            f"for (var t = 0u; t < {tile}u; t++) {{\n"
            f"  let xl = {x4('k')};\n"
            f"  let xh = {x4('k + 16u')};\n"
            "  acc[t] += dm.x * (dot(lo, xl) + dot(hi, xh)) + dm.y * dot(xl + xh, vec4<f32>(1.0));\n"
            "}\n"
        )

    def indent(text: str, by: str) -> str:
        return "".join(by + line + "\n" for line in text.splitlines())

    rounds = math.ceil(units / LANES)
    if rounds <= UNROLLED_ROUNDS:
        # Short rows (decoding's projections): every lane's words are loaded first, in
        # straight-line code, so the row costs one round trip to memory.
        loads, uses = [], []
        for i in range(rounds):
            u = f"u{i}"
            loads.append(f"    let {u} = min(lane + {i * LANES}u, {units - 1}u);\n")
            loads.append(indent(load(u, str(i)), "    "))
            guard = f"lane + {i * LANES}u < {units}u" if (i + 1) * LANES > units else "true"
            uses.append(f"    if ({guard}) {{\n{indent(accumulate(u, str(i)), '      ')}    }}\n")
        return "".join(loads) + "".join(uses)
    return (
        f"    for (var u = lane; u < {units}u; u += {LANES}u) {{\n"
        + indent(load("u", "0") + accumulate("u", "0"), "      ")
        + "    }\n"
    )


@archetype("quantized_matmul")
def _quantized_matmul(plan: Plan, kernel: Kernel) -> KernelSource:
    graph = plan.graph
    node = graph.nodes[kernel.node if kernel.core is None else kernel.core]
    x_id, raw_id = node.inputs[0], node.inputs[-1]
    qtype = node.attrs["qtype"]
    N, K = node.attrs["shape"]
    x_shape = graph.nodes[x_id].type.shape
    M = math.prod(x_shape[:-1])
    b = VecBindings(plan, kernel.node)
    out = f"buf{b.out_buffer}"
    # x_base None: x is computed as it is read (OpDef.computed_inputs), at its linear index.
    x_base, x_strides, x_offset, xb, functions = operand_view(plan, x_id, b.name_of)
    w = b.name_of(raw_id)
    row_offset = _row_offset("m", x_shape[:-1], x_strides[:-1], x_offset)
    tile = min(M, MAX_TILE)
    # x read four columns at a time where its rows are contiguous and 16-byte aligned (and
    # its buffer is not the output's, which the epilogue may read as scalars).
    x_buf = None if x_base is None else plan.buffer_of[x_base]
    vec = (
        x_base is not None
        and qtype == "Q4_1"
        and x_strides[-1] == 1
        and all(st % 4 == 0 for st in (x_offset, *x_strides[:-1]))
        and x_buf != b.out_buffer
        and x_buf not in {plan.buffer_of[i] for i in node.inputs[1:]}
        and x_buf not in epilogue_buffers(plan, kernel)
    )
    if vec:
        b.vector.add(x_buf)
    outputs = OUTPUTS
    while outputs > 2 and math.ceil(N / outputs) * math.ceil(M / tile) < WORKGROUPS:
        outputs //= 2
    grid = (math.ceil(N / outputs), math.ceil(M / tile), 1)
    blocks = K // BLOCK
    step = x_strides[-1]

    def x_at(k: str) -> str:
        if vec:
            return f"{xb}[(rows[t] + {k}) / 4u][(rows[t] + {k}) % 4u]"
        at = f"rows[t] + ({k}) * {step}u"
        return f"{xb}({at})" if x_base is None else f"{xb}[{at}]"

    def x_vec4(k: str) -> str | None:  # x at columns k..k+3 (k a multiple of 4) as one load
        return f"{xb}[(rows[t] + {k}) / 4u]" if vec else None

    sums = bool(plan.options.get("subgroup_sums"))
    statistics = ""
    if node.op == "rms_norm_quantized_matmul":
        # RMSNorm of the tile's rows of x, applied as x is read: 1/rms of each row first
        # (the workgroup's invocations over its columns, summed across them in `red`).
        eps = literal(node.attrs["eps"], "f32")
        squares = f"for (var k = slot; k < {K}u; k += {outputs * LANES}u) {{ let v = {x_at('k')}; q += v * v; }}"
        if vec:  # K is whole blocks of 32: rows of vec4s
            squares = (
                f"for (var k = 4u * slot; k < {K}u; k += {4 * outputs * LANES}u) "
                f"{{ let v = {x_vec4('k')}; q += dot(v, v); }}"
            )
        statistics = f"""  var rstd: array<f32, {tile}>;
  for (var t = 0u; t < {tile}u; t++) {{
    var q = 0.0;
    {squares}
{_sum("q", "total", outputs * LANES, "slot", "0u", sums)}    rstd[t] = inverseSqrt(total / {float(K)!r} + {eps});
    workgroupBarrier();
  }}
"""
        plain, plain_vec4 = x_at, x_vec4
        gamma = None
        if len(node.inputs) == 3:
            g_base, g_strides, g_offset = strided_view(graph, node.inputs[1], plan.materialized)
            gamma = (b.name_of(g_base), g_offset, g_strides[-1])

        def weight(k: str) -> str:
            gb, offset, stride = gamma
            return f"{gb}[{offset}u + ({k}) * {stride}u]"

        def x_at(k: str) -> str:
            scale = "rstd[t]" if gamma is None else f"rstd[t] * {weight(k)}"
            return f"({plain(k)} * {scale})"

        def x_vec4(k: str) -> str | None:  # four columns of x normalized at once
            whole = plain_vec4(k)
            if whole is None:
                return None
            if gamma is None:
                return f"({whole} * rstd[t])"
            weights = ", ".join(weight(f"{k} + {c}u") for c in range(4))
            return f"({whole} * rstd[t] * vec4<f32>({weights}))"

    body = f"""var<workgroup> red: array<f32, {outputs * LANES}>;
fn x_row(m: u32) -> u32 {{ return {row_offset}; }}
@compute @workgroup_size({LANES}, {outputs})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>{SUBGROUP_BUILTINS if sums else ""}) {{
  let lane = lid.x;
  let slot = lid.y * {LANES}u + lane;
  let n = wid.x * {outputs}u + lid.y;
  let m0 = wid.y * {tile}u;
  var rows: array<u32, {tile}>;
  for (var t = 0u; t < {tile}u; t++) {{ rows[t] = x_row(min(m0 + t, {M - 1}u)); }}
{statistics}  var acc: array<f32, {tile}>;
  if (n < {N}u) {{
{_dot_loop(qtype, w, x_at, blocks, tile, x_vec4)}  }}
  for (var t = 0u; t < {tile}u; t++) {{
{_sum("acc[t]", "total", LANES, "lane", "slot - lane", sums)}    if (lane == 0u && n < {N}u && m0 + t < {M}u) {{
      let idx = (m0 + t) * {N}u + n;
{product_store(plan, kernel, b.name_of, out, "total", "idx", "      ")}    }}
    workgroupBarrier();
  }}
}}
"""
    label = f"{node.op}%{node.id}"
    if kernel.core is not None:
        label += f"+{graph.nodes[kernel.node].op}%{kernel.node}"
    text = _assemble(b, body + functions)
    return KernelSource((SUBGROUPS_ENABLE if sums else "") + text, b.order, grid, label)


def _sum(value: str, name: str, size: int, index: str, first: str, sums: bool) -> str:
    """Statements leaving in `name` the sum of `value` over `size` invocations (numbered
    `index` among them, their `slot`s from `first` on: a team's lanes or the whole
    workgroup), through `red`; with `sums`, subgroup sums (see kernels.SUBGROUP_BUILTINS)."""
    if sums:
        return f"""    let {name}_part = subgroupAdd({value});
    if (sg_id == 0u) {{ red[slot] = {name}_part; }}
    workgroupBarrier();
    var {name} = 0.0;
    for (var j = 0u; j < {size}u; j += sg_size) {{ {name} += red[{first} + j]; }}
"""
    return f"""    red[slot] = {value};
    workgroupBarrier();
    for (var s = {size // 2}u; s > 0u; s = s >> 1u) {{
      if ({index} < s) {{ red[slot] += red[slot + s]; }}
      workgroupBarrier();
    }}
    let {name} = red[{first}];
"""
