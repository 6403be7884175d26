"""Graph rewrites run after the optimizer, before planning: choices of how to compute, made
where every graph (optimized or not, written by hand or from primitives) passes.

- `dense_quantized_products`: GGUF-quantized products of many rows (a prompt) become dense
  products of the dequantized weight. The quantized kernel takes MAX_TILE rows of x per
  workgroup and decodes the weight again for every such tile: right for decoding (one row),
  slow for a prompt (on an H200 a 128-row prefill's quantized products took about 290 us
  each, the dense ones 35 us). So a product of more than QUANTIZED_ROWS rows becomes
  `matmul(x, dequantize(raw), trans_b=True)` (`rms_norm_matmul` for the norm's form). The
  tiled f32 kernels decode a Q4_1 weight four weights at a time as they stage it (a computed
  operand, ops/linalg.py's `decoded_b`); for the other qtypes one launch writes the f32
  weight into a transient buffer, placed right before its product so the memory plan reuses
  one buffer for them all, as llama.cpp dequantizes weights for batched prompts.
- `tokens_first_attention`: an attention whose output a reader permutes to [B, Tq, Hq, Dv]
  (a model merging the heads back into its rows for the output projection) stores it in
  that order (`attention`'s `tokens_first`), so the merged rows are a plain view of its
  buffer instead of a copy; every other reader of the output gets the transposed view.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from meganeura.graph import Graph, Node, Tensor
from meganeura.ops.packed import segment

QUANTIZED_ROWS = 16
QUANTIZED_PRODUCTS = ("quantized_matmul", "rms_norm_quantized_matmul")
MERGE_HEADS = (0, 2, 1, 3)


def rewritten(
    graph: Graph, replace: Callable[[Graph, Node, tuple[int, ...]], int | None]
) -> tuple[Graph, dict[int, int]]:
    """A copy of `graph` in which `replace(new, node, inputs)` may build a node's value in
    the new graph (from its inputs' new ids) and return its id, or None to copy the node;
    and the new id of every old node."""
    new = Graph(
        parameter_specs=dict(graph.parameter_specs),
        parameter_views=dict(graph.parameter_views),
    )
    ids: dict[int, int] = {}
    for node in graph.nodes:
        inputs = tuple(ids[i] for i in node.inputs)
        nid = replace(new, node, inputs)
        if nid is None:
            nid = len(new.nodes)
            new.nodes.append(dataclasses.replace(node, id=nid, inputs=inputs))
            if node.op == "input":
                new.inputs[node.name] = nid
            elif node.op == "parameter":
                new.parameters[node.name] = nid
        ids[node.id] = nid
    new.outputs = {name: ids[i] for name, i in graph.outputs.items()}
    new.updates = {ids[t]: ids[v] for t, v in graph.updates.items()}
    new.write_backs = {ids[t]: [ids[v] for v in vs] for t, vs in graph.write_backs.items()}
    return new, ids


def lowered(graph: Graph) -> tuple[Graph, dict[int, int] | None]:
    """`graph` after every rewrite of this module, and the new id of every old node (None
    when nothing changed)."""
    ids: dict[int, int] | None = None
    for rewrite in (dense_quantized_products, tokens_first_attention):
        graph, step = rewrite(graph)
        if step is not None:
            ids = step if ids is None else {old: step[i] for old, i in ids.items()}
    return graph, ids


# -- quantized products of many rows ----------------------------------------------------------


def _dense(graph: Graph, node: Node) -> bool:
    if node.op not in QUANTIZED_PRODUCTS:
        return False
    return math.prod(graph.nodes[node.inputs[0]].type.shape[:-1]) > QUANTIZED_ROWS


def dense_quantized_products(graph: Graph) -> tuple[Graph, dict[int, int] | None]:
    """`graph` with its quantized products of many rows made dense (module docstring), and
    the new id of every old node; the graph itself and None when there is none."""
    if not any(_dense(graph, node) for node in graph.nodes):
        return graph, None

    def replace(new: Graph, node: Node, inputs: tuple[int, ...]) -> int | None:
        if not _dense(graph, node):
            return None
        *operands, raw = (Tensor(new, i) for i in inputs)
        qtype, shape = node.attrs["qtype"], node.attrs["shape"]
        weight = new.apply("dequantize", [raw], qtype=qtype, shape=shape)
        if node.op == "quantized_matmul":
            return new.apply("matmul", [*operands, weight], trans_a=False, trans_b=True).id
        eps = node.attrs["eps"]
        return new.apply("rms_norm_matmul", [*operands, weight], eps=eps, trans_b=True).id

    return rewritten(graph, replace)


# -- attention outputs stored tokens first --------------------------------------------------


def _heads_first_outputs(graph: Graph) -> dict[int, list[int]]:
    """{attention node: the segment nodes reading its [B, Hq, Tq, Dv] output} for each
    attention stored heads first whose only readers are segments and one of whose output
    segments is permuted to tokens first."""
    readers: dict[int, list[int]] = {}
    for node in graph.nodes:
        for i in set(node.inputs):
            readers.setdefault(i, []).append(node.id)
    roots = set(graph.outputs.values()) | set(graph.updates.values())
    found = {}
    for node in graph.nodes:
        if node.op != "attention" or node.attrs["tokens_first"] or node.id in roots:
            continue
        q, v = (graph.nodes[i].type for i in (node.inputs[0], node.inputs[2]))
        heads_first = (*q.shape[:3], v.shape[3])
        users = [graph.nodes[u] for u in readers.get(node.id, [])]
        if not users or any(u.op != "segment" for u in users):
            continue
        outputs = [u for u in users if u.attrs["start"] == 0 and u.type.shape == heads_first]
        merged = any(
            graph.nodes[r].op == "permute" and tuple(graph.nodes[r].attrs["axes"]) == MERGE_HEADS
            for u in outputs
            for r in readers.get(u.id, [])
        )
        if merged and all(u.id not in roots for u in outputs):
            found[node.id] = [u.id for u in outputs]
    return found


def tokens_first_attention(graph: Graph) -> tuple[Graph, dict[int, int] | None]:
    """`graph` with attention outputs that are merged into rows stored tokens first (module
    docstring), and the new id of every old node; the graph itself and None if none is."""
    chosen = _heads_first_outputs(graph)
    if not chosen:
        return graph, None
    outputs = {s for segments in chosen.values() for s in segments}

    def replace(new: Graph, node: Node, inputs: tuple[int, ...]) -> int | None:
        if node.id in chosen:
            attrs = {**node.attrs, "tokens_first": True}
            return new.apply("attention", [Tensor(new, i) for i in inputs], **attrs).id
        if node.id in outputs:  # the output read back as [B, Hq, Tq, Dv]
            B, Hq, Tq, Dv = node.type.shape
            stored = segment(Tensor(new, inputs[0]), 0, (B, Tq, Hq, Dv))
            return stored.permute(*MERGE_HEADS).id
        return None

    return rewritten(graph, replace)
