"""Facts egglog cannot compute, computed in Python for the rewrite rules (rules.py) to read:
the inverse of a permutation, whether a constant is a causal mask, which tensors hold whole
rows, whether an attention's inputs fit its kernel, RoPE tables. `DECLARATIONS` declares the
functions and relations; `tables` fills them for the types, permutations and constants
present in a region.
"""

from __future__ import annotations

from itertools import product

import numpy as np

from meganeura.ops import all_ops
from meganeura.optimize.egraph import quote
from meganeura.optimize.encode import (
    ConstantPool,
    Encoding,
    codec,
    is_causal_mask,
    parse_ints,
    parse_type,
    perm_inverse,
    swaps_last_two,
    type_string,
)

DECLARATIONS = """
(function perm-inverse (String) String :merge old)
(relation identity-perm (String))
(relation swap-last2 (String))
(function scalar-type (String) String :merge old)
(function last-vec (String) String :merge old)
(function last-axis (String) i64 :merge old)
(function rank (String) i64 :merge old)
(function shape-of (String) String :merge old)
(relation causal-mask (i64))
(relation repeat-kv (String String String String))
(function attn-packed (String String) String :merge old)
(relation attn-ok (String String String))
(function rows-type (String) String :merge old)
(relation ce-labels (String String))
(relation rope-halves (String String String))
(relation rope-tables (i64 i64 i64 String i64 String))
(function rope-attrs () A :merge old)
(relation whole-rows (String String))
"""


def tables(enc: Encoding, pool: ConstantPool) -> list[str]:
    """Facts about the types, permutations and constants present in a region."""
    lines = []
    for text in sorted(enc.types):
        t = parse_type(text)
        q = quote(text)
        lines.append(f"(set (scalar-type {q}) {quote(t.dtype + '[]')})")
        lines.append(f"(set (rank {q}) {len(t.shape)})")
        lines.append(f"(set (shape-of {q}) {quote(','.join(map(str, t.shape)))})")
        if t.shape:
            lines.append(f"(set (last-vec {q}) {quote(f'{t.dtype}[{t.shape[-1]}]')})")
            lines.append(f"(set (last-axis {q}) {len(t.shape) - 1})")
    for text in sorted(enc.strings.get("permute", ())):
        axes = parse_ints(text)
        q = quote(text)
        lines.append(f"(set (perm-inverse {q}) {quote(','.join(map(str, perm_inverse(axes))))})")
        if axes == tuple(range(len(axes))):
            lines.append(f"(identity-perm {q})")
        if swaps_last_two(axes):
            lines.append(f"(swap-last2 {q})")
    for cid in pool.arrays:
        if pool.fact(cid, "causal-mask", is_causal_mask):
            lines.append(f"(causal-mask {cid})")
    parsed = [(text, parse_type(text)) for text in sorted(enc.types)]
    rank4 = [(q, t) for q, t in parsed if len(t.shape) == 4]
    rank5 = {t.shape: q for q, t in parsed if len(t.shape) == 5}
    for tk, k in rank4:
        b, h, n_t, d = k.shape
        for (b2, h2, n, t2, d2), te in rank5.items():
            if (b2, h2, t2, d2) != (b, h, n_t, d):
                continue
            unsq = f"{k.dtype}[{b},{h},1,{n_t},{d}]"
            out = f"{k.dtype}[{b},{h * n},{n_t},{d}]"
            lines.append(f"(repeat-kv {quote(tk)} {quote(unsq)} {quote(te)} {quote(out)})")
    lines += _whole_rows_tables(enc, parsed)
    lines += _attention_tables(rank4)
    lines += _rope_tables(rank4, pool)
    floats = [(q, t) for q, t in parsed if t.dtype in ("f32", "f16") and t.shape]
    ints = [(q, t) for q, t in parsed if t.dtype in ("i32", "u32")]
    for tx, x in floats:
        rows = f"{x.dtype}[{','.join(map(str, x.shape[:-1]))}]"
        lines.append(f"(set (rows-type {quote(tx)}) {quote(rows)})")
        for tl, lab in ints:
            if lab.shape == x.shape[:-1]:
                lines.append(f"(ce-labels {quote(tx)} {quote(tl)})")
    return lines


def _whole_rows_tables(enc: Encoding, parsed) -> list[str]:
    """The slices (attribute strings) that take the last axis of a type whole: they select
    rows and keep each row intact."""
    lines = []
    for text in sorted(enc.strings.get("slice", ())):
        attrs = codec("slice").decode(text)
        starts, stops, steps = attrs["starts"], attrs["stops"], attrs["steps"]
        for q, t in parsed:
            if (
                len(t.shape) == len(starts)
                and t.shape
                and (starts[-1], stops[-1], steps[-1])
                == (
                    0,
                    t.shape[-1],
                    1,
                )
            ):
                lines.append(f"(whole-rows {quote(text)} {quote(q)})")
    return lines


def _attention_tables(rank4) -> list[str]:
    """The (q, k, v) types the attention op accepts, and the type of its packed result."""
    if "attention" not in all_ops():
        return []
    op = all_ops()["attention"]
    lines, packed = [], set()
    for (tq, q), (tk, k), (tv, v) in product(rank4, repeat=3):
        try:
            out = op.infer([q, k, v], op.normalize([q, k, v], {}) if op.normalize else {})
        except (ValueError, TypeError):
            continue
        lines.append(f"(attn-ok {quote(tq)} {quote(tk)} {quote(tv)})")
        if (tq, tv) not in packed:
            packed.add((tq, tv))
            lines.append(f"(set (attn-packed {quote(tq)} {quote(tv)}) {quote(type_string(out))})")
    return lines


def _rope_tables(rank4, pool: ConstantPool) -> list[str]:
    """The halves of [B, H, T, D] tensors as slice attributes, and the constant pairs that are
    cos and sin tables of positions 0..T-1 (with the positions and frequencies as constants)."""
    lines = []
    if "rope" not in all_ops():
        return lines
    lines.append(f"(set (rope-attrs) {codec('rope').encode({'interleaved': False})})")
    for text, t in rank4:
        b, h, n, d = t.shape
        if d % 2:
            continue
        halves = []
        for lo, hi in ((0, d // 2), (d // 2, d)):
            attrs = {"starts": (0, 0, 0, lo), "stops": (b, h, n, hi), "steps": (1, 1, 1, 1)}
            halves.append(codec("slice").encode(attrs)[6:-1])
        lines.append(f"(rope-halves {quote(text)} {halves[0]} {halves[1]})")
    tables = [
        (cid, a)
        for cid, a in list(pool.arrays.items())
        if a.dtype == np.float32
        and a.ndim >= 2
        and a.shape[-2] >= 2
        and a.shape[-1] % 2 == 0
        and all(d == 1 for d in a.shape[:-2])
    ]
    for cid, c in tables:
        for sid, s in tables:
            if c.shape != s.shape:
                continue
            freq = pool.fact(cid, f"rope-with-{sid}", lambda _c, s=s: rope_frequencies(_c, s))
            if freq is None:
                continue
            positions = np.arange(c.shape[-2], dtype=np.int32)
            pid, fid = pool.intern(positions), pool.intern(freq)
            lines.append(
                f"(rope-tables {cid} {sid} {pid} {quote(f'i32[{positions.size}]')} {fid} "
                f"{quote(f'f32[{freq.size}]')})"
            )
    return lines


def rope_frequencies(cos: np.ndarray, sin: np.ndarray) -> np.ndarray | None:
    """The inverse frequencies f if cos and sin ([..., T, D]) are cos(t·f) and sin(t·f) for
    t = 0..T-1, each half of the last axis repeating f, else None."""
    c = cos.reshape(cos.shape[-2:]).astype(np.float64)
    s = sin.reshape(sin.shape[-2:]).astype(np.float64)
    half = c.shape[1] // 2
    if not (np.array_equal(c[:, :half], c[:, half:]) and np.array_equal(s[:, :half], s[:, half:])):
        return None
    freq = np.arctan2(s[1, :half], c[1, :half])
    angles = np.arange(c.shape[0])[:, None] * freq[None, :]
    if np.abs(np.cos(angles) - c[:, :half]).max() > 1e-5:
        return None
    if np.abs(np.sin(angles) - s[:, :half]).max() > 1e-5:
        return None
    return freq.astype(np.float32)
