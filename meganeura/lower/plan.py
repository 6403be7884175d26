"""Lowering: choose kernels for a graph and plan the buffers they use.

Every node that must exist in device memory is *materialized*: sources (inputs, parameters,
non-scalar constants), the outputs of non-pointwise kernels (reductions, row ops, matmuls),
the roots, and pointwise values read by several kernels. Everything else (pointwise ops and
views) is inlined into the kernels that read it, so each kernel computes a whole elementwise
DAG, and reductions and row ops absorb their pointwise prologue.

Parameter updates (`graph.updates`) are written straight into the parameter's buffer when the
kernel that computes them is the last reader of the old value; otherwise they are copied at the
end of the step. The memory plan gives transient values buffers by liveness.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from meganeura.graph import Graph
from meganeura.lower.row_writes import RowWrite, row_write
from meganeura.ops import INLINED_KINDS, get_op

# Kinds of kernels that can run a pointwise epilogue in their store: products, and the norms
# (whose backward's dx is where a residual stream's gradients are added up).
EPILOGUE_KINDS = ("matmul", "quantized_matmul", "norm")


@dataclass
class Kernel:
    kind: str  # the op's kind: the archetype that generates its kernel
    node: int  # the node whose value this kernel writes
    reads: list[int] = field(default_factory=list)  # materialized nodes read
    # A product (matmul, quantized_matmul) or norm computed inside this kernel, whose only
    # reader is the pointwise DAG rooted at `node`: that DAG runs in the store as an epilogue
    # (bias, residual, activation, the gradient added to it).
    core: int | None = None
    # A paired epilogue (`pair`, see _paired_halves): the DAG reads the product only through
    # these two slices, its first and second half along the last axis (gate and up of a
    # SwiGLU); the kernel computes both halves' columns j and H + j together and stores the
    # DAG at column j. The DAG's shape is then the product's with half the last axis.
    pair: tuple[int, int] | None = None
    # Pointwise values of the kernel's shape that it also stores (each a materialized node
    # computed inside the kernel, read at the kernel's own index): an optimizer's new moments
    # stored by the kernel that computes the new parameter from them.
    also: list[int] = field(default_factory=list)
    # write_rows nodes whose rows this product kernel stores after its own output, in place
    # in their destination (see row_writes.py): a prompt chunk's keys and values.
    writes: list[RowWrite] = field(default_factory=list)


@dataclass
class Buffer:
    """One device buffer: `kind` is input, param (persistent), constant, root or transient."""

    id: int
    kind: str
    nbytes: int
    nodes: list[int] = field(default_factory=list)


@dataclass
class Plan:
    graph: Graph
    kernels: list[Kernel]
    materialized: set[int]
    buffer_of: dict[int, int]  # materialized node -> buffer id
    buffers: list[Buffer]
    copies: list[tuple[int, int]]  # (source node, target parameter) after the kernels
    roots: list[int]
    # Code generation choices of the executor that compiles the plan (matmul precision, the
    # device's matrix units): archetypes read them, planning does not.
    options: dict = field(default_factory=dict)

    @property
    def transient_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers if b.kind == "transient")


def _is_scalar_constant(node) -> bool:
    return node.op == "constant" and node.type.size == 1


def _pointwise_path_is_identity(
    graph: Graph, start: int, target: int, materialized: set[int]
) -> bool:
    """True when every read of `target` made while computing `start` (through inlined nodes)
    uses the output's own linear index: each step on a path to `target` is a same-shape
    pointwise op or a reshape. Paths that do not lead to `target` may broadcast freely."""
    reaches: dict[int, bool] = {}

    def leads_to_target(nid: int) -> bool:
        if nid not in reaches:
            node = graph.nodes[nid]
            reaches[nid] = nid == target or (
                nid not in materialized and any(leads_to_target(i) for i in node.inputs)
            )
        return reaches[nid]

    def identity_step(parent, child) -> bool:
        kind = get_op(parent.op).kind
        if kind == "view":
            return parent.op == "reshape"
        return kind == "pointwise" and child.type.shape == parent.type.shape

    stack, seen = [start], set()
    while stack:
        nid = stack.pop()
        if nid in seen:
            continue
        seen.add(nid)
        node = graph.nodes[nid]
        for i in node.inputs:
            if not leads_to_target(i):
                continue
            if not identity_step(node, graph.nodes[i]):
                return False
            if i != target:
                stack.append(i)
    return True


def select_kernels(
    graph: Graph,
    roots: list[int],
    updates: dict[int, int],
    max_reads: int = 7,
    pairable: Callable[[Graph, int], bool] | None = None,
):
    """The materialized set and the kernels, in execution order. `pairable(graph, nid)`
    says whether the backend's kernel for product `nid` can run a paired epilogue."""
    live = graph.live_nodes(list(roots) + list(updates.values()))
    users: dict[int, list[int]] = {i: [] for i in live}
    for nid in live:
        for i in graph.nodes[nid].inputs:
            users[i].append(nid)

    materialized: set[int] = set()
    shared: set[int] = set()  # materialized only because several nodes read them
    for nid in live:
        node = graph.nodes[nid]
        kind = get_op(node.op).kind
        if kind == "source":
            if not _is_scalar_constant(node) or nid in roots:
                materialized.add(nid)
        elif kind not in INLINED_KINDS or nid in roots or nid in updates.values():
            materialized.add(nid)
        elif kind == "pointwise" and len(users[nid]) > 1 and node.type.size > 1:
            # A value read by several kernels is computed once into a buffer, unless it is a
            # scalar: recomputing one value in each reader costs less than a launch.
            materialized.add(nid)
            shared.add(nid)
    # Some archetypes read their inputs as strided buffers: views of a buffer pass; anything
    # else is computed into a buffer first. An in-place input must be a buffer of its own.
    required: set[int] = set()
    for nid in live:
        node = graph.nodes[nid]
        opdef = get_op(node.op)
        if opdef.strided_inputs:
            computed = _computed_inputs(graph, node, users, materialized)
            for n, i in enumerate(node.inputs):
                if n not in computed and strided_view(graph, i, materialized) is None:
                    materialized.add(i)
                    required.add(i)
        if opdef.in_place is not None:
            materialized.add(node.inputs[opdef.in_place])
            required.add(node.inputs[opdef.in_place])
    _unshare_single_kernel_values(graph, live, users, materialized, shared - required)

    def leaves(nid: int) -> list[int]:
        return sorted(buffers_read(graph, graph.nodes[nid].inputs, materialized))

    # Respect the binding limit: materialize the widest inlined input until the kernel fits.
    changed = True
    while changed:
        changed = False
        for nid in live:
            if nid not in materialized or get_op(graph.nodes[nid].op).kind == "source":
                continue
            reads = leaves(nid)
            if len(reads) > max_reads:
                inlined = [
                    i
                    for i in graph.nodes[nid].inputs
                    if i not in materialized and not _is_scalar_constant(graph.nodes[i])
                ]
                widest = max(inlined, key=lambda i: len(leaves(i)) if i not in materialized else 0)
                materialized.add(widest)
                changed = True

    fused, pairs = _fuse_epilogues(
        graph, live, roots, updates, materialized, leaves, max_reads, pairable
    )
    kernels = []
    for nid in live:
        if nid in materialized and get_op(graph.nodes[nid].op).kind != "source":
            core = fused.get(nid)
            kind = get_op(graph.nodes[nid if core is None else core].op).kind
            kernels.append(Kernel(kind, nid, leaves(nid), core, pair=pairs.get(nid)))
    return materialized, _merge_side_outputs(graph, kernels, materialized, max_reads)


# A computed operand (OpDef.computed_inputs) is re-evaluated by the workgroups that read it:
# allowed while that is at most this many element evaluations, through at most
# COMPUTED_OPS computing ops (views are index arithmetic and free).
COMPUTED_EVALUATIONS = 1 << 24
COMPUTED_OPS = 8


def _computed_inputs(graph: Graph, node, users, materialized: set[int]) -> set[int]:
    """Positions of `node`'s inputs that its kernel reads through a generated function
    evaluating their inlined DAG, rather than from a buffer stored by a launch of its own:
    those its op allows (OpDef.computed_inputs) that are not affine views of a buffer, read
    by this node alone, and cheap enough to evaluate again in every workgroup that reads them.
    """
    opdef = get_op(node.op)
    if opdef.computed_inputs is None:
        return set()
    types = [graph.nodes[i].type for i in node.inputs]
    allowed = opdef.computed_inputs(types, node.attrs, [graph.nodes[i] for i in node.inputs])
    out = set()
    for n, reads in allowed.items():
        i = node.inputs[n]
        if (
            i in materialized
            or users[i] != [node.id]
            or strided_view(graph, i, materialized) is not None
            or graph.nodes[i].type.size * reads > COMPUTED_EVALUATIONS
        ):
            continue
        ops, stack, seen, epilogue = 0, [i], set(), False
        while stack:
            nid = stack.pop()
            if nid in seen:
                continue
            seen.add(nid)
            kind = get_op(graph.nodes[nid].op).kind
            if nid in materialized or kind == "source":
                # A product of the operand's shape can run the DAG in its store instead, once
                # per element (a Linear's activation): that fusion is preferred.
                epilogue |= (
                    kind in EPILOGUE_KINDS
                    and graph.nodes[nid].type.size == graph.nodes[i].type.size
                    and _pointwise_path_is_identity(graph, i, nid, materialized)
                )
                continue
            ops += kind in ("pointwise", "inline")
            stack.extend(graph.nodes[nid].inputs)
        if ops <= COMPUTED_OPS and not epilogue:
            out.add(n)
    return out


def _unshare_single_kernel_values(graph: Graph, live, users, materialized, candidates) -> None:
    """Inline the values of `candidates` (pointwise values with several readers) whose readers
    all end up in one kernel, as SwiGLU's backward reads sigmoid(gate) twice: the kernel
    computes the value once per index it reads, instead of a launch storing it first."""
    owners: dict[int, frozenset[int]] = {}

    def owners_of(nid: int) -> frozenset[int]:
        if nid in materialized:
            return frozenset([nid])
        if nid not in owners:
            owners[nid] = frozenset().union(*(owners_of(u) for u in users[nid]))
        return owners[nid]

    for nid in reversed(live):
        if nid in candidates:
            found = frozenset().union(*(owners_of(u) for u in users[nid]))
            if len(found) == 1:
                materialized.discard(nid)
                owners.clear()


def _merge_side_outputs(graph: Graph, kernels: list[Kernel], materialized, max_reads: int):
    """Pointwise kernels that read the value of an earlier pointwise kernel of their shape at
    their own index compute that value themselves and store it as a side output, when no
    other kernel reads it before them: one launch instead of two, and the value is not read
    back from memory. AdamW's new moments and new parameter become one kernel."""

    def simple(k: Kernel) -> bool:
        return k.kind == "pointwise" and k.core is None

    by_node = {k.node: k for k in kernels}
    merged: set[int] = set()
    for n, k in enumerate(kernels):
        if not simple(k):
            continue
        size = graph.nodes[k.node].type.size
        for a in list(k.reads):
            src = by_node.get(a)
            if (
                src is None
                or a in merged
                or not simple(src)
                or graph.nodes[a].type.size != size
                or not _pointwise_path_is_identity(graph, k.node, a, materialized - set(k.also))
            ):
                continue
            reads = sorted((set(k.reads) - {a}) | set(src.reads))
            outputs = len(k.also) + len(src.also) + 2
            moved = {a, *src.also}  # everything src stores is now stored at position n
            early = [m for m, r in enumerate(kernels[:n]) if moved & set(r.reads)]
            if len(reads) + outputs > max_reads + 1 or early:
                continue
            k.reads = reads
            k.also = [*k.also, *src.also, a]
            merged.add(a)
    return [k for k in kernels if k.node not in merged]


def _fuse_epilogues(
    graph: Graph, live, roots, updates, materialized, leaves, max_reads, pairable=None
):
    """Inline each matmul whose only reader is a pointwise kernel of its shape, reading it at
    its own index: that kernel becomes the matmul, with the pointwise DAG in its store (bias,
    residual, activation), saving a launch and a round trip through memory. Where the
    backend can pair columns (`pairable`), also a matmul whose only reader reads it through
    its two halves along the last axis (_paired_halves): SwiGLU after the gate/up product.
    Returns {kernel node: the matmul it computes} and {kernel node: its pair of halves}."""
    readers: dict[int, list[int]] = {}
    for k in live:
        if k in materialized and get_op(graph.nodes[k].op).kind != "source":
            for i in set(leaves(k)):
                readers.setdefault(i, []).append(k)
    pinned = set(roots) | set(updates.values())
    fused: dict[int, int] = {}
    pairs: dict[int, tuple[int, int]] = {}
    for nid in live:
        node = graph.nodes[nid]
        users = readers.get(nid, [])
        if get_op(node.op).kind not in EPILOGUE_KINDS or nid in pinned or len(users) != 1:
            continue
        user = users[0]
        if user in fused or get_op(graph.nodes[user].op).kind not in ("pointwise", "view"):
            continue
        pair = None
        if graph.nodes[user].type.size != node.type.size or not _pointwise_path_is_identity(
            graph, user, nid, materialized
        ):
            pair = _paired_halves(graph, user, nid, materialized)
            if pair is None or pairable is None or not pairable(graph, nid):
                continue
        materialized.discard(nid)
        if len(leaves(user)) > max_reads:
            materialized.add(nid)
        else:
            fused[user] = nid
            if pair is not None:
                pairs[user] = pair
    return fused, pairs


def _paired_halves(graph: Graph, user: int, core: int, materialized: set[int]):
    """(first half, second half): the two slices through which the pointwise DAG of `user`
    reads `core`, each at the user's own index, when those are its only reads of it: core
    [..., 2H], the slices [..., :H] and [..., H:], the user [..., H]. Else None."""
    shape, out = graph.nodes[core].type.shape, graph.nodes[user].type.shape
    if not shape or shape[-1] % 2 or out != (*shape[:-1], shape[-1] // 2):
        return None
    half = shape[-1] // 2
    halves: dict[int, int] = {}  # start along the last axis -> slice node
    stack, seen = [user], set()
    while stack:
        nid = stack.pop()
        if nid in seen or (nid in materialized and nid != user):
            continue
        seen.add(nid)
        for i in graph.nodes[nid].inputs:
            if i != core:
                stack.append(i)
                continue
            node = graph.nodes[nid]
            if node.op != "slice" or any(st != 1 for st in node.attrs["steps"]):
                return None
            starts, stops = node.attrs["starts"], node.attrs["stops"]
            full = all(
                (a, b) == (0, n)
                for a, b, n in zip(starts[:-1], stops[:-1], shape[:-1], strict=True)
            )
            if not full or starts[-1] not in (0, half) or stops[-1] != starts[-1] + half:
                return None
            if halves.setdefault(starts[-1], nid) != nid:
                return None
    if len(halves) != 2 or not all(
        _pointwise_path_is_identity(graph, user, s, materialized) for s in halves.values()
    ):
        return None
    return halves[0], halves[half]


def _fuse_row_writes(graph, kernels, in_place, materialized, max_reads, row_writable):
    """The kernels with each write_rows that its rows' product can store (row_writes.py)
    handed to that product's kernel: written in place (the write-back of its destination),
    its rows read no other computed value, no kernel between the two reads the destination,
    and the product's kernel still fits the binding limit with the write's inputs, its
    destination and the table of its columns."""
    index = {k.node: n for n, k in enumerate(kernels)}
    gone: set[int] = set()
    for j, kw in enumerate(kernels):
        node = graph.nodes[kw.node]
        if node.op != "write_rows" or in_place.get(kw.node) != node.inputs[0]:
            continue
        dest, rows = node.inputs[0], node.inputs[1]
        computed = [
            r
            for r in buffers_read(graph, [rows], materialized)
            if get_op(graph.nodes[r].op).kind != "source"
        ]
        if rows in materialized or len(computed) != 1 or computed[0] not in index:
            continue
        product = computed[0]
        i = index[product]
        kx = kernels[i]
        others = set(kw.reads) - {product, dest}
        reads = sorted(set(kx.reads) | others)
        if (
            i > j
            or kx.kind != "matmul"
            or kx.core is not None
            or kx.pair is not None
            or kx.writes
            or kx.also
            or not row_writable(graph, product)
            or any(index.get(r, -1) >= i for r in others)
            or any(dest in k.reads or kw.node in k.reads for k in kernels[i + 1 : j])
            or len(reads) + 3 > max_reads + 1  # + the product, the destination, the table
        ):
            continue
        found = row_write(graph, kw.node, product, materialized)
        if found is None:
            continue
        kx.writes.append(found)
        kx.reads = reads
        gone.add(j)
    return [k for n, k in enumerate(kernels) if n not in gone]


def strided_view(graph: Graph, nid: int, materialized: set[int]):
    """(buffer node, strides, offset) if node `nid` is an affine view of a materialized node
    (reshapes of contiguous data, permutes, broadcasts, slices), else None. Element `c` of the
    view is element `offset + sum(c[d] * strides[d])` of the buffer."""
    node = graph.nodes[nid]
    if nid in materialized:
        return nid, _contiguous_strides(node.type.shape), 0
    kind = get_op(node.op).kind
    if kind != "view":
        return None
    inner = strided_view(graph, node.inputs[0], materialized)
    if inner is None:
        return None
    base, strides, offset = inner
    src_shape = graph.nodes[node.inputs[0]].type.shape
    if node.op == "permute":
        return base, tuple(strides[a] for a in node.attrs["axes"]), offset
    if node.op == "broadcast_to":
        shape = node.type.shape
        lead = len(shape) - len(src_shape)
        out = [0] * lead + [
            0 if src_shape[d] == 1 and shape[lead + d] != 1 else strides[d]
            for d in range(len(src_shape))
        ]
        return base, tuple(out), offset
    if node.op == "slice":
        starts, steps = node.attrs["starts"], node.attrs["steps"]
        offset += sum(a * s for a, s in zip(starts, strides, strict=True))
        return base, tuple(s * c for s, c in zip(strides, steps, strict=True)), offset
    if node.op == "reshape":
        new = reshape_strides(src_shape, strides, node.type.shape)
        return None if new is None else (base, new, offset)
    if node.op == "segment":
        if tuple(strides) == _contiguous_strides(src_shape):
            return base, _contiguous_strides(node.type.shape), offset + node.attrs["start"]
        return None
    return None


def buffers_read(graph: Graph, nids: Iterable[int], materialized: set[int]) -> set[int]:
    """The materialized nodes whose buffers a kernel loads to read nodes `nids`: their own
    buffers, their views' buffers, or the leaves of the DAGs it computes inline (its
    pointwise prologue, a computed operand)."""
    out, stack, seen = set(), list(nids), set()
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        if i in materialized:
            out.add(i)
        else:
            stack.extend(graph.nodes[i].inputs)
    return out


def reshape_strides(shape, strides, new_shape) -> tuple[int, ...] | None:
    """Strides of a strided view reshaped to `new_shape` without a copy, or None when the
    reshape merges dims that are not laid out one after another (NumPy's no-copy rule)."""
    old = [(d, st) for d, st in zip(shape, strides, strict=True) if d != 1]
    out = [0] * len(new_shape)
    oi = ni = 0
    while oi < len(old) and ni < len(new_shape):
        if new_shape[ni] == 1:
            ni += 1
            continue
        oj, nj = oi + 1, ni + 1
        new_size, old_size = new_shape[ni], old[oi][0]
        while new_size != old_size:
            if new_size < old_size:
                new_size *= new_shape[nj]
                nj += 1
            else:
                old_size *= old[oj][0]
                oj += 1
        if any(old[k][1] != old[k + 1][1] * old[k + 1][0] for k in range(oi, oj - 1)):
            return None
        out[nj - 1] = old[oj - 1][1]
        for k in range(nj - 1, ni, -1):
            out[k - 1] = out[k] * new_shape[k]
        oi, ni = oj, nj
    return tuple(out)


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def _in_place_input(graph: Graph, nid: int) -> int | None:
    """The input whose buffer node `nid`'s kernel may write into (OpDef.in_place), if any."""
    node = graph.nodes[nid]
    index = get_op(node.op).in_place
    return None if index is None else node.inputs[index]


def _writes_over(graph: Graph, value: int, target: int, materialized: set[int]) -> bool:
    """True when `value`'s kernel may write into `target`'s buffer: target is its in-place
    input and none of its other inputs reads target (a thread could read a row another
    thread already overwrote)."""
    if _in_place_input(graph, value) != target:
        return False
    node = graph.nodes[value]
    index = get_op(node.op).in_place
    stack = [i for n, i in enumerate(node.inputs) if n != index]
    seen = set()
    while stack:
        nid = stack.pop()
        if nid == target:
            return False
        if nid in seen or nid in materialized:
            continue
        seen.add(nid)
        stack.extend(graph.nodes[nid].inputs)
    return True


def plan(
    graph: Graph,
    roots: list[int],
    updates: dict[int, int],
    max_reads: int = 7,
    pairable: Callable[[Graph, int], bool] | None = None,
    row_writable: Callable[[Graph, int], bool] | None = None,
) -> Plan:
    """`pairable(graph, nid)` and `row_writable(graph, nid)` say whether the backend's kernel
    for product `nid` can run a paired epilogue (Kernel.pair) and store row writes
    (Kernel.writes)."""
    materialized, kernels = select_kernels(graph, roots, updates, max_reads, pairable)
    position = {out: n for n, k in enumerate(kernels) for out in (k.node, *k.also)}

    buffers: list[Buffer] = []
    buffer_of: dict[int, int] = {}

    def new_buffer(kind: str, nids: list[int]) -> Buffer:
        nbytes = max(graph.nodes[i].type.nbytes for i in nids)
        buf = Buffer(len(buffers), kind, max(16, (nbytes + 15) // 16 * 16), list(nids))
        buffers.append(buf)
        for i in nids:
            buffer_of[i] = buf.id
        return buf

    # Updates written in place where the update's kernel is the last reader of the old value.
    copies: list[tuple[int, int]] = []
    in_place: dict[int, int] = {}
    for target, value in updates.items():
        node = graph.nodes[value]
        ok = value in position and value not in in_place and value not in roots
        if ok:
            k = position[value]
            readers = [n for n, kern in enumerate(kernels) if target in kern.reads]
            ok = all(n <= k for n in readers)
            if ok and target in kernels[k].reads:
                # Safe when each output element reads the old value only at its own index:
                # pointwise kernels, and matmul epilogues that are not also operands; or
                # when the kernel writes over the old value in place (OpDef.in_place).
                # A kernel with side outputs computes them inside: check all it reads.
                kern = kernels[k]
                core = kern.core
                elementwise = kern.kind == "pointwise" or (
                    core is not None
                    and kern.kind != "norm"  # a norm reads whole rows
                    and all(
                        target not in buffers_read(graph, [i], materialized)
                        for i in graph.nodes[core].inputs
                    )
                )
                inside = materialized - set(kern.also)
                ok = _writes_over(graph, value, target, materialized) or (
                    elementwise
                    and _pointwise_path_is_identity(graph, kern.node, target, inside)
                    and _pointwise_path_is_identity(graph, value, target, inside)
                )
            ok = ok and node.type == graph.nodes[target].type
        if ok:
            in_place[value] = target
        else:
            copies.append((value, target))
    if row_writable is not None:
        kernels = _fuse_row_writes(graph, kernels, in_place, materialized, max_reads, row_writable)
    last_use: dict[int, int] = {}
    for n, k in enumerate(kernels):
        for i in k.reads:
            last_use[i] = n

    for nid in sorted(materialized):
        node = graph.nodes[nid]
        if node.op == "parameter":
            new_buffer("param", [nid])
        elif node.op == "input":
            new_buffer("input", [nid])
        elif node.op == "constant":
            new_buffer("constant", [nid])
    for value, target in in_place.items():
        buffer_of[value] = buffer_of[target]
        buffers[buffer_of[target]].nodes.append(value)
    pinned = set(roots) | {v for v, _ in copies}
    for nid in sorted(pinned):
        if nid in materialized and nid not in buffer_of:
            new_buffer("root", [nid])

    # Transient values: best-fit reuse of buffers whose last reader has run.
    free: list[Buffer] = []
    release: dict[int, list[int]] = {}
    for nid, n in last_use.items():
        release.setdefault(n, []).append(nid)
    for n, k in enumerate(kernels):
        over = _in_place_input(graph, k.node)
        if (
            k.node not in buffer_of
            and over is not None
            and buffers[buffer_of[over]].kind == "transient"
            and _writes_over(graph, k.node, over, materialized)
            and last_use.get(over) == n
            and graph.nodes[over].type.nbytes == graph.nodes[k.node].type.nbytes
        ):
            buffer_of[k.node] = buffer_of[over]  # nothing reads the old value afterwards
            buffers[buffer_of[over]].nodes.append(k.node)
        for out in (k.node, *k.also):
            if out in buffer_of:
                continue
            need = graph.nodes[out].type.nbytes
            fitting = [b for b in free if b.nbytes >= need]
            if fitting:
                buf = min(fitting, key=lambda b: b.nbytes)
                free.remove(buf)
            elif free:
                buf = max(free, key=lambda b: b.nbytes)
                free.remove(buf)
                buf.nbytes = max(buf.nbytes, (need + 15) // 16 * 16)
            else:
                buf = new_buffer("transient", [out])
            if out not in buf.nodes:
                buf.nodes.append(out)
            buffer_of[out] = buf.id
        for nid in release.get(n, []):
            buf = buffers[buffer_of[nid]]
            if (
                buf.kind == "transient"
                and last_use.get(nid) == n
                and all(last_use.get(o, -1) <= n for o in buf.nodes)
            ):
                free.append(buf)
        # A transient written but never read is free at once.
        for out in (k.node, *k.also):
            if buffers[buffer_of[out]].kind == "transient" and out not in last_use:
                free.append(buffers[buffer_of[out]])
    return Plan(graph, kernels, materialized, buffer_of, buffers, copies, list(roots))
