"""Choosing one e-node per e-class: a DAG-aware, shape-aware cost over the frozen e-graph.

The cost of a choice is what the lowering would spend on it (lower/plan.py's rules): every
kernel pays a launch plus the bytes it writes and the bytes of the buffers it reads (a matmul
that normalizes its rows reads them once more for their statistics); pointwise ops and views
are inlined into the kernels that read them and cost nothing of their own, unless several
readers or a matmul-like consumer force them into a buffer. A shared subexpression is paid
for once: a norm whose output something else reads keeps its kernel, so moving it into a
matmul would only add the statistics pass.

Extraction runs in two passes. A bottom-up pass picks, per e-class, the e-node of least
estimated cost (its own cost plus its inputs'), estimating which values end up in buffers from
the original graph. Then moves that lower the exact DAG cost are applied: switching one
e-class to another e-node, and adopting a shared kernel (switching every e-class that can read
one not-yet-chosen e-class, such as one matmul over concatenated weights whose slices serve
three projections).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meganeura.ops import INLINED_KINDS, all_ops
from meganeura.optimize.egraph import ENode, Frozen
from meganeura.optimize.encode import nbytes, parse_type

LEAVES = ("Ext", "Scalar", "Const")
COST_CAP = 1e300
# Matmuls that normalize the rows of their first input as they load it read those rows once
# more per pass of statistics, before their main loop (mean square; mean, then variance).
PROLOGUE_PASSES = {"rms_norm_matmul": 1, "layer_norm_matmul": 2, "rms_norm_quantized_matmul": 1}


@dataclass(frozen=True)
class CostModel:
    """Bytes moved through device memory, plus `launch_bytes` for each kernel launched (a
    dispatch costs about as much as moving this many bytes)."""

    launch_bytes: float = 1 << 20
    # The lowering fuses a matmul into the one same-shape pointwise kernel that reads it.
    matmul_epilogues: bool = True


class Extraction:
    def __init__(
        self,
        frozen: Frozen,
        roots: list[int],
        buffered: set[int],
        model: CostModel,
        free: set[int] = frozenset(),
        refine_limit: int = 4000,
    ):
        self.frozen = frozen
        self.roots = list(dict.fromkeys(roots))
        # Roots read by one pointwise op or as views outside the region: the reader inlines
        # them, so they need no buffer of their own.
        self.free = set(free)
        self.buffered = buffered  # classes the original graph keeps in buffers
        self.model = model
        self.refine_limit = refine_limit
        ops = all_ops()
        self.kind = {name: op.kind for name, op in ops.items()}
        self.strided = {name for name, op in ops.items() if op.strided_inputs}
        self.size = [nbytes(t) if t else 0 for t in frozen.type_of]
        self.scalar = [bool(t) and parse_type(t).size == 1 for t in frozen.type_of]
        # An e-node that reads its own class (x = reshape(x) after x was found equal to its
        # reshape) can never be chosen.
        self.candidates = [
            [n for n in members if (n.op in LEAVES or n.op in self.kind) and c not in n.children]
            for c, members in enumerate(frozen.classes)
        ]
        self.choice: list[ENode | None] = [None] * len(frozen.classes)

    # -- kinds -------------------------------------------------------------------------------
    def is_kernel(self, node: ENode) -> bool:
        return node.op not in LEAVES and self.kind[node.op] not in INLINED_KINDS

    def is_buffer_leaf(self, node: ENode) -> bool:
        return node.op in ("Ext", "Const")

    # -- pass 1: bottom-up estimate ------------------------------------------------------------
    def local(self, c: int, node: ENode) -> float:
        if node.op in LEAVES:
            return 0.0
        kind = self.kind[node.op]
        if kind in INLINED_KINDS and c not in self.buffered:
            return 1.0  # free when inlined; the byte breaks ties toward fewer ops
        reads = sum(self.size[k] for k in set(node.children)) + self.prologue_reads(node)
        return self.model.launch_bytes + self.size[c] + reads

    def prologue_reads(self, node: ENode) -> float:
        return PROLOGUE_PASSES.get(node.op, 0) * self.size[node.children[0]]

    def initial(self) -> None:
        n = len(self.frozen.classes)
        best = [math.inf] * n
        parents: list[list[tuple[int, ENode]]] = [[] for _ in range(n)]
        for c, members in enumerate(self.candidates):
            for node in members:
                for k in set(node.children):
                    parents[k].append((c, node))
        work = []
        for c, members in enumerate(self.candidates):
            for node in members:
                if not node.children:
                    cost = self.local(c, node)
                    if cost < best[c]:
                        best[c] = cost
                        self.choice[c] = node
                        work.append(c)
        # Label-correcting relaxation: a class improves, its parents are re-examined.
        while work:
            k = work.pop()
            for c, node in parents[k]:
                cost = self.local(c, node) + sum(best[child] for child in node.children)
                # Tree costs double-count shared inputs and grow with depth; capping keeps
                # them finite (the exact DAG cost decides in the second pass).
                cost = min(cost, COST_CAP)
                if cost < best[c]:
                    best[c] = cost
                    self.choice[c] = node
                    work.append(c)
        for r in self.roots:
            if self.choice[r] is None:
                raise AssertionError(f"optimize: e-class {r} has no finite extraction")

    # -- exact DAG cost ------------------------------------------------------------------------
    def reachable(self, choice) -> list[int] | None:
        """Classes reachable from the roots in topological order (inputs first), or None if
        the choice has a cycle."""
        state: dict[int, int] = {}
        order: list[int] = []
        for r in self.roots:
            if r in state:
                continue
            stack = [(r, 0)]
            state[r] = 1
            while stack:
                c, i = stack[-1]
                kids = choice[c].children
                if i < len(kids):
                    stack[-1] = (c, i + 1)
                    k = kids[i]
                    s = state.get(k)
                    if s is None:
                        state[k] = 1
                        stack.append((k, 0))
                    elif s == 1:
                        return None
                else:
                    state[c] = 2
                    order.append(c)
                    stack.pop()
        return order

    def buffers(self, choice, order: list[int]) -> set[int]:
        """The classes lower/plan.py would keep in buffers under this choice."""
        uses: dict[int, int] = dict.fromkeys(self.free, 1)
        for c in order:
            for k in choice[c].children:
                uses[k] = uses.get(k, 0) + 1
        out = {r for r in self.roots if r not in self.free}
        for c in order:
            node = choice[c]
            if node.op in ("Ext", "Const"):
                out.add(c)
            elif node.op != "Scalar":
                kind = self.kind[node.op]
                shared = kind == "pointwise" and uses.get(c, 0) > 1 and not self.scalar[c]
                if kind not in INLINED_KINDS or shared:
                    out.add(c)
        for c in order:
            node = choice[c]
            if node.op in self.strided:
                for k in node.children:
                    if not self._affine(choice, k, out):
                        out.add(k)
        return out

    def _affine(self, choice, c: int, buffered: set[int]) -> bool:
        while c not in buffered:
            node = choice[c]
            if node.op in LEAVES or self.kind[node.op] != "view":
                return False
            c = node.children[0]
        return True

    def cost(self, choice) -> float:
        order = self.reachable(choice)
        if order is None:
            return math.inf
        buffered = self.buffers(choice, order)
        total = 0.0
        readers: dict[int, list[int]] = {}
        for c in order:
            node = choice[c]
            if c not in buffered or node.op in LEAVES:
                continue
            leaves = self._leaves(choice, c, buffered)
            total += self.model.launch_bytes + self.size[c] + sum(self.size[k] for k in leaves)
            total += self.prologue_reads(node)
            for k in leaves:
                readers.setdefault(k, []).append(c)
        if self.model.matmul_epilogues:
            total -= self._epilogue_savings(choice, buffered, readers)
        return total

    def _leaves(self, choice, c: int, buffered: set[int]) -> set[int]:
        """The buffers the kernel computing class c reads (through what it inlines)."""
        seen, stack, out = set(), list(choice[c].children), set()
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            if k in buffered:
                out.add(k)
            elif choice[k].op != "Scalar":
                stack.extend(choice[k].children)
        return out

    def _epilogue_savings(self, choice, buffered: set[int], readers) -> float:
        """The lowering runs a matmul read by one pointwise kernel of its size inside that
        kernel (as its epilogue): one launch and a round trip of the product saved."""
        saved = 0.0
        roots = set(self.roots)
        for m, users in readers.items():
            node = choice[m]
            if node.op in LEAVES or self.kind[node.op] != "matmul" or m in roots:
                continue
            if len(users) != 1 or self.size[users[0]] != self.size[m]:
                continue
            reader = choice[users[0]]
            if reader.op not in LEAVES and self.kind[reader.op] in ("pointwise", "view"):
                saved += self.model.launch_bytes + 2 * self.size[m]
        return saved

    # -- pass 2: moves on the exact cost -------------------------------------------------------
    def refine(self) -> None:
        order = self.reachable(self.choice)
        if order is None:
            raise AssertionError("optimize: the bottom-up extraction has a cycle")
        if len(order) > self.refine_limit:
            return
        best = self.cost(self.choice)
        choice = list(self.choice)
        for _ in range(3):
            improved = False
            for c in list(self.reachable(choice) or ()):
                if not self._decides_kernels(c):
                    continue
                for node in self.candidates[c]:
                    if node is choice[c]:
                        continue
                    old = choice[c]
                    choice[c] = node
                    cost = self.cost(choice)
                    if cost < best - 0.5:
                        best, improved = cost, True
                    else:
                        choice[c] = old
            best, adopted = self._adopt_shared(choice, best)
            if not (improved or adopted):
                break
        self.choice = choice

    def _decides_kernels(self, c: int) -> bool:
        """Whether the choice in class c can change which kernels run: among its e-nodes is a
        kernel. Choices among pointwise ops and views only move a few bytes; the bottom-up
        estimate settles those."""
        members = self.candidates[c]
        return len(members) > 1 and any(self.is_kernel(n) for n in members)

    def _adopt_shared(self, choice, best: float) -> tuple[float, bool]:
        """Try choosing, in every class that can, the e-node that reads one shared kernel
        class that nothing reads yet."""
        order = self.reachable(choice) or []
        live = set(order)
        readers: dict[int, list[tuple[int, ENode]]] = {}
        for c in order:
            for node in self.candidates[c]:
                if node is choice[c]:
                    continue
                for k in set(node.children):
                    if k not in live:
                        readers.setdefault(k, []).append((c, node))
        changed = False
        for k, options in readers.items():
            classes = {c for c, _ in options}
            if len(classes) < 2 or choice[k] is None or not self.is_kernel(choice[k]):
                continue
            trial = list(choice)
            for c, node in options:
                trial[c] = node
            cost = self.cost(trial)
            if cost < best - 0.5:
                best, changed = cost, True
                choice[:] = trial
        return best, changed

    def run(self) -> list[ENode | None]:
        self.initial()
        self.refine()
        return self.choice

    def kernels(self, choice=None) -> int:
        choice = choice or self.choice
        order = self.reachable(choice) or []
        buffered = self.buffers(choice, order)
        return sum(1 for c in order if c in buffered and choice[c].op not in LEAVES)
