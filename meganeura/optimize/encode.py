"""Encoding a region of a graph as egglog terms, and decoding attributes back.

Attributes are encoded per op so that rules can match and build them: a reduction's single
axis is an integer (softmax's axis comes from it), an epsilon is a float, a shape or
permutation is a canonical string. Ops without a codec of their own get a generic one: the
canonical repr of their attribute dict, which rules match only as a whole.

Constants are leaves by value (equal constants share an e-class), and nodes whose inputs are
all constants are folded here with their reference implementation, so masks and tables built
from constants reach the rules as constants.
"""

from __future__ import annotations

import ast
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from meganeura.graph import Graph, Node, TensorType, numpy_dtype
from meganeura.ops import get_op
from meganeura.optimize.egraph import num, quote, term

FOLD_LIMIT = 1 << 16  # largest constant (elements) that folding may create


def type_string(t: TensorType) -> str:
    return f"{t.dtype}[{','.join(map(str, t.shape))}]"


def parse_type(text: str) -> TensorType:
    dtype, dims = text.rstrip("]").split("[")
    return TensorType(tuple(int(d) for d in dims.split(",")) if dims else (), dtype)


def ints(values: Iterable[int]) -> str:
    return ",".join(str(int(v)) for v in values)


def parse_ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",")) if text else ()


# -- attribute codecs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Codec:
    encode: Callable[[dict], str]
    decode: Callable[[object], dict]


def _generic_encode(attrs: dict) -> str:
    if not attrs:
        return "(ANone)"
    return f"(AStr {quote(repr(sorted(attrs.items())))})"


def _generic_decode(value) -> dict:
    return {} if value is None else dict(ast.literal_eval(value))


GENERIC = Codec(_generic_encode, _generic_decode)


def _reduce_encode(attrs):
    axes = attrs["axes"]
    axis = f"(AInt {axes[0]})" if len(axes) == 1 else f"(AStr {quote(ints(axes))})"
    return f"(ATup {axis} (AInt {int(attrs['keepdims'])}))"


def _reduce_decode(value):
    axes, keep = value
    return {"axes": (axes,) if isinstance(axes, int) else parse_ints(axes), "keepdims": bool(keep)}


def _int_codec(key: str) -> Codec:
    return Codec(lambda a: f"(AInt {int(a[key])})", lambda v: {key: int(v)})


def _float_codec(key: str) -> Codec:
    return Codec(lambda a: f"(AFloat {num(a[key])})", lambda v: {key: float(v)})


def _ints_codec(key: str) -> Codec:
    return Codec(lambda a: f"(AStr {quote(ints(a[key]))})", lambda v: {key: parse_ints(v)})


CODECS: dict[str, Codec] = {
    "sum": Codec(_reduce_encode, _reduce_decode),
    "mean": Codec(_reduce_encode, _reduce_decode),
    "max": Codec(_reduce_encode, _reduce_decode),
    "softmax": _int_codec("axis"),
    "log_softmax": _int_codec("axis"),
    "matmul": Codec(
        lambda a: f"(ATup (AInt {int(a['trans_a'])}) (AInt {int(a['trans_b'])}))",
        lambda v: {"trans_a": bool(v[0]), "trans_b": bool(v[1])},
    ),
    "reshape": _ints_codec("shape"),
    "broadcast_to": _ints_codec("shape"),
    "permute": _ints_codec("axes"),
    "cast": Codec(lambda a: f"(AStr {quote(a['dtype'])})", lambda v: {"dtype": v}),
    "cross_entropy_rows": _int_codec("ignore_index"),
    "cross_entropy_grad": _int_codec("ignore_index"),
    "gather": _int_codec("axis"),
    "index_select": _int_codec("axis"),
    "concat": _int_codec("axis"),
    "rms_norm": _float_codec("eps"),
    "layer_norm": _float_codec("eps"),
    **{
        op: Codec(
            lambda a: f"(ATup (AFloat {num(a['eps'])}) (AInt {int(a['trans_b'])}))",
            lambda v: {"eps": float(v[0]), "trans_b": bool(v[1])},
        )
        for op in ("rms_norm_matmul", "layer_norm_matmul")
    },
    "quantized_matmul": Codec(
        lambda a: f"(ATup (AStr {quote(a['qtype'])}) (AStr {quote(ints(a['shape']))}))",
        lambda v: {"qtype": v[0], "shape": parse_ints(v[1])},
    ),
    "rms_norm_quantized_matmul": Codec(
        lambda a: (
            f"(ATup3 (AFloat {num(a['eps'])}) (AStr {quote(a['qtype'])}) "
            f"(AStr {quote(ints(a['shape']))}))"
        ),
        lambda v: {"eps": float(v[0]), "qtype": v[1], "shape": parse_ints(v[2])},
    ),
    # The second field holds two flags: causal (1) and the tokens-first output layout (2).
    "attention": Codec(
        lambda a: (
            f"(ATup4 (AFloat {num(a['scale'])}) "
            f"(AInt {int(a['causal']) + 2 * int(a.get('tokens_first', False))}) "
            f"(AInt {int(a['window'])}) (AFloat {num(a['softcap'])}))"
        ),
        lambda v: {
            "scale": v[0],
            "causal": bool(v[1] & 1),
            "window": v[2],
            "softcap": v[3],
            "tokens_first": bool(v[1] & 2),
        },
    ),
    "segment": Codec(
        lambda a: f"(ATup (AInt {int(a['start'])}) (AStr {quote(ints(a['shape']))}))",
        lambda v: {"start": v[0], "shape": parse_ints(v[1])},
    ),
}


def codec(op: str) -> Codec:
    return CODECS.get(op, GENERIC)


def register_codec(op: str, codec_: Codec) -> None:
    """Rules that build an op give it a codec so they can construct its attributes."""
    CODECS[op] = codec_


def encodable(node: Node) -> bool:
    """Whether the node's attributes survive the round trip through its codec; a node whose
    attributes do not is kept as it is, outside the e-graph."""
    c = codec(node.op)
    try:
        if c is not GENERIC:
            c.encode(node.attrs)
            return True
        return _generic_decode(repr(sorted(node.attrs.items()))) == node.attrs
    except (KeyError, TypeError, ValueError, IndexError, SyntaxError):
        return False


# -- regions -------------------------------------------------------------------------------


@dataclass
class Encoding:
    """The commands that load a region into an e-graph, and what the leaves stand for."""

    lines: list[str] = field(default_factory=list)
    boundary: list[int] = field(default_factory=list)  # Ext k -> graph node id
    constants: dict[int, np.ndarray] = field(default_factory=dict)  # Const id -> array
    types: set[str] = field(default_factory=set)
    strings: dict[str, set[str]] = field(default_factory=dict)  # op -> attr strings seen
    folded: int = 0


def constant_key(array: np.ndarray) -> str:
    """A key equal for equal constants (dtype, shape and contents)."""
    return _digest(array)


def _digest(array: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(str(array.dtype).encode())
    h.update(repr(array.shape).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


class ConstantPool:
    """Constants by content, so equal arrays become one leaf in every region."""

    def __init__(self):
        self.ids: dict[str, int] = {}
        self.arrays: dict[int, np.ndarray] = {}
        self.facts: dict[tuple[int, str], object] = {}

    def fact(self, cid: int, name: str, compute):
        """A fact about constant `cid`, computed once."""
        key = (cid, name)
        if key not in self.facts:
            self.facts[key] = compute(self.arrays[cid])
        return self.facts[key]

    def intern(self, array: np.ndarray) -> int:
        key = _digest(array)
        found = self.ids.get(key)
        if found is None:
            found = self.ids[key] = len(self.ids)
            self.arrays[found] = array
        return found


def constant_leaf(array: np.ndarray, ttype: TensorType, pool: ConstantPool) -> tuple[str, list]:
    """The leaf term of a constant, plus equal terms (a uniform array is a broadcast scalar)."""
    t = type_string(ttype)
    if ttype.dtype in ("f32", "f16"):
        flat = array.reshape(-1)
        if flat.size == 1:
            return f"(Scalar {num(float(flat[0]))} {quote(t)})", []
        if flat.size and np.all(flat == flat[0]) and np.isfinite(flat[0]):
            scalar = f"(Scalar {num(float(flat[0]))} {quote(ttype.dtype + '[]')})"
            leaf = f"(Const {pool.intern(array)} {quote(t)})"
            return leaf, [term("broadcast_to", f"(AStr {quote(ints(ttype.shape))})", t, [scalar])]
    return f"(Const {pool.intern(array)} {quote(t)})", []


def encode_region(
    graph: Graph,
    region: list[int],
    pool: ConstantPool,
    boundary_of: Callable[[int], int] | None = None,
) -> Encoding:
    """Commands that put each node of `region` (ids in topological order) in the e-graph.

    Inputs, parameters and nodes outside the region become `Ext` leaves, numbered in order of
    first use (or by `boundary_of`); constants become leaves by value.
    """
    enc = Encoding()
    inside = set(region)
    leaf_of: dict[int, str] = {}
    values: dict[int, np.ndarray] = {}
    ext_index: dict[int, int] = {}

    def ext(nid: int) -> str:
        if nid not in ext_index:
            ext_index[nid] = boundary_of(nid) if boundary_of else len(enc.boundary)
            enc.boundary.append(nid)
        t = type_string(graph.nodes[nid].type)
        enc.types.add(t)
        return f"(Ext {ext_index[nid]} {quote(t)})"

    def const(nid: int, array: np.ndarray) -> str:
        node = graph.nodes[nid]
        leaf, equal = constant_leaf(array, node.type, pool)
        enc.types.add(type_string(node.type))
        for other in equal:
            enc.lines.append(f"(union {leaf} {other})")
        enc.types.add(node.type.dtype + "[]")
        return leaf

    def ref(nid: int) -> str:
        if nid in inside:
            return f"(Id {nid})"
        if nid in leaf_of:
            return leaf_of[nid]
        node = graph.nodes[nid]
        if node.op == "constant":
            values[nid] = node.attrs["value"]
            leaf_of[nid] = const(nid, node.attrs["value"])
        else:
            leaf_of[nid] = ext(nid)
        return leaf_of[nid]

    for nid in region:
        node = graph.nodes[nid]
        t = type_string(node.type)
        enc.types.add(t)
        if node.op == "constant":
            values[nid] = node.attrs["value"]
            enc.lines.append(f"(union (Id {nid}) {const(nid, node.attrs['value'])})")
            continue
        children = [ref(i) for i in node.inputs]
        folded = _fold(node, values)
        if folded is not None:
            values[nid] = folded
            enc.folded += 1
            enc.lines.append(f"(union (Id {nid}) {const(nid, folded)})")
            continue
        attrs = codec(node.op).encode(node.attrs)
        if attrs.startswith("(AStr"):
            enc.strings.setdefault(node.op, set()).add(ast.literal_eval(attrs[6:-1]))
        enc.lines.append(f"(union (Id {nid}) {term(node.op, attrs, t, children)})")
    enc.constants = pool.arrays
    return enc


def _fold(node: Node, values: dict[int, np.ndarray]) -> np.ndarray | None:
    """The node's value if every input is a known constant and the result is small."""
    if not node.inputs or any(i not in values for i in node.inputs):
        return None
    opdef = get_op(node.op)
    if opdef.kind in ("view", "source") or opdef.reference is None:
        return None
    if node.type.size > FOLD_LIMIT:
        return None
    with np.errstate(all="ignore"):
        out = opdef.reference([values[i] for i in node.inputs], node.attrs)
    out = np.asarray(out)
    want = numpy_dtype(node.type.dtype)
    if out.shape != node.type.shape:
        out = np.broadcast_to(out, node.type.shape)
    out = np.array(out, dtype=want, order="C")
    out.setflags(write=False)
    return out


def is_causal_mask(array: np.ndarray) -> bool:
    """An additive mask that is 0 on and below the (bottom-right aligned) diagonal and -inf
    (or a huge negative number) above it, over its last two axes, the same for every
    leading index."""
    if array.ndim < 2 or array.dtype.kind != "f":
        return False
    tq, tk = array.shape[-2:]
    rows = np.arange(tq)[:, None] + (tk - tq)
    keep = np.arange(tk)[None, :] <= rows
    flat = array.reshape(-1, tq, tk)
    if not np.all(flat[:, keep] == 0):
        return False
    masked = flat[:, ~keep]
    return bool(np.all(masked <= -1e30))


def perm_inverse(axes: tuple[int, ...]) -> tuple[int, ...]:
    out = [0] * len(axes)
    for i, a in enumerate(axes):
        out[a] = i
    return tuple(out)


def swaps_last_two(axes: tuple[int, ...]) -> bool:
    n = len(axes)
    return n >= 2 and axes == (*range(n - 2), n - 1, n - 2)


def nbytes(ttype_text: str) -> int:
    t = parse_type(ttype_text)
    return math.prod(t.shape) * (2 if t.dtype == "f16" else 1 if t.dtype == "bool" else 4)
