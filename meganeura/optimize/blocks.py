"""Repeated blocks: find copies of one subgraph so it is optimized once and replayed.

Graphs are built by code that runs a layer's builder once per layer, autodiff walks the
layers in reverse and optimizers update parameters one after another, so each repeated
block is a run of consecutive nodes whose ops, attributes and types repeat with a period.
`find_blocks` looks for such tandem repeats in the sequence of node signatures (names of
parameters left out: copies differ exactly in which parameters they read), places the cut
between copies where fewest edges cross, and then checks that every copy is wired like the
first one — inputs inside the copy at the same offsets, inputs outside it in a consistent
order (the copy's boundary). Copies that fail the check are left to the general region.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from meganeura.graph import Graph
from meganeura.optimize.encode import codec, type_string

MIN_PERIOD = 6  # smaller blocks save less than a region costs to set up
MAX_CANDIDATES = 12


@dataclass
class Block:
    chunks: list[list[int]]  # node ids of each copy, in the same order
    boundary: list[list[int]]  # per copy: the outside nodes it reads, slot by slot
    outputs: list[int]  # offsets whose values something outside a copy reads


def signature(graph: Graph, nid: int):
    node = graph.nodes[nid]
    if node.op == "constant":
        value = node.attrs["value"]
        return (
            "constant",
            type_string(node.type),
            value.tobytes() if value.size <= 64 else id(value),
        )
    return (node.op, codec(node.op).encode(node.attrs), type_string(node.type), len(node.inputs))


def find_blocks(graph: Graph, seq: list[int], users: dict[int, list[int]], roots: set[int]):
    """Repeated blocks among `seq` (node ids in topological order)."""
    if len(seq) < 2 * MIN_PERIOD:
        return []
    ids: dict = {}
    codes = np.array([ids.setdefault(signature(graph, n), len(ids)) for n in seq], np.int64)
    repeats: list[tuple[int, int, int]] = []
    _search(codes, 0, len(codes), repeats)
    blocks = []
    position = {nid: i for i, nid in enumerate(seq)}
    for start, period, copies in sorted(repeats):
        block = _cut(graph, seq, position, start, period, copies, users, roots)
        if block is not None:
            blocks.append(block)
    return blocks


def _search(codes: np.ndarray, lo: int, hi: int, out: list) -> None:
    """Find the repeat covering most nodes in codes[lo:hi], then search what is left."""
    n = hi - lo
    if n < 2 * MIN_PERIOD:
        return
    seg = codes[lo:hi]
    best = None
    for period in _candidate_periods(seg):
        same = seg[:-period] == seg[period:]
        run_start, run_len = _longest_run(same)
        copies = run_len // period + 1
        if copies < 2:
            continue
        covered = copies * period
        if best is None or covered > best[0]:
            best = (covered, lo + run_start, period, copies)
    if best is None:
        return
    covered, start, period, copies = best
    out.append((start, period, copies))
    _search(codes, lo, start, out)
    _search(codes, start + covered, hi, out)


def _candidate_periods(seg: np.ndarray) -> list[int]:
    """Distances between consecutive occurrences of a signature, most frequent first."""
    order = np.argsort(seg, kind="stable")
    sorted_codes = seg[order]
    same = sorted_codes[1:] == sorted_codes[:-1]
    gaps = (order[1:] - order[:-1])[same]
    gaps = gaps[(gaps >= MIN_PERIOD) & (gaps <= len(seg) // 2)]
    counts = Counter(gaps.tolist())
    return [p for p, _ in counts.most_common(MAX_CANDIDATES)]


def _longest_run(mask: np.ndarray) -> tuple[int, int]:
    if not mask.any():
        return 0, 0
    padded = np.concatenate(([False], mask, [False]))
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = edges[::2], edges[1::2]
    k = int(np.argmax(ends - starts))
    return int(starts[k]), int(ends[k] - starts[k])


def _cut(graph, seq, position, start, period, copies, users, roots) -> Block | None:
    """Chunks of the repeat, cut where fewest edges cross, that pass the wiring check."""
    middle = start + (copies // 2) * period
    best_shift, best_cost = 0, None
    for shift in range(period):
        lo = middle + shift if middle + shift + period <= start + copies * period else None
        if lo is None:
            break
        cost = _crossings(graph, seq, position, lo, lo + period, users)
        if best_cost is None or cost < best_cost:
            best_shift, best_cost = shift, cost
    count = copies if best_shift == 0 else copies - 1
    chunks = [
        seq[start + best_shift + j * period : start + best_shift + (j + 1) * period]
        for j in range(count)
    ]
    return _verify(graph, chunks, users, roots)


def _crossings(graph, seq, position, lo: int, hi: int, users) -> int:
    """Values that cross the borders of seq[lo:hi]: computed outside and read inside, or
    computed inside and read outside. Counting values, not edges, favours cuts through a
    residual stream (one value, read by several ops) over cuts through a pattern."""
    crossing = set()
    for nid in seq[lo:hi]:
        for i in graph.nodes[nid].inputs:
            p = position.get(i)
            if p is not None and not lo <= p < hi and graph.nodes[i].op != "constant":
                crossing.add(i)
        for u in users.get(nid, ()):
            p = position.get(u)
            if p is not None and not lo <= p < hi:
                crossing.add(nid)
                break
    return len(crossing)


def _verify(graph: Graph, chunks: list[list[int]], users, roots) -> Block | None:
    rep = chunks[0]
    offset = {nid: t for t, nid in enumerate(rep)}
    slots: dict[int, int] = {}
    rep_inputs = []  # per node: per input, ("in", offset) | ("out", slot) | ("const", node)
    for nid in rep:
        wiring = []
        for i in graph.nodes[nid].inputs:
            if i in offset:
                wiring.append(("in", offset[i]))
            elif graph.nodes[i].op == "constant":
                wiring.append(("const", signature(graph, i)))
            else:
                wiring.append(("out", slots.setdefault(i, len(slots))))
        rep_inputs.append(wiring)
    good, boundaries = [], []
    for chunk in chunks:
        boundary = _match(graph, rep_inputs, chunk, len(slots))
        if boundary is not None:
            good.append(chunk)
            boundaries.append(boundary)
    if len(good) < 2:
        return None
    outputs = set()
    for chunk in good:
        inside = set(chunk)
        for t, nid in enumerate(chunk):
            if nid in roots or any(u not in inside for u in users.get(nid, ())):
                outputs.add(t)
    return Block(good, boundaries, sorted(outputs))


def _match(graph: Graph, rep_inputs, chunk: list[int], nslots: int) -> list[int] | None:
    offset = {nid: t for t, nid in enumerate(chunk)}
    boundary: list[int | None] = [None] * nslots
    for nid, wiring in zip(chunk, rep_inputs, strict=True):
        inputs = graph.nodes[nid].inputs
        if len(inputs) != len(wiring):
            return None
        for i, (where, key) in zip(inputs, wiring, strict=True):
            if where == "in":
                if offset.get(i) != key:
                    return None
            elif i in offset:
                return None
            elif where == "const":
                if graph.nodes[i].op != "constant" or signature(graph, i) != key:
                    return None
            else:
                if graph.nodes[i].op == "constant":
                    return None
                if boundary[key] is None:
                    boundary[key] = i
                elif boundary[key] != i:
                    return None
    return boundary
