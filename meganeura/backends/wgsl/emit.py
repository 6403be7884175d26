"""Expression emission: the value of any inlined node at a linear index, as WGSL statements.

`Emitter.value(node, idx)` returns the name of a WGSL `let` holding the node's value at the
linear index held by the variable `idx`. Materialized nodes are loads from their buffer;
views turn into index arithmetic; pointwise ops call their registered `wgsl` template on
their inputs' values, each at the (broadcast) index it needs. Values are cached per index, so
a shared subexpression is computed once per invocation.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Callable

import numpy as np

from meganeura.graph import Graph, Node
from meganeura.ops import get_op

STORAGE_TYPE = {"f32": "f32", "f16": "f16", "i32": "i32", "u32": "u32", "bool": "u32"}
VALUE_TYPE = {"f32": "f32", "f16": "f16", "i32": "i32", "u32": "u32", "bool": "bool"}

_names = itertools.count()

PRELUDE = {
    # A function call is not a constant expression, so infinities and NaNs survive the
    # shader compiler's constant evaluation, which rejects them.
    "mn_bits": """
fn mn_bits(b: u32) -> f32 { return bitcast<f32>(b); }""",
    "mn_erf": """
fn mn_erf(x: f32) -> f32 {
  let z = abs(x);
  let t = 1.0 / (1.0 + 0.5 * z);
  let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 +
      t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 +
      t * (-0.82215223 + t * 0.17087277)))))))));
  return select(r - 1.0, 1.0 - r, x >= 0.0);
}""",
    "mn_gelu": """
fn mn_gelu(x: f32) -> f32 { return 0.5 * x * (1.0 + mn_erf(x * 0.7071067811865476)); }""",
    "mn_gelu_grad": """
fn mn_gelu_grad(x: f32) -> f32 {
  return 0.5 * (1.0 + mn_erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * exp(-0.5 * x * x);
}""",
    "mn_gelu_tanh": """
fn mn_gelu_tanh(x: f32) -> f32 {
  let inner = clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -15.0, 15.0);
  return 0.5 * x * (1.0 + tanh(inner));
}""",
    "mn_gelu_tanh_grad": """
fn mn_gelu_tanh_grad(x: f32) -> f32 {
  let th = tanh(clamp(0.7978845608028654 * (x + 0.044715 * x * x * x), -15.0, 15.0));
  let dinner = 0.7978845608028654 * (1.0 + 0.134145 * x * x);
  return 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dinner;
}""",
    "mn_log1p": """
fn mn_log1p(x: f32) -> f32 {
  let u = 1.0 + x;
  if (u == 1.0) { return x; }
  return log(u) * (x / (u - 1.0));
}""",
    # sin and cos are only accurate near [-pi, pi] on some drivers: subtract the nearest
    # multiple of 2*pi first. 2*pi is split into three parts with 8-bit mantissas (exact
    # products for |k| < 2^16) and an f32 remainder (Cody and Waite's reduction).
    "mn_wrap_angle": """
fn mn_wrap_angle(x: f32) -> f32 {
  let k = round(x * 0.15915494309189535);
  return (((x - k * 6.28125) - k * 0.00193023681640625) - k * 5.066394805908203e-06) - k * 3.968374073792802e-09;
}""",
}
PRELUDE_DEPS = {"mn_gelu": ["mn_erf"], "mn_gelu_grad": ["mn_erf"]}

# Inlined ops whose value is more than one input read at a mapped index (pad, concat, gathers,
# rope) register `(emitter, node, idx) -> WGSL expression` here, from a module of their own in
# this package.
INLINE_VALUES: dict[str, Callable[[Emitter, Node, str], str]] = {}


def inline_value(*ops: str):
    """Decorator: register the value emitter of inlined ops."""

    def register(fn):
        for op in ops:
            INLINE_VALUES[op] = fn
        return fn

    return register


# Index maps of view ops registered by other modules of this package:
# op name -> fn(emitter, node, src_shape, idx) -> the source's linear index expression.
VIEW_INDEX_MAPS: dict[str, Callable] = {}


def view_index_map(*names: str):
    """Decorator: register the index map of view ops, so a new view op edits no shared code."""

    def register(fn):
        for name in names:
            VIEW_INDEX_MAPS[name] = fn
        return fn

    return register


def prelude_for(body: str) -> str:
    names: list[str] = []

    def need(name):
        for dep in PRELUDE_DEPS.get(name, []):
            need(dep)
        if name not in names:
            names.append(name)

    for name in PRELUDE:
        if name + "(" in body:
            need(name)
    return "".join(PRELUDE[n] for n in names)


def literal(value, dtype: str) -> str:
    """A WGSL literal of `dtype` for a Python/NumPy scalar."""
    if dtype == "bool":
        return "true" if bool(value) else "false"
    if dtype == "i32":
        return f"{int(value)}i"
    if dtype == "u32":
        return f"{int(value)}u"
    v = float(value)
    if math.isfinite(v):
        text = repr(float(np.float32(v)))
        return f"{text}f" if dtype == "f32" else f"f16({text})"
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    return f"mn_bits({bits}u)" if dtype == "f32" else f"f16(mn_bits({bits}u))"


def load(binding: str, idx: str, dtype: str) -> str:
    if dtype == "bool":
        return f"({binding}[{idx}] != 0u)"
    return f"{binding}[{idx}]"


def store_value(expr: str, dtype: str) -> str:
    return f"select(0u, 1u, {expr})" if dtype == "bool" else expr


def contiguous_strides(shape) -> list[int]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return list(reversed(strides))


class Emitter:
    """Emits statements into `lines`; `binding_of(node)` names the buffer of a materialized node."""

    def __init__(
        self,
        graph: Graph,
        materialized: set[int],
        binding_of,
        indent: str = "  ",
        bound: dict[int, str] | None = None,
    ):
        self.graph = graph
        self.materialized = materialized
        self.binding_of = binding_of
        self.indent = indent
        # Nodes whose value a kernel already holds (a matmul's accumulator under its
        # epilogue), valid at the one index the kernel emits for.
        self.bound = bound or {}
        self.lines: list[str] = []
        self._cache: dict[tuple, str] = {}

    def _let(self, expr: str, prefix: str = "v") -> str:
        name = f"{prefix}{next(_names)}"
        self.lines.append(f"{self.indent}let {name} = {expr};")
        return name

    def index(self, expr: str) -> str:
        key = ("idx", expr)
        if key not in self._cache:
            simple = expr.isidentifier() or (expr.endswith("u") and expr[:-1].isdigit())
            self._cache[key] = (
                expr if simple else self._let(expr, "ix")
            )  # "i32" would shadow the type
        return self._cache[key]

    def value(self, nid: int, idx: str) -> str:
        key = (nid, idx)
        if key in self._cache:
            return self._cache[key]
        node = self.graph.nodes[nid]
        if nid in self.bound:
            return self.bound[nid]
        if nid in self.materialized:
            expr = load(self.binding_of(nid), idx, node.type.dtype)
        elif node.op == "constant":
            expr = literal(np.asarray(node.attrs["value"]).reshape(-1)[0], node.type.dtype)
        elif node.op in INLINE_VALUES:
            expr = INLINE_VALUES[node.op](self, node, idx)
        else:
            opdef = get_op(node.op)
            if opdef.kind == "view":
                src = self.graph.nodes[node.inputs[0]]
                expr = self.value(node.inputs[0], self.view_index(node, src.type.shape, idx))
            elif opdef.kind == "pointwise":
                args = []
                for i in node.inputs:
                    shape = self.graph.nodes[i].type.shape
                    args.append(self.value(i, self.broadcast_index(idx, node.type.shape, shape)))
                types = [self.graph.nodes[i].type for i in node.inputs]
                expr = opdef.wgsl(args, types, node.type, node.attrs)
            else:
                raise AssertionError(f"cannot inline {node.describe()}: it must be materialized")
        name = self._let(expr)
        self._cache[key] = name
        return name

    def branches(self, dtype: str, cases, default: str | None = None) -> str:
        """A WGSL `var` set by the first case whose condition holds, else `default`.

        `cases` are `(condition, build)` pairs; `build(emitter)` emits into a child emitter
        (scoped to the branch, so the values it computes are not reused outside) and returns
        the value. A condition of None is the final `else`. Only the taken branch runs, so
        an input is read only where it is needed (concat, pad).
        """
        name = f"v{next(_names)}"
        init = f" = {default}" if default is not None else ""
        self.lines.append(f"{self.indent}var {name}: {VALUE_TYPE[dtype]}{init};")
        for n, (condition, build) in enumerate(cases):
            child = Emitter(
                self.graph, self.materialized, self.binding_of, self.indent + "  ", self.bound
            )
            child._cache = dict(self._cache)
            value = build(child)
            if condition is None:
                head = "} else {" if n else "{"
            else:
                head = f"{'} else ' if n else ''}if ({condition}) {{"
            self.lines.append(f"{self.indent}{head}")
            self.lines.extend(child.lines)
            self.lines.append(f"{self.indent}  {name} = {value};")
        self.lines.append(f"{self.indent}}}")
        return name

    # -- index maps ---------------------------------------------------------------------------
    @staticmethod
    def coord(idx: str, shape, axis: int) -> str:
        """The coordinate along `axis` of linear index `idx` in a contiguous `shape`."""
        stride = math.prod(shape[axis + 1 :])
        div = idx if stride == 1 else f"({idx} / {stride}u)"
        return div if axis == 0 else f"({div} % {shape[axis]}u)"

    def broadcast_index(self, idx: str, out_shape, in_shape) -> str:
        """Linear index into `in_shape` for output index `idx`, NumPy broadcasting rules."""
        in_shape, out_shape = tuple(in_shape), tuple(out_shape)
        if in_shape == out_shape:
            return idx
        if math.prod(in_shape) == 1:
            return "0u"
        stripped = in_shape
        while stripped and stripped[0] == 1:
            stripped = stripped[1:]
        if out_shape[len(out_shape) - len(stripped) :] == stripped:
            return self.index(f"({idx} % {math.prod(stripped)}u)")
        lead = len(out_shape) - len(in_shape)
        strides = contiguous_strides(in_shape)
        terms = []
        for d, size in enumerate(in_shape):
            if size == 1:
                continue
            c = self.coord(idx, out_shape, lead + d)
            terms.append(c if strides[d] == 1 else f"{c} * {strides[d]}u")
        return self.index(" + ".join(terms))

    # The view ops view_index maps; `meganeura ops` and the tests read this.
    VIEW_OPS = frozenset({"reshape", "broadcast_to", "permute", "slice", "flip", "tile"})

    def view_index(self, node, src_shape, idx: str) -> str:
        if node.op == "reshape":
            return idx
        if node.op == "broadcast_to":
            return self.broadcast_index(idx, node.type.shape, src_shape)
        if node.op == "permute":
            out_shape = node.type.shape
            src_strides = contiguous_strides(src_shape)
            terms = []
            for d, axis in enumerate(node.attrs["axes"]):
                if out_shape[d] == 1:
                    continue
                c = self.coord(idx, out_shape, d)
                terms.append(c if src_strides[axis] == 1 else f"{c} * {src_strides[axis]}u")
            return self.index(" + ".join(terms) if terms else "0u")
        if node.op in ("slice", "flip", "tile"):
            return self.index(self._affine_source_index(node, src_shape, idx))
        if node.op in VIEW_INDEX_MAPS:
            return VIEW_INDEX_MAPS[node.op](self, node, src_shape, idx)
        raise AssertionError(f"no index map for view op {node.op!r}")

    def _affine_source_index(self, node, src_shape, idx: str) -> str:
        """Source index of slice (start + c * step), flip (n - 1 - c) and tile (c mod n)."""
        out_shape = node.type.shape
        strides = contiguous_strides(src_shape)
        offset, added, subtracted = 0, [], []
        for d, size in enumerate(out_shape):
            stride = strides[d]
            if node.op == "slice":
                offset += node.attrs["starts"][d] * stride
                stride *= node.attrs["steps"][d]
            if size == 1 or stride == 0:
                continue
            c = self.coord(idx, out_shape, d)
            if node.op == "tile" and src_shape[d] != size:
                c = f"({c} % {src_shape[d]}u)"
            term = c if stride == 1 else f"{c} * {stride}u"
            if node.op == "flip" and d in node.attrs["axes"]:
                offset += (size - 1) * stride
                subtracted.append(term)
            else:
                added.append(term)
        terms = list(added)
        if subtracted:
            terms.insert(0, f"({offset}u - ({' + '.join(subtracted)}))")
        elif offset or not terms:
            terms.insert(0, f"{offset}u")
        return " + ".join(terms)
