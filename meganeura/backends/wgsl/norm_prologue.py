"""The norm prologue of the matmul kernels: rms_norm_matmul and layer_norm_matmul.

A matmul kernel whose left operand is normalized row by row (meganeura.ops.norm_matmul) first
computes the statistics of the rows it will read, then normalizes each element of A as it
loads it. Each kernel variant calls `statistics` at the top of its body, for the rows of its
tile, and passes every loaded A value through `load`; nothing else about the variant changes.

Statistics: a workgroup's threads split into teams of a power-of-two size, one team per row,
and each team sums its row over the whole of k (the mean square; for layer_norm the mean,
then the centered variance, as the norm kernel computes them), reduced in workgroup memory.
The rows are read from the operand's buffer (L2-resident at these sizes): once more than the
main loop reads them, which the optimizer's cost model charges.

The split SIMT tiles defer an RMSNorm instead (`defer`): they stage every element of their
rows once over the main loop anyway, so they sum the squares as they stage them and scale
each output row by its 1 / rms at the end; the loads only apply the weight.

Kernels whose staged operands fill the workgroup memory WebGPU guarantees (the tiled SIMT
kernels) lend it to the statistics instead (`scratch`): each invocation then copies the
statistics of the rows its loads read into registers (`keep`, after generating the loads)
before the main loop stages over them, so a prologue costs those kernels no workgroup
memory and changes no tile shape.
"""

from __future__ import annotations

from meganeura.lower.plan import Plan, strided_view

# Where the statistics live in a borrowed vec4 array: partial sums, 1/rms (or 1/std), mean.
SCRATCH_LANES = {"red": "x", "rstd": "y", "mean": "z"}


class NormPrologue:
    """The statistics and the normalized loads of one kernel's A operand (rows of x).

    `a` is the kernel's operand of x (buffer name `buf`, strides `s_row` and `s_col`, the row
    origin `a0` defined in the kernel), `params` the norm's weight (and bias) nodes."""

    def __init__(self, plan: Plan, node, buf: str, s_row: int, s_col: int, M: int, K: int, name_of):
        self.centered = node.op == "layer_norm_matmul"
        self.eps = node.attrs["eps"]
        self.buf, self.s_row, self.s_col, self.M, self.K = buf, s_row, s_col, M, K
        self.params = []  # (buffer name, offset, stride) of the weight, then the bias
        self.bases = []  # their materialized nodes
        for p in node.inputs[1:-1]:
            base, strides, offset = strided_view(plan.graph, p, plan.materialized)
            self.params.append((name_of(base), offset, strides[0]))
            self.bases.append(base)
        self.deferred = False  # see `defer`
        self.shared = ""  # workgroup memory the statistics use, set by `statistics`
        self.scratch: str | None = None  # the borrowed array, if `statistics` got one
        self.kept: dict[str, int] = {}  # with scratch: tile row -> its registers' number

    def _param(self, which: int, k: str) -> str:
        buf, offset, stride = self.params[which]
        index = f"{k}" if stride == 1 else f"({k}) * {stride}u"
        return f"f32({buf}[{f'{offset}u + ' if offset else ''}{index}])"

    def can_defer(self) -> bool:
        """Whether the statistics can wait for the epilogue: an RMSNorm's do (see `defer`)."""
        return not self.centered

    def defer(self) -> None:
        """Scale rows in the epilogue instead of normalizing A before the main loop: for an
        RMSNorm, rms_norm(x)[i, k] = x[i, k] r[i] g[k] with r = 1 / rms(x[i]), so
        (rms_norm(x) @ B)[i, j] = r[i] (sum over k of x[i, k] g[k] B[k, j]). A kernel that
        stages every element of its rows of A once over the main loop can sum their squares
        as it loads them and scale its outputs at the end, instead of reading its rows a first
        time before the loop (on an H200, about 5 us of a 128-row product's 25). `load` then
        only multiplies by the weight; the kernel sums the squares (`square_sum`) and scales
        (`rstd`). A layer norm's mean would also shift every output by a column sum
        of B, so it keeps the prologue."""
        if not self.can_defer():
            raise ValueError(f"{'layer_norm' if self.centered else 'rms_norm'}: cannot defer")
        self.deferred = True

    def square_sum(self, value: str) -> str:
        """The sum of squares of the loaded vec4 `value` (of one row), for a deferred norm."""
        return f"dot({value}, {value})"

    def rstd(self, square_sum: str) -> str:
        """1 / rms (1 / std, centered) of a row from the sum of the squares of its K elements:
        what `statistics` keeps and a deferred norm scales by."""
        return f"inverseSqrt({square_sum} / {float(self.K)!r} + {self.eps!r})"

    def load(self, value: str, row: str, k: str, vec: bool = False) -> str:
        """The normalized value of A at local row `row` (of the tile given to `statistics`) and
        column `k`, from `value`, its loaded f32 (with `vec`: the vec4<f32> of columns k..k+3).
        Deferred: the value times the norm's weight only."""

        def param(which: int) -> str:
            if not vec:
                return self._param(which, k)
            return f"vec4<f32>({', '.join(self._param(which, f'{k} + {i}u') for i in range(4))})"

        if self.deferred:
            return f"({value} * {param(0)})" if self.params else value
        centered = f"({value} - {self._stat('mean', row)})" if self.centered else value
        scale = self._stat("rstd", row)
        if self.params:
            scale = f"({scale} * {param(0)})"
        out = f"{centered} * {scale}"
        if len(self.params) == 2:
            out = f"{out} + {param(1)}"
        return f"({out})"

    def _stat(self, name: str, row: str) -> str:
        """Where `load` finds statistic `name` (rstd or mean) of tile row `row`: workgroup
        memory, or with scratch the registers that `keep` fills."""
        if self.scratch is None:
            return f"nm_{name}[{row}]"
        return f"nm_{name}{self.kept.setdefault(row, len(self.kept))}"

    def statistics(
        self, rows: int, first: str, threads: int, tid: str, vec: bool, scratch: str | None = None
    ) -> str:
        """WGSL statements (in uniform control flow) leaving in workgroup memory the statistics
        of rows `first` .. `first` + rows - 1 of A, each read as f32 (with `vec`: as vec4 of a
        buffer declared vec4, rows 16-byte aligned and contiguous). With `scratch`, a vec4<f32>
        workgroup array of at least max(rows, threads) elements holds the partial sums (x) and
        the statistics (rstd in y, mean in z) instead of arrays of the prologue's own; `keep`
        then moves them into registers."""
        team = 1
        while team * 2 * rows <= threads:
            team *= 2
        teams = threads // team
        K, M = self.K, self.M
        self.scratch = scratch
        if scratch is None:
            decls = [f"var<workgroup> nm_rstd: array<f32, {rows}>;"]
            if self.centered:
                decls.append(f"var<workgroup> nm_mean: array<f32, {rows}>;")
            if team > 1:
                decls.append(f"var<workgroup> nm_red: array<f32, {threads}>;")
            self.shared = "\n".join(decls) + "\n"

        def slot(name: str, index: str) -> str:
            if scratch is None:
                return f"nm_{name}[{index}]"
            return f"{scratch}[{index}].{SCRATCH_LANES[name]}"

        if vec:
            read = f"vec4<f32>({self.buf}[nm_row / 4u + k])"
            steps = K // 4
        else:
            read = f"f32({self.buf}[nm_row + k * {self.s_col}u])"
            steps = K

        def square(d: str) -> str:
            return f"dot({d}, {d})" if vec else f"{d} * {d}"

        def row_sum(name: str, term) -> str:
            """The team's total of `term(v)` over its row, in `name`."""
            part = f"{name}_part"
            lines = [
                f"      var {part} = 0.0f;",
                f"      if (nm_ok) {{ for (var k = nm_lane; k < {steps}u; k += {team}u) {{",
                f"        let v = {read}; {part} += {term('v')};",
                "      } }",
            ]
            if team == 1:
                return "\n".join([*lines, f"      let {name} = {part};"]) + "\n"
            lines += [
                f"      {slot('red', tid)} = {part};",
                "      workgroupBarrier();",
                f"      for (var h = {team // 2}u; h > 0u; h = h >> 1u) {{",
                f"        if (nm_lane < h) {{ {slot('red', tid)} += {slot('red', f'{tid} + h')}; }}",
                "        workgroupBarrier();",
                "      }",
                f"      let {name} = {slot('red', f'{tid} - nm_lane')};",
                "      workgroupBarrier();",
            ]
            return "\n".join(lines) + "\n"

        body = ""
        if self.centered:
            body += row_sum("nm_sum", lambda v: f"dot({v}, vec4<f32>(1.0))" if vec else v)
            body += f"      let nm_mu = nm_sum / {float(K)!r};\n"
            body += row_sum("nm_sq", lambda v: square(f"({v} - nm_mu)"))
        else:
            body += row_sum("nm_sq", square)
        store = f"select(0.0, {self.rstd('nm_sq')}, nm_ok)"
        body += f"      if (nm_lane == 0u && nm_r < {rows}u) {{\n"
        if self.centered:
            body += f"        {slot('mean', 'nm_r')} = nm_mu;\n"
        body += f"        {slot('rstd', 'nm_r')} = {store};\n      }}\n"
        return (
            "  {\n"
            f"    let nm_lane = {tid} % {team}u;\n"
            f"    for (var nm_r0 = 0u; nm_r0 < {rows}u; nm_r0 += {teams}u) {{\n"
            f"      let nm_r = nm_r0 + {tid} / {team}u;\n"
            f"      let nm_m = {first} + nm_r;\n"
            f"      let nm_ok = nm_r < {rows}u && nm_m < {M}u;\n"
            f"      let nm_row = a0 + min(nm_m, {M - 1}u) * {self.s_row}u;\n"
            f"{body}    }}\n"
            "    workgroupBarrier();\n"
            "  }\n"
        )

    def keep(self) -> str:
        """With scratch: statements copying the statistics of every tile row that the loads
        generated so far read (as `load` was given them) out of the scratch array into
        registers, then a barrier, after which the kernel may overwrite the array."""
        if self.deferred:
            return ""
        lines = []
        for row, n in self.kept.items():
            lines.append(f"  let nm_rstd{n} = {self.scratch}[{row}].{SCRATCH_LANES['rstd']};")
            if self.centered:
                lines.append(f"  let nm_mean{n} = {self.scratch}[{row}].{SCRATCH_LANES['mean']};")
        return "\n".join([*lines, "  workgroupBarrier();"]) + "\n"
