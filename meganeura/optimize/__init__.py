"""E-graph optimization: rewrite a whole graph into fewer, fused kernels, computing the same.

`optimize(graph, roots)` returns a new graph with the same inputs, parameters, outputs and
updates (by name), whose nodes are chosen by equality saturation (egglog) and a byte-traffic
cost model. The graph is cut into regions: each repeated block (a transformer layer, its
backward, its optimizer updates) is found by structure, optimized once and replayed for every
copy; the rest is one more region. Nodes whose attributes cannot be encoded stay as they are.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from meganeura.graph import Graph
from meganeura.ops import get_op
from meganeura.optimize.assemble import Instance, assemble
from meganeura.optimize.blocks import Block, find_blocks
from meganeura.optimize.encode import ConstantPool, codec, constant_key, encodable
from meganeura.optimize.extract import CostModel
from meganeura.optimize.horizontal import concatenate_siblings
from meganeura.optimize.region import Template, optimize_region
from meganeura.optimize.report import OptimizeReport, count_kernels, fusions, step_stats
from meganeura.optimize.rules import STAGES, built_ops

__all__ = [
    "CostModel",
    "OptimizeReport",
    "Optimized",
    "count_kernels",
    "fusions",
    "optimize",
    "step_stats",
]


@dataclass
class Optimized:
    graph: Graph
    ids: dict[int, int]  # every root (and source) of the old graph -> its node in the new one
    report: OptimizeReport


def optimize(
    graph: Graph,
    roots: Iterable[int] = (),
    model: CostModel | None = None,
    blocks: bool = True,
    count: bool = False,
    horizontal: bool = True,
    group_key: Callable[[str], Hashable] | None = None,
    before_autodiff: bool = False,
) -> Optimized:
    """Optimize everything that `roots`, the graph's outputs, updates and write-backs need.

    With `count`, the report gives nodes and kernels per run before and after. With
    `horizontal`, matmuls of one input by several weights share one matmul over the weights
    stored together (the new graph's `parameter_views` say where each weight lives), if
    `group_key` of their names agree. With `before_autodiff` (the graph is differentiated
    next), norms stay out of the matmuls that read them: the backward pass, not built yet,
    reads the normalized rows; the pass over the whole step graph decides.
    """
    model = model or CostModel()
    stages = tuple(s for s in STAGES if not (before_autodiff and s == "prologue"))
    report = OptimizeReport()
    start = time.perf_counter()
    original = graph
    roots = list(roots)
    written = [v for values in graph.write_backs.values() for v in values]
    all_roots = list(
        dict.fromkeys([*roots, *graph.outputs.values(), *graph.updates.values(), *written])
    )
    graph, canon = deduplicated(graph, graph.live_nodes(all_roots))
    if horizontal:
        graph, moved, merged = concatenate_siblings(
            graph, graph.live_nodes([canon[r] for r in all_roots]), group_key
        )
        canon = {old: moved[c] for old, c in canon.items() if c in moved}
        if merged:
            report.fusions["concat_matmul"] = merged
    wanted = list(dict.fromkeys(canon[r] for r in all_roots))
    live = graph.live_nodes(wanted)
    sources = {"input", "parameter"}
    compute = [n for n in live if graph.nodes[n].op not in sources]
    opaque = {n for n in compute if not encodable(graph.nodes[n])}

    users: dict[int, list[int]] = {}
    for nid in live:
        for i in graph.nodes[nid].inputs:
            users.setdefault(i, []).append(nid)
    outside_roots = set(wanted)

    found = find_blocks(graph, [n for n in compute if n not in opaque], users, outside_roots)
    report.seconds["blocks"] = time.perf_counter() - start
    in_block: set[int] = set()
    for block in found if blocks else []:
        for chunk in block.chunks:
            in_block.update(chunk)
    rest = [n for n in compute if n not in opaque and n not in in_block]

    pool = ConstantPool()
    owner: dict[int, tuple[Instance, int]] = {}
    for block in found if blocks else []:
        _optimize_block(graph, block, users, outside_roots, pool, model, report, owner, stages)
    if rest:
        rest_set = set(rest)
        rest_roots = [
            n
            for n in rest
            if n in outside_roots or any(u not in rest_set for u in users.get(n, ()))
        ]
        free = _free_roots(graph, rest_roots, users, outside_roots, rest_set)
        template, boundary, stats = optimize_region(
            graph, rest, rest_roots, pool, model, free_roots=free, stages=stages
        )
        _account(report, stats, template, graph, rest, 1)
        instance = Instance(template, boundary, template.roots)
        for r, t in template.roots.items():
            owner[r] = (instance, t)

    new, emitted = assemble(graph, wanted, owner, opaque, pool)
    ids = {old: emitted[c] for old, c in canon.items() if c in emitted}
    for name, old in original.outputs.items():
        new.outputs[name] = ids[old]
    for target, value in original.updates.items():
        new.updates[ids[target]] = ids[value]
    for target, values in original.write_backs.items():
        new.write_backs[ids[target]] = list(dict.fromkeys(ids[v] for v in values))
    report.seconds["emit"] = time.perf_counter() - start - sum(report.seconds.values())
    if count:
        report.nodes_before, report.kernels_before = count_kernels(original, all_roots)
        after = [ids[r] for r in all_roots]
        report.nodes_after, report.kernels_after = count_kernels(new, after)
    return Optimized(new, ids, report)


def deduplicated(graph: Graph, live: list[int]) -> tuple[Graph, dict[int, int]]:
    """`graph` with equal nodes (same op, attributes and inputs; constants by value) merged,
    and each live node's representative. Autodiff and hand-written models repeat small
    computations (row statistics, transposes); merged, they are seen by every reader. Its
    write-backs name the representatives."""
    canon: dict[int, int] = {}
    seen: dict[tuple, int] = {}
    nodes = list(graph.nodes)
    for nid in live:
        node = graph.nodes[nid]
        inputs = tuple(canon[i] for i in node.inputs)
        if node.op in ("input", "parameter"):
            canon[nid] = nid
            continue
        if node.op == "constant":
            key = ("constant", node.type, constant_key(node.attrs["value"]))
        elif encodable(node):
            key = (node.op, codec(node.op).encode(node.attrs), inputs)
        else:
            key = ("opaque", nid)
        canon[nid] = seen.setdefault(key, nid)
        if inputs != node.inputs:
            nodes[nid] = dataclasses.replace(node, inputs=inputs)
    # Equal write-backs of one state (a layer built twice over the same cache write) are one.
    write_backs = {
        target: list(dict.fromkeys(canon.get(v, v) for v in values))
        for target, values in graph.write_backs.items()
    }
    return dataclasses.replace(graph, nodes=nodes, write_backs=write_backs), canon


def _optimize_block(graph, block: Block, users, outside_roots, pool, model, report, owner, stages):
    """Optimize the block's first chunk; every chunk becomes an instance of its template."""
    rep = block.chunks[0]
    roots = [rep[o] for o in block.outputs]
    index = {nid: k for k, nid in enumerate(block.boundary[0])}
    free_in_all = set.intersection(
        *(
            {
                chunk.index(r)
                for r in _free_roots(
                    graph, [chunk[o] for o in block.outputs], users, outside_roots, set(chunk)
                )
            }
            for chunk in block.chunks
        )
    )
    template, _, stats = optimize_region(
        graph,
        rep,
        roots,
        pool,
        model,
        boundary_of=index.__getitem__,
        free_roots={rep[t] for t in free_in_all},
        stages=stages,
    )
    _account(report, stats, template, graph, rep, len(block.chunks))
    report.blocks.append(
        {"nodes": len(rep), "copies": len(block.chunks), "boundary": len(block.boundary[0])}
    )
    root_template = {o: template.roots[rep[o]] for o in block.outputs}
    for chunk, chunk_boundary in zip(block.chunks, block.boundary, strict=True):
        instance = Instance(
            template, chunk_boundary, {chunk[o]: t for o, t in root_template.items()}
        )
        for r, t in instance.roots.items():
            owner[r] = (instance, t)


def _free_roots(graph: Graph, roots, users, outside_roots, region: set[int]) -> set[int]:
    """Region roots that their one reader outside the region inlines: views, and pointwise
    values read once outside (by an op that does not need a buffer). The extraction charges
    them a buffer only if it also reads them inside."""
    out = set()
    for r in roots:
        if r in outside_roots:
            continue
        kind = get_op(graph.nodes[r].op).kind
        outside = [u for u in users.get(r, ()) if u not in region]
        if kind == "view":
            out.add(r)
        elif (
            kind in ("pointwise", "inline")
            and len(outside) == 1
            and not get_op(graph.nodes[outside[0]].op).strided_inputs
        ):
            out.add(r)
    return out


def _account(report, stats, template: Template, graph: Graph, region, copies: int) -> None:
    report.regions += 1
    report.enodes += stats.enodes
    report.eclasses += stats.eclasses
    for name, count in stats.rules_fired.items():
        report.rules_fired[name] = report.rules_fired.get(name, 0) + count
    for name, secs in stats.seconds.items():
        report.seconds[name] = report.seconds.get(name, 0.0) + secs
    before = Counter(graph.nodes[n].op for n in region)
    after = Counter(tn.op for tn in template.nodes)
    for op in built_ops():
        gained = after.get(op, 0) - before.get(op, 0)
        if gained > 0:
            report.fusions[op] = report.fusions.get(op, 0) + gained * copies
