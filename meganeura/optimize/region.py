"""One region of a graph through the e-graph: encode, saturate, extract, emit.

A region is a set of nodes; what it reads from outside (inputs, parameters, values of other
regions) are `Ext` leaves, and its roots are the nodes that something outside reads. The
result is a `Template`: the chosen e-nodes as a small DAG over those leaves, which `emit`
appends to a graph for any instance of the region (the region itself, or a repeated block
with the same structure).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from meganeura.graph import Graph, Tensor
from meganeura.ops import INLINED_KINDS, get_op
from meganeura.optimize.egraph import EGraphRun, ENode, prepared
from meganeura.optimize.encode import ConstantPool, codec, encode_region, parse_type
from meganeura.optimize.extract import CostModel, Extraction
from meganeura.optimize.facts import DECLARATIONS, tables
from meganeura.optimize.rules import STAGES, available_rules, schedule, types_rules


@dataclass
class TemplateNode:
    op: str  # op name, or "Ext" / "Scalar" / "Const"
    attrs: dict | int | float  # op attributes, or the leaf's key
    type: str
    inputs: tuple[int, ...] = ()  # indices of earlier template nodes


@dataclass
class Template:
    """A region's optimized form: nodes in topological order over its boundary leaves."""

    nodes: list[TemplateNode]
    roots: dict[int, int]  # original root node id -> template node index
    stats: dict = field(default_factory=dict)


@dataclass
class RegionStats:
    enodes: int = 0
    eclasses: int = 0
    rules_fired: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    folded: int = 0


def _program() -> str:
    rules = available_rules()
    lines = [DECLARATIONS, types_rules()]
    lines += [f"(ruleset {stage})" for stage in STAGES]
    lines += [r.text() for r in rules]
    return "\n".join(lines)


def buffered_nodes(graph: Graph, region: list[int], roots: set[int]) -> set[int]:
    """Nodes of the region that keep a buffer whatever the rewrites: the roots, kernel
    outputs and matmul-like operands. Pointwise values read several times are left out:
    rewrites often leave them read once (the bottom-up estimate counts shared reads twice)."""
    inside = set(region)
    out = set()
    for nid in region:
        node = graph.nodes[nid]
        opdef = get_op(node.op)
        if nid in roots or opdef.kind not in INLINED_KINDS:
            out.add(nid)
        if opdef.strided_inputs:
            out.update(i for i in node.inputs if i in inside)
    return out


def optimize_region(
    graph: Graph,
    region: list[int],
    roots: list[int],
    pool: ConstantPool,
    model: CostModel,
    boundary_of=None,
    free_roots: set[int] = frozenset(),
    stages: tuple[str, ...] = STAGES,
) -> tuple[Template, list[int], RegionStats]:
    """Optimize `region` (topologically ordered ids) so that `roots` keep their values.

    `free_roots` are roots that their one outside reader inlines (they need no buffer);
    `stages` are the rule stages that run.

    Returns the template, the boundary (Ext k -> graph node id) and statistics.
    """
    stats = RegionStats()
    start = time.perf_counter()
    run = EGraphRun(prepared(_program()))
    enc = encode_region(graph, region, pool, boundary_of)
    run.seconds["setup"] = time.perf_counter() - start
    with run:
        run.feed_lines(enc.lines, "encode")
        run.feed_lines(tables(enc, pool), "encode")
        run.run(schedule(stages), "saturate")
        frozen = run.freeze()
    start = time.perf_counter()
    root_classes = [frozen.class_of_node[r] for r in roots]
    kept = set(roots) - set(free_roots)
    buffered = {frozen.class_of_node[n] for n in buffered_nodes(graph, region, kept)}
    free = {frozen.class_of_node[r] for r in free_roots} - {frozen.class_of_node[r] for r in kept}
    extraction = Extraction(frozen, root_classes, buffered, model, free)
    choice = extraction.run()
    template = _template(frozen, choice, roots, root_classes)
    run.seconds["extract"] = time.perf_counter() - start
    stats.enodes = frozen.num_enodes
    stats.eclasses = sum(1 for c in frozen.classes if c)
    stats.rules_fired = run.rules_fired
    stats.seconds = run.seconds
    stats.folded = enc.folded
    return template, enc.boundary, stats


def _template(frozen, choice: list[ENode | None], roots, root_classes) -> Template:
    order = _topological(choice, root_classes)
    index: dict[int, int] = {}
    nodes: list[TemplateNode] = []
    for c in order:
        node = choice[c]
        if node.op in ("Ext", "Scalar", "Const"):
            nodes.append(TemplateNode(node.op, node.attrs, node.type))
        else:
            attrs = codec(node.op).decode(node.attrs)
            nodes.append(
                TemplateNode(node.op, attrs, node.type, tuple(index[k] for k in node.children))
            )
        index[c] = len(nodes) - 1
    return Template(nodes, {r: index[c] for r, c in zip(roots, root_classes, strict=True)})


def _topological(choice, roots: list[int]) -> list[int]:
    seen: set[int] = set()
    order: list[int] = []
    for r in roots:
        if r in seen:
            continue
        seen.add(r)
        stack = [(r, 0)]
        while stack:
            c, i = stack[-1]
            kids = choice[c].children
            if i < len(kids):
                stack[-1] = (c, i + 1)
                if kids[i] not in seen:
                    seen.add(kids[i])
                    stack.append((kids[i], 0))
            else:
                order.append(c)
                stack.pop()
    return order


def emit_node(graph: Graph, tn: TemplateNode, inputs: list[int], pool: ConstantPool) -> int:
    """Append one template node to `graph`, reading `inputs` (node ids of `graph`)."""
    want = parse_type(tn.type)
    if tn.op == "Scalar":
        return graph.constant(np.full(want.shape, tn.attrs), want.dtype).id
    if tn.op == "Const":
        return graph.constant(pool.arrays[tn.attrs], want.dtype).id
    out = graph.apply(tn.op, [Tensor(graph, i) for i in inputs], **tn.attrs)
    if out.type != want:
        raise AssertionError(
            f"optimize: rebuilt {tn.op} has type {out.type}, its e-class has {tn.type}"
        )
    return out.id
