"""Assembling the optimized graph: region templates replayed for their instances.

Every value the new graph needs is built on demand, from the graph's roots down: a node
owned by a region instance comes from its template (with that instance's boundary nodes for
the template's leaves), a node kept as written (its attributes could not be encoded) is
rebuilt on its inputs' new nodes. Nodes are only appended, so the new graph stays in
topological order; equal nodes that different instances produce are built once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from meganeura.graph import Graph, Tensor
from meganeura.optimize.encode import ConstantPool, codec
from meganeura.optimize.region import Template, TemplateNode, emit_node


@dataclass
class Instance:
    """A region instance: a template applied to its own boundary nodes."""

    template: Template
    boundary: list[int]  # Ext k -> old node id
    roots: dict[int, int]  # old root node id -> template node index
    values: dict[int, int] = field(default_factory=dict)  # template index -> new id


def assemble(graph: Graph, wanted, owner, opaque: set[int], pool: ConstantPool):
    """The new graph: sources first (same names, same order), then every root on demand."""
    new = Graph(
        parameter_specs=dict(graph.parameter_specs), parameter_views=dict(graph.parameter_views)
    )
    ids: dict[int, int] = {}
    for node in graph.nodes:
        if node.op == "input":
            ids[node.id] = new.input(node.name, node.type.shape, node.type.dtype).id
        elif node.op == "parameter":
            nid = len(new.nodes)
            new._append("parameter", (), {"name": node.name}, node.type, node.name)
            new.parameters[node.name] = nid
            ids[node.id] = nid
    built: dict = {}

    def ready(old: int) -> int | None:
        return ids.get(old)

    # Iterative demand-driven emission: a stack of old node ids (or instance/template pairs).
    for root in wanted:
        stack: list = [("node", root)]
        while stack:
            item = stack[-1]
            if item[0] == "node":
                old = item[1]
                if old in ids:
                    stack.pop()
                    continue
                if old in owner:
                    instance, t = owner[old]
                    if t in instance.values:
                        ids[old] = instance.values[t]
                        stack.pop()
                    else:
                        stack.append(("tmpl", instance, t))
                    continue
                node = graph.nodes[old]
                if node.op == "constant":
                    ids[old] = new.constant(node.attrs["value"], node.type.dtype).id
                    stack.pop()
                    continue
                if old not in opaque:
                    raise AssertionError(f"optimize: no region computes {node.describe()}")
                missing = [i for i in node.inputs if ready(i) is None]
                if missing:
                    stack.extend(("node", i) for i in missing)
                    continue
                ids[old] = new.apply(
                    node.op, [Tensor(new, ids[i]) for i in node.inputs], **node.attrs
                ).id
                stack.pop()
            else:
                _, instance, t = item
                if t in instance.values:
                    stack.pop()
                    continue
                tn = instance.template.nodes[t]
                if tn.op == "Ext":
                    old = instance.boundary[tn.attrs]
                    if old not in ids:
                        stack.append(("node", old))
                        continue
                    instance.values[t] = ids[old]
                    stack.pop()
                    continue
                missing = [i for i in tn.inputs if i not in instance.values]
                if missing:
                    stack.extend(("tmpl", instance, i) for i in missing)
                    continue
                instance.values[t] = _emit_one(new, tn, instance.values, pool, built)
                stack.pop()
    return new, ids


def _emit_one(new: Graph, tn: TemplateNode, values: dict[int, int], pool, built: dict) -> int:
    """Append one template node, or reuse the equal node already built."""
    inputs = [values[i] for i in tn.inputs]
    if tn.op in ("Scalar", "Const"):
        key = (tn.op, tn.attrs, tn.type)
    else:
        key = (tn.op, codec(tn.op).encode(tn.attrs), tuple(inputs))
    if key not in built:
        built[key] = emit_node(new, tn, inputs, pool)
    return built[key]
