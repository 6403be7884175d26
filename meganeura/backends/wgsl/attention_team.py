"""Attention forward for short prefill chunks: one team of lanes per (query head, query) row.

The few-rows kernel of `attention_rows.py` walks its keys in 64-key blocks through a chain of
phases separated by barriers (stage K, scores, one invocation per row scanning the block for
its maximum, p to workgroup memory, p V with each invocation looping over the block). A
128-token prefill of SmolLM2-135M into a 512-slot KV cache (9 query heads over 3 kv heads,
head dim 64) took 12.3 us of an H200's time there, for about 38 MFLOP, and none of its
layouts (1 to 3 queries and 1 or 3 heads per workgroup, 32- or 64-key blocks, key splits)
did better than 12.3: the time is the length of those chains, not the work.

Here a team of `lanes` consecutive invocations (8 for head dims up to 64, else 16) owns one
row and splits its head dims, lane l holding vec4s l, l + lanes, ..., so that the team reads
each K or V row as one run of consecutive elements (as vec4s where their buffer allows),
and neighbouring teams of the same kv head, which walk the same keys at the same time, read
the same addresses. A round takes `keys` keys (8 up to head dim 128): every lane loads its
slices of their K rows, V rows and mask values at once (no load waits on another), dots its
q slices (held in registers) with the K slices, and a butterfly
of subgroup shuffles leaves the full dot products in every lane of the team, in
log2(lanes) steps. Every lane then computes the same logits, maximum, online-softmax
rescale and p = exp(logit - max) for the round's keys, and adds p V to its slice of the
output: no per-row scan, no broadcast of p, no barrier in the walk.

A row's keys are split over `splits` teams (8 where they fit), each walking an equal,
contiguous share of the workgroup's keys with its own running max and sum; at the end the
teams of split 0 merge the shares through workgroup memory (one barrier), as
flash-decoding merges its splits, and write the output rows and log-sum-exps as
`attention.py`'s forward writes them, so the backward kernels there read them unchanged.
SmolLM2-135M's prefill: 128 x 3 workgroups of 3 heads x 8 splits teams of 8 lanes (192
invocations), each team walking at most 2 rounds of 8 keys.

On an H200 (`bench/ops.py`'s cache attention, SmolLM2-135M's heads, a 512-slot cache): 128
queries into an empty cache 9.8 us against 12.2 for the few-rows kernel (11.0 without
subgroup operations); 5, 16 and 37 queries after 100 cached tokens 6.8 / 7.0 / 8.1 us
against 9.6 / 10.8 / 10.1. Inside a 128-token prefill, 14.8 against 16.9 us a layer (each
kernel timed in a pass of its own). Of the layouts tried at 128 queries, 8 splits of rounds
of 8 keys did best (4 splits 11.3, 2 splits 17.6, rounds of 4 or 16 keys 10.8 / 13.0, teams
of 4 or 16 lanes 12.3 / 12.4, one head a workgroup 10.0).

Before the walk, the workgroup narrows its keys to the span from the first key its mask does
not hide (-inf) from one of its rows to the last (a 128-token prefill into a 512-slot cache
walks the written slots only). Unlike `attention._visible_keys`, whose scan stops at the
first visible row of each key (one load after another when no row sees the key), every
invocation here issues its loads together and keeps the span exact, not rounded to blocks.
Keys of the span that a row's mask, causality or window hide get logit -inf there.

Subgroup operations are used where the executor's start-up check found subgroup sums right
(plan option `subgroup_sums`, see kernels.SUBGROUP_BUILTINS) and, at run time, the subgroup
holds a whole team (subgroup_size >= lanes); otherwise the lanes add their partial dot
products through workgroup memory, one barrier per round (double-buffered, so the next
round's writes need none).

Which kernel (`team_layout`, asked by `attention_rows.attention_forward` where the few-rows
kernel would run): this one from MIN_QUERIES = 2 queries (decode keeps the few-rows
kernel's key splits: 9.3 us against 9.7 with this one forced, one query over 300 keys) while the keys number at most MAX_KEYS = 1024, and for head dims up to
256. Each team reads its own K and V rows (from cache after the first team of its kv head),
where the few-rows kernel stages a block once for all its rows; the bound keeps long walks
there, a guess that no measurement has tested yet.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from meganeura.backends.wgsl.attention import (
    NEG_INF,
    NEG_INF_BITS,
    NEG_MAX,
    POS_INF,
    VISIBLE_KEYS_SHARED,
    _inputs,
    _key_range,
    _logits,
    _Operand,
    _output_row,
    forward_operands,
    meet_visible_keys,
)
from meganeura.backends.wgsl.kernels import (
    SUBGROUP_BUILTINS,
    SUBGROUPS_ENABLE,
    KernelSource,
    _assemble,
)
from meganeura.backends.wgsl.matmul_operands import VecBindings
from meganeura.lower.plan import Kernel, Plan

WG = 256  # invocations per workgroup at most
MIN_QUERIES = 2  # one query (decode) keeps the few-rows kernel's key splits
MAX_KEYS = 1024  # longer walks stay on the few-rows kernel (see the module docstring)
MAX_HEAD_DIM = 256
MAX_SPLITS = 8  # teams sharing one row's keys
FILL_WORKGROUPS = 128  # about the SM count of a large GPU (132 on H100 and H200)
ROUND_VEC4S = 16  # K (and V) vec4s a lane loads per round: 64 registers each
SCAN_LOADS = 4  # mask values each invocation loads at once while narrowing the keys


@dataclass(frozen=True)
class TeamLayout:
    """How the team kernel splits the work: per workgroup `heads` query heads of one kv group
    times `queries` queries, each row's keys split over `splits` teams of `lanes`
    invocations, which take `keys` keys per round."""

    lanes: int
    keys: int
    heads: int
    queries: int
    splits: int

    @property
    def rows(self) -> int:
        return self.heads * self.queries

    @property
    def teams(self) -> int:
        return self.rows * self.splits

    @property
    def invocations(self) -> int:
        return self.teams * self.lanes


def _vec4s(dim: int) -> int:
    return -(-dim // 4)


def team_layout(B, Hq, Hkv, Tq, Tk, D, Dv) -> TeamLayout | None:
    """The team kernel's layout for these dims, or None where it should not run (see the
    module docstring)."""
    widest = max(_vec4s(D), _vec4s(Dv))
    if Tq < MIN_QUERIES or Tk > MAX_KEYS or 4 * widest > MAX_HEAD_DIM:
        return None
    lanes = 8 if widest <= 16 else 16
    keys = max(1, min(8, ROUND_VEC4S // -(-widest // lanes)))
    teams = WG // lanes
    group = Hq // Hkv
    heads = max(h for h in range(1, min(group, teams) + 1) if group % h == 0)
    splits = 1
    while splits * 2 <= min(MAX_SPLITS, teams // heads) and splits * keys < Tk:
        splits *= 2
    groups = Hq // heads * B
    fitting = [
        n
        for n in range(1, min(Tq, teams // (heads * splits)) + 1)
        if math.ceil(Tq / n) * groups >= FILL_WORKGROUPS
    ]
    return TeamLayout(lanes, keys, heads, max(fitting, default=1), splits)


@dataclass(frozen=True)
class _Shape:
    """Compile-time sizes of one team kernel."""

    B: int
    Hq: int
    Tq: int
    Tk: int
    D: int
    Dv: int
    layout: TeamLayout

    @property
    def w(self) -> int:  # vec4s of a q or k row per lane
        return -(-_vec4s(self.D) // self.layout.lanes)

    @property
    def wv(self) -> int:  # vec4s of a v or output row per lane
        return -(-_vec4s(self.Dv) // self.layout.lanes)

    @property
    def quads(self) -> int:  # vec4s holding one key's partial dot products of a team
        return self.layout.lanes // 4

    @property
    def half(self) -> int:  # vec4s of one round's partial dot products of all teams
        return self.layout.teams * self.layout.keys * self.quads

    @property
    def shared_len(self) -> int:  # double-buffered partial sums, or the splits' outputs
        return max(2 * self.half, self.layout.invocations * self.wv)


def _slice(x: _Operand, row: tuple[str, str, str], dim: int, lanes: int, t: int, vec4: bool):
    """WGSL vec4 of x[b, h, r, d] for this lane's t-th slice of the head dim, d from
    4 (lane + lanes t) on; 0 past `dim`. Reads clamped indices, so that every load is in
    range and none waits on a branch; with `vec4`, x's buffer is bound as vec4s."""
    slot = f"(lane + {lanes * t}u)"
    inside = lanes * (t + 1) <= dim // 4
    if vec4:
        base = x.addr(*row, "0u")
        at = slot if inside else f"min({slot}, {dim // 4 - 1}u)"
        value = f"vec4<f32>({x.buf}[({base}) / 4u + {at}])"
        return value if inside else f"select(vec4<f32>(0.0), {value}, {slot} < {dim // 4}u)"
    exact = dim % 4 == 0 and inside
    parts = []
    for u in range(4):
        d = f"(4u * {slot} + {u}u)"
        if exact:
            parts.append(x.load(*row, d))
        else:
            parts.append(f"select(0.0, {x.load(*row, f'min({d}, {dim - 1}u)')}, {d} < {dim}u)")
    return f"vec4<f32>({', '.join(parts)})"


def _vec4_operands(bind: VecBindings, q, k, v, mask, D: int, Dv: int) -> bool:
    """Whether K and V can be read as vec4s: their rows start on 16-byte boundaries and run
    contiguously, and no other operand of the kernel reads their buffer element by element.
    Marks their buffers in `bind` when they can."""
    for x, dim in ((k, D), (v, Dv)):
        if x.computed or dim % 4 or x.strides[3] != 1:
            return False
        if x.offset % 4 or any(st % 4 for st in x.strides[:3]):
            return False
    # A computed operand (q under its RoPE) reads the buffers its function names.
    scalar = {f"buf{bind.out_buffer}"}
    for x in (q, mask):
        if x is not None:
            scalar |= set(re.findall(r"buf\d+", x.function)) if x.computed else {x.buf}
    if {k.buf, v.buf} & scalar:
        return False
    for x in (k, v):
        bind.vector.add(int(x.buf.removeprefix("buf")))
    return True


def _visible_span(s: _Shape, mask: _Operand) -> str:
    """WGSL narrowing [lo, hi) to the keys from the first that the mask leaves visible to one
    of the workgroup's rows to the last (lo = hi where none is). The (key, row) pairs are
    spread over the invocations, key fastest, SCAN_LOADS loads issued at once; rows along
    which the mask is broadcast are read once. The invocations meet as in
    `attention._visible_keys` (`attention.meet_visible_keys`)."""
    L, Tq, Tk = s.layout, s.Tq, s.Tk
    mqueries = L.queries if mask.strides[2] else 1
    mrows = (L.heads if mask.strides[1] else 1) * mqueries
    n = L.invocations
    loads, checks = [], []
    for u in range(SCAN_LOADS):
        loads.append(
            f"      let e{u} = min(e + {u * n}i, pairs - 1i);"
            f" let key{u} = lo + e{u} % keys; let r{u} = u32(e{u} / keys);\n"
            f"      let vh{u} = hb + r{u} / {mqueries}u; let vi{u} = q0 + r{u} % {mqueries}u;\n"
            f"      let bits{u} = bitcast<u32>("
            f"{mask.load('b', f'vh{u}', f'min(vi{u}, {Tq - 1}u)', f'u32(key{u})')});\n"
        )
        checks.append(
            f"      if (e + {u * n}i < pairs && vi{u} < {Tq}u && bits{u} != {NEG_INF_BITS}) {{\n"
            f"        seen_first = min(seen_first, key{u}); seen_end = max(seen_end, key{u} + 1i);\n"
            "      }\n"
        )
    scan = (
        "  {\n"
        f"    let keys = max(hi - lo, 0i); let pairs = keys * {mrows}i;\n"
        f"    for (var e = i32(tid); e < pairs; e += {n * SCAN_LOADS}i) {{\n"
        + "".join(loads)
        + "".join(checks)
        + "    }\n  }\n"
    )
    return meet_visible_keys(Tk, scan, "    lo = span.x; hi = span.y;\n")


def _team_sums(s: _Shape, sums: bool) -> str:
    """Replace each lane's partial dot products dot<j> by the team's totals, the same in every
    lane: a butterfly of subgroup shuffles where the subgroup holds the team, else through
    workgroup memory (double-buffered by round)."""
    L = s.layout
    shared = (
        "      {\n"
        f"        let pb = (u32(r) & 1u) * {s.half}u + team * {L.keys * s.quads}u;\n"
        + "".join(
            f"        team_mem[pb + {j * s.quads}u + lane / 4u][lane % 4u] = dot{j};\n"
            for j in range(L.keys)
        )
        + "        workgroupBarrier();\n"
        + "".join(
            f"        dot{j} = "
            + " + ".join(
                f"dot(team_mem[pb + {j * s.quads + c}u], vec4<f32>(1.0))" for c in range(s.quads)
            )
            + ";\n"
            for j in range(L.keys)
        )
        + "      }\n"
    )
    if not sums:
        return shared
    steps = []
    m = L.lanes // 2
    while m:
        steps += [f"        dot{j} += subgroupShuffleXor(dot{j}, {m}u);\n" for j in range(L.keys)]
        m //= 2
    return f"    if (sg_size >= {L.lanes}u) {{\n{''.join(steps)}    }} else {{\n{shared}    }}\n"


def _round(s: _Shape, attrs, k, v, mask, sums: bool, vec4: bool) -> str:
    """One round: keys k0 .. k0 + keys - 1 of this team's share, all loads first."""
    L, Tq = s.layout, s.Tq
    lines = []
    for j in range(L.keys):
        lines.append(f"    let kk{j} = k0 + {j}i; let kc{j} = u32(min(kk{j}, hi - 1i));\n")
    for j in range(L.keys):
        for t in range(s.w):
            lines.append(
                f"    let ks{j}_{t} = {_slice(k, ('b', 'hk', f'kc{j}'), s.D, L.lanes, t, vec4)};\n"
            )
    for j in range(L.keys):
        for t in range(s.wv):
            lines.append(
                f"    let vs{j}_{t} = {_slice(v, ('b', 'hk', f'kc{j}'), s.Dv, L.lanes, t, vec4)};\n"
            )
    if mask is not None:
        for j in range(L.keys):
            lines.append(f"    let mv{j} = {mask.load('b', 'h', 'ic', f'kc{j}')};\n")
    for j in range(L.keys):
        terms = " + ".join(f"dot(qs{t}, ks{j}_{t})" for t in range(s.w))
        lines.append(f"    var dot{j} = {terms};\n")
    lines.append(_team_sums(s, sums))
    for j in range(L.keys):
        lines.append(
            _logits(
                attrs,
                f"mv{j}" if mask is not None else None,
                "b",
                "h",
                "i32(i)",
                f"kk{j}",
                Tq,
                s.Tk,
                f"dot{j}",
                f"logit{j}",
                width=1,
            )
        )
        lines.append(f"    let x{j} = select({NEG_INF}, logit{j}, kk{j} < hi);\n")
    xs = [f"x{j}" for j in range(L.keys)]
    while len(xs) > 1:  # a tree, not a chain
        xs = [f"max({xs[n]}, {xs[n + 1]})" for n in range(0, len(xs) - 1, 2)] + xs[len(xs) & ~1 :]
    lines.append(
        f"    let m_new = max(m, {xs[0]});\n"
        "    let alpha = exp(m - m_new);\n    m = m_new;\n"
        + "".join(f"    let p{j} = exp(x{j} - m_new);\n" for j in range(L.keys))
        + f"    l = l * alpha + ({' + '.join(f'p{j}' for j in range(L.keys))});\n"
    )
    for t in range(s.wv):
        terms = " + ".join(f"p{j} * vs{j}_{t}" for j in range(L.keys))
        lines.append(f"    o{t} = o{t} * alpha + ({terms});\n")
    return "".join(lines)


def _store(s: _Shape, attrs, out: str, acc: str, total: str, row_max: str) -> str:
    """Write this lane's slice of row (b, h, i) from vec4s acc<t> and the row's log-sum-exp."""
    Dv, Tq, Hq, lanes = s.Dv, s.Tq, s.Hq, s.layout.lanes
    lines = [
        f"    let inv = select(0.0, 1.0 / {total}, {total} > 0.0);\n"
        f"    let orow = {_output_row(attrs, Hq, Tq, 'b', 'h', 'i')};\n"
    ]
    for t in range(s.wv):
        for u in range(4):
            d = f"4u * (lane + {lanes * t}u) + {u}u"
            store = f"{out}[orow * {Dv}u + {d}] = {acc}{t}[{u}] * inv;"
            exact = Dv % 4 == 0 and lanes * (t + 1) <= Dv // 4
            lines.append(f"    {store}\n" if exact else f"    if ({d} < {Dv}u) {{ {store} }}\n")
    lines.append(
        f"    if (lane == 0u) {{\n"
        f"      {out}[{s.B * Hq * Tq * Dv}u + (b * {Hq}u + h) * {Tq}u + i] = "
        f"select({POS_INF}, {row_max} + log({total}), {total} > 0.0);\n    }}\n"
    )
    return "".join(lines)


def _finish(s: _Shape, attrs, out: str) -> str:
    """Merge the splits' shares of each row (teams of split 0) and write the rows."""
    L, Tq = s.layout, s.Tq
    if L.splits == 1:
        return f"  if (i < {Tq}u) {{\n" + _store(s, attrs, out, "o", "l", "m") + "  }\n"
    share = f"(sp * {L.rows}u + team) * {L.lanes * s.wv}u + lane * {s.wv}u"
    return (
        # The shares go where the last round's partial sums may still be read.
        "  workgroupBarrier();\n"
        + "".join(
            f"  team_mem[team * {L.lanes * s.wv}u + lane * {s.wv}u + {t}u] = o{t};\n"
            for t in range(s.wv)
        )
        + "  if (lane == 0u) { team_stats[team] = vec2<f32>(m, l); }\n"
        "  workgroupBarrier();\n"
        f"  if (split == 0u && i < {Tq}u) {{\n"
        f"    var row_max = {NEG_MAX};\n"
        f"    for (var sp = 0u; sp < {L.splits}u; sp++) {{\n"
        f"      row_max = max(row_max, team_stats[sp * {L.rows}u + team].x);\n    }}\n"
        "    var total = 0.0;\n"
        + "".join(f"    var acc{t} = vec4<f32>(0.0);\n" for t in range(s.wv))
        + f"    for (var sp = 0u; sp < {L.splits}u; sp++) {{\n"
        f"      let st = team_stats[sp * {L.rows}u + team]; let weight = exp(st.x - row_max);\n"
        "      total += weight * st.y;\n"
        + "".join(f"      acc{t} += weight * team_mem[{share} + {t}u];\n" for t in range(s.wv))
        + "    }\n"
        + _store(s, attrs, out, "acc", "total", "row_max")
        + "  }\n"
    )


def team_forward(plan: Plan, kernel: Kernel, layout: TeamLayout) -> KernelSource:
    """The team forward (module docstring) for the attention node of `kernel`."""
    node, dims = _inputs(plan, kernel)
    B, Hq, Hkv, Tq, Tk, D, Dv = dims
    attrs = node.attrs
    bind = VecBindings(plan, kernel.node)
    q, k, v, mask = forward_operands(plan, bind, node, dims)
    vec4 = _vec4_operands(bind, q, k, v, mask, D, Dv)
    s = _Shape(B, Hq, Tq, Tk, D, Dv, layout)
    L = layout
    sums = bool(plan.options.get("subgroup_sums"))
    nqb = math.ceil(Tq / L.queries)
    share = L.splits * L.keys
    body = (
        f"@compute @workgroup_size({L.invocations})\n"
        "fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) tid: u32"
        f"{SUBGROUP_BUILTINS if sums else ''}) {{\n"
        f"  let q0 = ({nqb - 1}u - wid.x) * {L.queries}u;  // longest causal rows first\n"
        f"  let hb = wid.y * {L.heads}u; let b = wid.z; let hk = hb / {Hq // Hkv}u;\n"
        f"  let lane = tid % {L.lanes}u; let team = tid / {L.lanes}u;\n"
        f"  let h = hb + (team / {L.queries}u) % {L.heads}u; let i = q0 + team % {L.queries}u;\n"
        f"  let ic = min(i, {Tq - 1}u); let split = team / {L.rows}u;\n"
        # q first: its loads need no key range, so they overlap the narrowing of the keys.
        + "".join(
            f"  let qs{t} = {_slice(q, ('b', 'h', 'ic'), D, L.lanes, t, False)};\n"
            for t in range(s.w)
        )
        + _key_range(attrs, Tq, Tk, L.queries)
        + (_visible_span(s, mask) if mask is not None else "")
        + f"  var m = {NEG_MAX};\n  var l = 0.0;\n"
        + "".join(f"  var o{t} = vec4<f32>(0.0);\n" for t in range(s.wv))
        # Equal shares of whole rounds, so that every team runs the same (uniform) loop.
        + f"  let rounds = (max(hi - lo, 0i) + {share - 1}i) / {share}i;\n"
        "  for (var r = 0i; r < rounds; r++) {\n"
        f"    let k0 = lo + (i32(split) * rounds + r) * {L.keys}i;\n"
        + _round(s, attrs, k, v, mask, sums, vec4)
        + "  }\n"
        + _finish(s, attrs, f"buf{bind.out_buffer}")
        + "}\n"
        + q.function
    )
    shared = f"var<workgroup> team_mem: array<vec4<f32>, {s.shared_len}>;\n"
    if L.splits > 1:
        shared += f"var<workgroup> team_stats: array<vec2<f32>, {L.teams}>;\n"
    if mask is not None:
        shared += VISIBLE_KEYS_SHARED
    text = _assemble(bind, body, shared)
    return KernelSource(
        (SUBGROUPS_ENABLE if sums else "") + text,
        bind.order,
        (nqb, Hq // L.heads, B),
        f"attention%{node.id}",
    )
