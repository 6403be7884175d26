"""Row writes stored by the product that computes the rows.

A prompt chunk's keys and values reach the KV cache through `write_rows(cache, rows,
position)`, whose rows are views of the q/k/v product's output, the keys rotated by RoPE. The
write is a kernel of its own, about 2.6 us of an H200's time for 49K values in a
SmolLM2-135M prefill, nearly all of it the launch: 30 of the prefill's 184 kernels. Here the
planner hands such a write to the product's kernel, which stores the product as before and
then, for each element it stored, the write_rows element that reads it (if any) at the cache
position.

That needs, for every product element, the rows element anchored there, which the planner
finds by evaluating the rows' views on the product's element indices (`read_indices`): the
rows must be views of the product (reshape, permute, slice, concat) and RoPE, each rows
element reading the product at one element (its anchor) and, under RoPE, also at its partner
in the same row, Pd columns away. The product's kernel keeps each column pair in one tile
(columns c and c + Pd of every block of 2 Pd columns) and reads the partner back after a
storage barrier. The anchor map is stored as a table of N ints over the product's columns
(`RowWrite.columns`) and two strides over its rows, checked against the whole inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meganeura.graph import Graph
from meganeura.ops import get_op

# Views the analysis evaluates on index arrays with their NumPy reference: each output
# element is one input element, no fill values, no run-time indices.
INDEX_VIEWS = ("reshape", "permute", "slice", "concat")


@dataclass(frozen=True)
class RowWrite:
    """A write_rows node stored by the kernel of `product` [..., rows, N] (see the module
    docstring). Rows element v is anchored at product row r, column c when
    v = columns[c] + (r // tokens) * sequence_stride + (r % tokens) * row_stride; columns[c]
    is -1 where no rows element is anchored in column c. With `pair` (Pd > 0), an element
    anchored at column c also reads its partner column in the same row: c + Pd in the first half
    of its block of 2 Pd columns, c - Pd in the second (RoPE)."""

    node: int
    product: int
    columns: np.ndarray  # int32 [N]
    tokens: int
    sequence_stride: int
    row_stride: int
    pair: int


class _Unsupported(Exception):
    pass


def read_indices(graph: Graph, nid: int, product: int, materialized: set[int]):
    """(anchor, partner): for each element of the inlined node `nid`, the flat index of the
    `product` element it reads at its own position and of the other one it reads (RoPE's
    partner; the anchor again where there is none). None where `nid` does not read `product`
    or reads it otherwise than through INDEX_VIEWS and one RoPE."""
    memo: dict[int, tuple | None] = {}

    def walk(i: int):
        if i in memo:
            return memo[i]
        node = graph.nodes[i]
        if i == product:
            flat = np.arange(node.type.size, dtype=np.int64).reshape(node.type.shape)
            out = (flat, flat)
        elif i in materialized or get_op(node.op).kind == "source":
            out = None
        else:
            args = [walk(j) for j in node.inputs]
            if all(a is None for a in args):
                out = None
            elif node.op in INDEX_VIEWS:
                if any(a is None for a in args):
                    raise _Unsupported
                reference = get_op(node.op).reference
                out = tuple(np.asarray(reference([a[n] for a in args], node.attrs)) for n in (0, 1))
                if out[0].shape != node.type.shape:
                    raise _Unsupported
            elif node.op == "rope" and args[0] is not None and all(a is None for a in args[1:]):
                anchor, partner = args[0]
                if not np.array_equal(anchor, partner):
                    raise _Unsupported  # a second rotation: more than one partner
                out = (anchor, anchor[..., _rope_partners(graph, node)])
            else:
                raise _Unsupported
        memo[i] = out
        return out

    try:
        return walk(nid)
    except _Unsupported:
        return None


def _rope_partners(graph: Graph, node) -> np.ndarray:
    """The feature each feature of rope `node` reads besides its own (itself past the rotary
    dims)."""
    D = node.type.shape[-1]
    half = graph.nodes[node.inputs[2]].type.shape[0]
    d = np.arange(D)
    if node.attrs["interleaved"]:
        partner = d ^ 1
    else:
        partner = np.where(d < half, d + half, d - half)
    return np.where(d < 2 * half, partner, d)


def row_write(graph: Graph, write: int, product: int, materialized: set[int]) -> RowWrite | None:
    """The RowWrite of write_rows node `write` by the kernel of `product`, or None where its
    rows are not laid over the product as the module docstring requires."""
    rows = graph.nodes[write].inputs[1]
    found = read_indices(graph, rows, product, materialized)
    shape = graph.nodes[product].type.shape
    if found is None or len(shape) < 2:
        return None
    anchor, partner = (a.reshape(-1) for a in found)
    size, N, T = int(np.prod(shape)), shape[-1], shape[-2]
    inverse = np.full(size, -1, np.int64)
    inverse[anchor] = np.arange(anchor.size)
    if np.count_nonzero(inverse >= 0) != anchor.size:
        return None  # two rows elements anchored at one product element
    table = inverse.reshape(-1, N)
    anchored = table >= 0
    if not (anchored == anchored[:1]).all():
        return None
    columns = table[0]
    offsets = (table - np.where(anchored, columns, 0))[:, anchored[0]]
    if not (offsets == offsets[:, :1]).all():
        return None
    offsets = offsets[:, 0]
    r = np.arange(offsets.size)
    row_stride = int(offsets[1]) if T > 1 and offsets.size > 1 else 0
    sequence_stride = int(offsets[T]) if offsets.size > T else 0
    if not np.array_equal(offsets, (r // T) * sequence_stride + (r % T) * row_stride):
        return None
    pair = _pair(anchor, partner, N)
    if pair is None or np.iinfo(np.int32).max < max(anchor.size, size):
        return None
    return RowWrite(write, product, columns.astype(np.int32), T, sequence_stride, row_stride, pair)


def _pair(anchor: np.ndarray, partner: np.ndarray, N: int) -> int | None:
    """Pd where every element reads its anchor's column c and at most c's partner c +- Pd in
    the same row (Pd a multiple of 4 dividing N / 2 into whole blocks), 0 where each reads its
    anchor alone; None otherwise."""
    moved = anchor != partner
    if not moved.any():
        return 0
    a, p = anchor[moved], partner[moved]
    if not np.array_equal(a // N, p // N):
        return None
    step = np.abs(p % N - a % N)
    Pd = int(step[0])
    low = np.minimum(a, p) % N
    if (step != Pd).any() or Pd % 4 or N % (2 * Pd) or (low % (2 * Pd) >= Pd).any():
        return None
    return Pd
