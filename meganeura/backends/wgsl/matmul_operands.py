"""What every matmul kernel shares: sizes, operands as strided views of buffers (transposes
and broadcasts read in place), bindings (vec4 where the layout allows), the norm prologue of
rms_norm_matmul and layer_norm_matmul (A normalized as it is loaded) and the epilogue store
(the pointwise DAG that reads the product, fused into the kernel's store)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from meganeura.backends.wgsl.blocks import q4_1_vec4_function, raw_words
from meganeura.backends.wgsl.emit import STORAGE_TYPE, prelude_for
from meganeura.backends.wgsl.kernels import (
    KernelSource,
    _Bindings,
    epilogue_buffers,
    operand_view,
    product_store,
)
from meganeura.backends.wgsl.norm_prologue import NormPrologue
from meganeura.lower.plan import Kernel, Plan, buffers_read
from meganeura.ops.linalg import DECODED_QTYPES, matmul_dims


class VecBindings(_Bindings):
    """Bindings where some buffers are declared as arrays of vec4 for 16-byte loads."""

    def __init__(self, plan: Plan, out_node: int):
        super().__init__(plan, out_node)
        self.vector: set[int] = set()

    def declarations(self) -> str:
        lines = []
        for n, buf in enumerate(self.order):
            access = "read_write" if buf in self.written else "read"
            ty = STORAGE_TYPE[self.dtypes[buf]]
            if buf in self.vector:
                ty = f"vec4<{ty}>"
            lines.append(f"@group(0) @binding({n}) var<storage, {access}> buf{buf}: array<{ty}>;")
        return "\n".join(lines)


@dataclass
class Operand:
    """op(X) as rows x cols of a buffer: element (r, c) of batch bz sits at
    origin + r * s_row + c * s_col."""

    base: int  # the materialized node whose buffer holds it (else the computed node)
    buf: str  # its buffer, or the WGSL function computing it (a computed operand)
    s_row: int
    s_col: int
    offset: int
    batch_strides: list[int]
    computed: bool = False
    # A computed GGUF weight that tiled kernels decode four weights at a time: the WGSL
    # function (row, k) -> vec4<f32> of its weights k..k+3 (k a multiple of 4) in row `row`.
    decoded: str = ""

    def at(self, index: str) -> str:
        """The element at buffer (or, computed, linear) index `index`, as f32."""
        return f"{self.buf}({index})" if self.computed else f"f32({self.buf}[{index}])"

    def origin(self, batch: tuple[int, ...]) -> str:
        terms = [f"{self.offset}u"] if self.offset else []
        for d, (size, st) in enumerate(zip(batch, self.batch_strides, strict=True)):
            if size == 1 or st == 0:
                continue
            inner = math.prod(batch[d + 1 :])
            c = f"(bz / {inner}u)" if inner > 1 else "bz"
            if d > 0:
                c = f"({c} % {size}u)"
            terms.append(f"{c} * {st}u")
        return " + ".join(terms) or "0u"

    def aligned4(self, cols_contiguous: bool) -> bool:
        """Rows start on 16-byte boundaries and run contiguously: vec4 loads are possible."""
        strides = [self.s_row if cols_contiguous else self.s_col, self.offset, *self.batch_strides]
        return (self.s_col if cols_contiguous else self.s_row) == 1 and all(
            st % 4 == 0 for st in strides
        )


class Matmul:
    """What every variant needs: sizes, operands, bindings and the epilogue."""

    def __init__(self, plan: Plan, kernel: Kernel):
        graph = plan.graph
        self.plan, self.kernel, self.graph = plan, kernel, graph
        self.core = kernel.core if kernel.core is not None else kernel.node
        self.node = graph.nodes[self.core]
        self.out_node = graph.nodes[kernel.node]
        # A norm_matmul op's inputs are x, the norm's parameters and b; it never transposes x.
        ta, tb = self.node.attrs.get("trans_a", False), self.node.attrs["trans_b"]
        a_id, b_id = self.node.inputs[0], self.node.inputs[-1]
        a_type, b_type = graph.nodes[a_id].type, graph.nodes[b_id].type
        self.batch, self.M, self.K, self.N = matmul_dims(a_type, b_type, ta, tb)
        self.nbatch = math.prod(self.batch)
        self.dtype, self.b_dtype = a_type.dtype, b_type.dtype
        self.bind = VecBindings(plan, kernel.node)
        self.out = f"buf{self.bind.out_buffer}"
        self.functions: list[str] = []  # WGSL functions of computed operands
        self.tables: list = []  # constant i32 arrays bound after the buffers (KernelSource)
        self.a = self._operand(a_id, ta)
        self.b = self._operand(b_id, tb)
        self.prologue = None
        if self.node.op in ("rms_norm_matmul", "layer_norm_matmul"):
            a = self.a
            self.prologue = NormPrologue(
                plan, self.node, a.buf, a.s_row, a.s_col, self.M, self.K, self.bind.name_of
            )
        self.label = f"{self.node.op}%{self.core}" + (
            f"+{self.out_node.op}%{kernel.node}" if kernel.core is not None else ""
        )
        self.label += "".join(f"+write_rows%{w.node}" for w in kernel.writes)

    def _operand(self, nid: int, trans: bool) -> Operand:
        shape = self.graph.nodes[nid].type.shape
        base, strides, offset, buf, function = operand_view(self.plan, nid, self.bind.name_of)
        if function:  # computed as it is loaded, at its own linear index
            self.functions.append(function)
        s_row, s_col = (strides[-1], strides[-2]) if trans else (strides[-2], strides[-1])
        lead = len(self.batch) - (len(shape) - 2)
        bstrides = [0] * lead + [0 if shape[d] == 1 else strides[d] for d in range(len(shape) - 2)]
        computed = base is None
        decoded = ""
        node = self.graph.nodes[nid]
        if computed and node.op == "dequantize" and node.attrs["qtype"] in DECODED_QTYPES:
            decoded = f"mn_decoded{nid}"
            self.functions.append(self._decode_function(node, decoded))
        base = nid if computed else base
        return Operand(base, buf, s_row, s_col, offset, bstrides, computed, decoded)

    def _decode_function(self, node, name: str) -> str:
        """The WGSL function decoding four weights of the Q4_1 weight `node` dequantizes."""
        base, offset = raw_words(self.graph, node, self.plan.materialized)
        return q4_1_vec4_function(name, self.bind.name_of(base), offset, node.attrs["shape"][1])

    def epilogue_reads(self) -> set[int]:
        """Buffers the epilogue loads (besides the product itself)."""
        return epilogue_buffers(self.plan, self.kernel)

    def use_vec4(self, operand: Operand, cols_contiguous: bool) -> bool:
        if operand.computed:
            return False
        buf = self.plan.buffer_of[operand.base]
        others = [
            o for o in (self.a, self.b) if not o.computed and self.plan.buffer_of[o.base] == buf
        ]
        ok = all(o.aligned4(cols_contiguous) for o in others) and len(others) == 1
        scalar = self.epilogue_reads() | {self.bind.out_buffer}
        for o in (self.a, self.b):  # computed operands load their buffers one element at a time
            if o.computed:
                reads = buffers_read(self.graph, [o.base], self.plan.materialized)
                scalar |= {self.plan.buffer_of[i] for i in reads}
        if self.prologue is not None:
            scalar |= {self.plan.buffer_of[p] for p in self.prologue.bases}
        return ok and buf not in scalar

    def load_a(self, value: str, row: str, k: str, vec: bool = False) -> str:
        """A's element as the product uses it: `value` (loaded, f32; with `vec` the vec4 of
        columns k..k+3) at tile row `row` and column `k`, normalized under a norm prologue."""
        return value if self.prologue is None else self.prologue.load(value, row, k, vec)

    def row_statistics(
        self, rows: int, first: str, threads: int, tid: str, scratch: str | None = None
    ) -> str:
        """Statements computing the norm prologue's statistics of the `rows` rows of A from
        row `first` (the kernel's tile), before the main loop; empty without a prologue.
        With `scratch`, they borrow that vec4<f32> workgroup array (the kernel's staging
        memory): call this before generating the A loads, which then read registers that
        `keep_statistics` fills before the kernel reuses the array."""
        if self.prologue is None:
            return ""
        vec = self.plan.buffer_of[self.a.base] in self.bind.vector
        return self.prologue.statistics(rows, first, threads, tid, vec, scratch)

    def keep_statistics(self) -> str:
        """Statements holding in registers the statistics of the tile rows that the A loads
        generated so far read, out of the scratch memory given to `row_statistics`; to be
        placed before those loads. Empty without a prologue."""
        return "" if self.prologue is None else self.prologue.keep()

    def store(self, acc: str | tuple[str, str], idx: str, indent: str) -> str:
        """Statements writing product value `acc` (f32) at output index `idx`, through the
        epilogue when the kernel has one (a paired epilogue's: the two halves' values)."""
        return product_store(self.plan, self.kernel, self.bind.name_of, self.out, acc, idx, indent)

    def store_pair(self, lo: str, hi: str, idx: str, indent: str) -> str:
        """Statements writing a paired epilogue (Kernel.pair) at output index `idx`, from the
        product's values `lo` and `hi` (f32) in the first and second half of its columns."""
        return self.store((lo, hi), idx, indent)

    def table(self, values) -> str:
        """The WGSL name of constant i32 array `values`, bound after the kernel's buffers."""
        self.tables.append(values)
        return f"mm_table{len(self.tables) - 1}"

    def assemble(self, body: str, shared: str = "", header: str = "") -> str:
        if self.prologue is not None:
            shared += self.prologue.shared
        decls = self.bind.declarations()
        for n in range(len(self.tables)):
            binding = len(self.bind.order) + n
            decls += f"\n@group(0) @binding({binding}) var<storage, read> mm_table{n}: array<i32>;"
        body += "".join(self.functions)
        if "f16" in body or "f16" in decls or "f16" in shared:
            header = "enable f16;\n" + header
        return f"{header}{decls}\n{shared}{prelude_for(body)}\n{body}"


def kernel_source(mm: Matmul, body: str, grid, shared: str = "", header: str = "") -> KernelSource:
    wgsl = mm.assemble(body, shared, header)
    return KernelSource(wgsl, mm.bind.order, grid, mm.label, tables=tuple(mm.tables))
