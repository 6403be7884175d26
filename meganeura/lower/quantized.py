"""Quantized products of many rows become dense products of the dequantized weight.

`quantized_matmul` (and `rms_norm_quantized_matmul`) kernels decode the weight's blocks as
they read them and take MAX_TILE rows of x per workgroup, decoding the weight again for
every such tile of rows: right for decoding (one row), slow for a prompt (on an H200 a
128-row prefill's quantized products took about 290 us each, the dense ones 35 us). So,
after the optimizer has merged sibling weights and moved norms into the products, a product
of more than QUANTIZED_ROWS rows is rewritten as `matmul(x, dequantize(raw), trans_b=True)`
(`rms_norm_matmul` for the norm's form): one launch writes the f32 weight into a transient
buffer, placed right before its product so the memory plan reuses one buffer for them all,
and the tiled f32 kernels take it from there -- as llama.cpp dequantizes weights for the
matrix products of batched prompts. Decoding keeps the weights quantized.
"""

from __future__ import annotations

import dataclasses
import math

from meganeura.graph import Graph, Tensor

QUANTIZED_ROWS = 16
QUANTIZED_PRODUCTS = ("quantized_matmul", "rms_norm_quantized_matmul")


def _dense(graph: Graph, node) -> bool:
    if node.op not in QUANTIZED_PRODUCTS:
        return False
    return math.prod(graph.nodes[node.inputs[0]].type.shape[:-1]) > QUANTIZED_ROWS


def dense_quantized_products(graph: Graph) -> tuple[Graph, dict[int, int] | None]:
    """`graph` with its quantized products of many rows made dense (module docstring), and
    the new id of every old node; the graph itself and None when there is none."""
    if not any(_dense(graph, node) for node in graph.nodes):
        return graph, None
    new = Graph(
        parameter_specs=dict(graph.parameter_specs),
        parameter_views=dict(graph.parameter_views),
    )
    ids: dict[int, int] = {}
    for node in graph.nodes:
        inputs = tuple(ids[i] for i in node.inputs)
        if _dense(graph, node):
            *operands, raw = (Tensor(new, i) for i in inputs)
            qtype, shape = node.attrs["qtype"], node.attrs["shape"]
            weight = new.apply("dequantize", [raw], qtype=qtype, shape=shape)
            if node.op == "quantized_matmul":
                out = new.apply("matmul", [*operands, weight], trans_a=False, trans_b=True)
            else:
                eps = node.attrs["eps"]
                out = new.apply("rms_norm_matmul", [*operands, weight], eps=eps, trans_b=True)
            ids[node.id] = out.id
            continue
        nid = len(new.nodes)
        new.nodes.append(dataclasses.replace(node, id=nid, inputs=inputs))
        ids[node.id] = nid
        if node.op == "input":
            new.inputs[node.name] = nid
        elif node.op == "parameter":
            new.parameters[node.name] = nid
    new.outputs = {name: ids[i] for name, i in graph.outputs.items()}
    new.updates = {ids[t]: ids[v] for t, v in graph.updates.items()}
    new.write_backs = {ids[t]: [ids[v] for v in vs] for t, vs in graph.write_backs.items()}
    return new, ids
