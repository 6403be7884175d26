"""Horizontal fusion: matmuls of one input by several weights become one matmul.

Q, K and V projections (and gate and up) multiply the same activations by different weight
matrices. Stored side by side in one parameter, the weights make one matmul whose output
columns are the projections: one launch instead of three, the input read once, and in the
backward pass one matmul each for the input and the weight gradient. The concatenated weight
is a parameter of its own (`storage`); the original parameters become `ParameterView`s of
it, so sessions still load, read, save and train them by their names.

GGUF-quantized weights ([out, in] rows of blocks, read by `quantized_matmul`) are stored
side by side the same way: whole rows of blocks, one after the other.

This runs before the e-graph because it creates a parameter, which no rewrite rule can.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from meganeura.graph import Graph, ParameterSpec, ParameterView, Tensor
from meganeura.ops.quant import BLOCK, QUANT_LAYOUTS

FLOATS = ("f32", "f16")


@dataclasses.dataclass
class Group:
    """Weights that are always multiplied by the same inputs, and those matmuls."""

    weights: list[int]  # weight parameters, in the order they are stored
    axis: int  # axis of the weights along which they are stacked
    trans_b: bool  # whether the matmuls read the weights transposed
    matmuls: list[list[int]]  # per input multiplied: the matmul of each weight
    hidden: list[int]  # transposes of the weights, which go away
    columns: list[int]  # output columns of each weight's matmul
    quantized: tuple[str, int] | None = None  # (qtype, in features) of quantized weights


def sibling_groups(graph: Graph, live: list[int], group_key=None) -> list[Group]:
    """Weights that every reader multiplies together with the same other weights (a model
    with several computations, prefill and decode, multiplies one set by several inputs).
    A weight may be read through a transpose (`x @ w.T`, as exports spell a linear layer)."""
    users: dict[int, list[int]] = defaultdict(list)
    for nid in live:
        for i in graph.nodes[nid].inputs:
            users[i].append(nid)
    updated = set(graph.updates) | set(graph.write_backs)

    def weight_of(m: int, b: int) -> tuple[int, bool, int | None] | None:
        """(weight parameter, whether the matmul reads it transposed, the transpose node)."""
        trans, node, hidden = graph.nodes[m].attrs["trans_b"], graph.nodes[b], None
        if node.op == "permute" and node.attrs["axes"] == (1, 0) and users[b] == [m]:
            b, trans, hidden = node.inputs[0], not trans, b
        w = graph.nodes[b]
        if w.op != "parameter" or b in updated or w.type.ndim != 2 or w.type.dtype not in FLOATS:
            return None
        return b, trans, hidden

    uses: dict[int, list[tuple[tuple, int, int | None]]] = defaultdict(list)
    columns: dict[int, int] = {}
    for nid in live:
        node = graph.nodes[nid]
        if node.op == "quantized_matmul":
            found = _quantized_weight(graph, node, updated)
            if found is not None:
                w, key = found
                columns[w] = node.attrs["shape"][0]
                uses[w].append(((node.inputs[0], *key), nid, None))
            continue
        if node.op != "matmul" or node.attrs["trans_a"]:
            continue
        a, b = node.inputs
        found = weight_of(nid, b)
        if found is None or a == b:
            continue
        w, trans_b, hidden = found
        wn = graph.nodes[w]
        spec = graph.parameter_specs[wn.name]
        k = wn.type.shape[1] if trans_b else wn.type.shape[0]
        columns[w] = wn.type.shape[0] if trans_b else wn.type.shape[1]
        key = (a, trans_b, k, wn.type.dtype, spec.trainable, spec.state)
        if group_key is not None:
            key += (group_key(wn.name),)
        uses[w].append((key, nid, hidden))
    together: dict[tuple, list[int]] = defaultdict(list)
    for w, found in uses.items():
        keys = tuple(key for key, _, _ in found)
        readers = sorted(hidden if hidden is not None else m for _, m, hidden in found)
        if len(set(keys)) == len(keys) and sorted(users[w]) == readers:
            together[tuple(sorted(keys, key=repr))].append(w)
    groups = []
    for keys, weights in together.items():
        if len(weights) < 2:
            continue
        quantized = keys[0][1:3] if keys[0][1] in QUANT_LAYOUTS else None
        trans_b = quantized is not None or keys[0][1]
        matmuls = [[m for w in weights for key, m, _ in uses[w] if key == k] for k in keys]
        hidden = [h for w in weights for _, _, h in uses[w] if h is not None]
        axis = 0 if trans_b else 1
        sizes = [columns[w] for w in weights]
        groups.append(Group(weights, axis, trans_b, matmuls, hidden, sizes, quantized))
    return groups


def _quantized_weight(graph: Graph, node, updated) -> tuple[int, tuple] | None:
    """(raw weight parameter, key) of a quantized_matmul whose weight rows are whole u32
    words (so weights can be stored one after another), else None."""
    raw = node.inputs[1]
    wn = graph.nodes[raw]
    qtype, (_, cols) = node.attrs["qtype"], node.attrs["shape"]
    if wn.op != "parameter" or raw in updated or (cols // BLOCK * QUANT_LAYOUTS[qtype]) % 4:
        return None
    spec = graph.parameter_specs[wn.name]
    return raw, (qtype, cols, spec.trainable, spec.state)


def storage_name(names: list[str]) -> str:
    """One name for weights stored together: their common prefix, then the rest of each."""
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = "".join(f"{p}." for p in parts[0][:common])
    return f"{prefix}[{','.join(n[len(prefix) :] for n in names)}]"


def concatenate_siblings(
    graph: Graph, live: list[int], group_key=None
) -> tuple[Graph, dict[int, int], int]:
    """`graph` with each group of sibling matmuls computed by one matmul over a concatenated
    weight, the new id of every old node (weights that became views have none), and the
    number of matmuls merged away. Weights are only stored together when `group_key` (of a
    parameter name) is equal for them: an optimizer trains them alike."""
    groups = sibling_groups(graph, live, group_key)
    if not groups:
        return graph, {n: n for n in live}, 0
    group_of_weight = {w: g for g in groups for w in g.weights}
    group_of_matmul = {
        m: (g, k, n) for g in groups for k, ms in enumerate(g.matmuls) for n, m in enumerate(ms)
    }
    hidden = {h for g in groups for h in g.hidden}
    new = Graph(
        parameter_specs=dict(graph.parameter_specs),
        parameter_views=dict(graph.parameter_views),
    )
    ids: dict[int, int] = {}
    storage: dict[int, int] = {}  # id(group) -> storage node in `new`
    shared: dict[tuple[int, int], int] = {}  # (id(group), input index) -> shared matmul
    keep = set(live)
    for node in graph.nodes:
        if node.id in hidden or (node.id not in keep and node.op not in ("input", "parameter")):
            continue
        if node.id in group_of_weight:
            group = group_of_weight[node.id]
            if id(group) not in storage:
                storage[id(group)] = _add_storage(new, graph, group)
            continue
        if node.id in group_of_matmul:
            group, k, member = group_of_matmul[node.id]
            if (id(group), k) not in shared:
                a = Tensor(new, ids[node.inputs[0]])
                w = Tensor(new, storage[id(group)])
                if group.quantized:
                    qtype, cols = group.quantized
                    shape = (sum(group.columns), cols)
                    product = new.apply("quantized_matmul", [a, w], qtype=qtype, shape=shape)
                else:
                    product = new.apply("matmul", [a, w], trans_b=group.trans_b)
                shared[id(group), k] = product.id
            ids[node.id] = _columns(new, graph, group, member, shared[id(group), k])
            continue
        inputs = tuple(ids[i] for i in node.inputs)
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
    merged = sum((len(g.weights) - 1) * len(g.matmuls) for g in groups)
    return new, ids, merged


def _add_storage(new: Graph, graph: Graph, group: Group) -> int:
    weights = [graph.nodes[w] for w in group.weights]
    names = [w.name for w in weights]
    name = storage_name(names)
    shape = list(weights[0].type.shape)
    shape[group.axis] = sum(w.type.shape[group.axis] for w in weights)
    nid = len(new.nodes)
    first = graph.parameter_specs[names[0]]
    new._append(
        "parameter",
        (),
        {"name": name},
        dataclasses.replace(weights[0].type, shape=tuple(shape)),
        name,
    )
    new.parameters[name] = nid
    new.parameter_specs[name] = ParameterSpec(
        init=None, trainable=first.trainable, state=first.state
    )
    start = 0
    for w in weights:
        stop = start + w.type.shape[group.axis]
        new.parameter_views[w.name] = ParameterView(name, group.axis, start, stop)
        start = stop
    return nid


def _columns(new: Graph, graph: Graph, group: Group, index: int, shared: int) -> int:
    """The output of weight `index` of the group: its columns of the shared matmul's output."""
    sizes = group.columns
    start = sum(sizes[:index])
    out = new.nodes[shared].type
    starts = [0] * out.ndim
    stops = list(out.shape)
    starts[-1], stops[-1] = start, start + sizes[index]
    return new.apply("slice", [Tensor(new, shared)], starts=starts, stops=stops).id
