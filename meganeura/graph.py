"""The graph IR: typed nodes in topological order, and the Tensor handles that build them.

A `Graph` is a list of `Node`s. Each node names a registered op (see `meganeura.ops`), the ids
of its inputs, its attributes and its `TensorType`. Nodes are only ever appended, so the list
is always in topological order. `Tensor` is a thin handle (graph, node id) that gives nodes
the operators and methods users know from NumPy and PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

DTYPES = ("f32", "f16", "i32", "u32", "bool")
_NUMPY_DTYPES = {
    "f32": np.float32,
    "f16": np.float16,
    "i32": np.int32,
    "u32": np.uint32,
    "bool": np.bool_,
}


def numpy_dtype(dtype: str) -> np.dtype:
    return np.dtype(_NUMPY_DTYPES[dtype])


def dtype_of_array(array: np.ndarray) -> str:
    """Our dtype name for a NumPy array; 64-bit types narrow to their 32-bit kin."""
    kind = array.dtype.kind
    if kind == "f":
        return "f16" if array.dtype == np.float16 else "f32"
    if kind == "i":
        return "i32"
    if kind == "u":
        return "u32"
    if kind == "b":
        return "bool"
    raise TypeError(f"unsupported array dtype {array.dtype}; use float32, int32, uint32 or bool")


def check_dtype(dtype: str, what: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"{what}: unknown dtype {dtype!r}; valid dtypes are {', '.join(DTYPES)}")
    return dtype


@dataclass(frozen=True)
class TensorType:
    shape: tuple[int, ...]
    dtype: str = "f32"

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * (2 if self.dtype == "f16" else 4)

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass
class Node:
    id: int
    op: str
    inputs: tuple[int, ...]
    attrs: dict[str, Any]
    type: TensorType
    name: str | None = None  # inputs, parameters and named outputs carry a user-facing name

    def describe(self) -> str:
        label = f" {self.name!r}" if self.name else ""
        return f"%{self.id} = {self.op}{label} {self.type}"


@dataclass
class ParameterSpec:
    """How a parameter is initialized: an init name with options, or an array."""

    init: Any = "zeros"
    trainable: bool = True
    state: bool = False  # optimizer state: persistent, saved in checkpoints, never trained


@dataclass(frozen=True)
class ParameterView:
    """A parameter stored as a slice of another one (the optimizer concatenates weights that
    multiply the same input): elements [start, stop) of `storage` along `axis`."""

    storage: str
    axis: int
    start: int
    stop: int


def broadcast_shapes(op: str, *types: TensorType) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*(t.shape for t in types)))
    except ValueError:
        shapes = ", ".join(str(list(t.shape)) for t in types)
        raise ValueError(f"{op}: shapes {shapes} cannot be broadcast together") from None


@dataclass
class Graph:
    """A computation graph. Build it with `input`, `parameter`, `constant` and Tensor ops."""

    nodes: list[Node] = field(default_factory=list)
    inputs: dict[str, int] = field(default_factory=dict)
    parameters: dict[str, int] = field(default_factory=dict)
    parameter_specs: dict[str, ParameterSpec] = field(default_factory=dict)
    outputs: dict[str, int] = field(default_factory=dict)
    # After each training step, parameter/state node id -> node holding its new value.
    updates: dict[int, int] = field(default_factory=dict)
    # Parameters that live inside another parameter's buffer, by name (see ParameterView).
    parameter_views: dict[str, ParameterView] = field(default_factory=dict)
    # State written by whichever program computes the new value: node id -> candidate values.
    write_backs: dict[int, list[int]] = field(default_factory=dict)

    # -- sources -------------------------------------------------------------------------
    def input(self, name: str, shape: Sequence[int], dtype: str = "f32") -> Tensor:
        self._check_new_name(name, "input")
        ttype = TensorType(_check_shape(shape, f"input {name!r}"), check_dtype(dtype, name))
        node = self._append("input", (), {"name": name}, ttype, name)
        self.inputs[name] = node.id
        return Tensor(self, node.id)

    def parameter(
        self,
        name: str,
        shape: Sequence[int],
        init: Any = "zeros",
        trainable: bool = True,
        dtype: str = "f32",
        state: bool = False,
    ) -> Tensor:
        """A learnable tensor. `init` is an init name ("zeros", "normal", "kaiming_uniform",
        ...), a callable `(shape, rng) -> array`, or an array of the right shape."""
        self._check_new_name(name, "parameter")
        ttype = TensorType(_check_shape(shape, f"parameter {name!r}"), check_dtype(dtype, name))
        if isinstance(init, np.ndarray) and tuple(init.shape) != ttype.shape:
            raise ValueError(
                f"parameter {name!r}: init array has shape {list(init.shape)}, "
                f"expected {list(ttype.shape)}"
            )
        node = self._append("parameter", (), {"name": name}, ttype, name)
        self.parameters[name] = node.id
        self.parameter_specs[name] = ParameterSpec(init, trainable and not state, state)
        return Tensor(self, node.id)

    def constant(self, value: Any, dtype: str | None = None) -> Tensor:
        array = np.asarray(value)
        dtype = dtype or dtype_of_array(array)
        # A copy (the caller's array is not frozen); np.ascontiguousarray would make 0-d 1-d.
        array = np.array(array, dtype=numpy_dtype(dtype), order="C")
        array.setflags(write=False)
        return Tensor(
            self, self._append("constant", (), {"value": array}, TensorType(array.shape, dtype)).id
        )

    def output(self, name: str, tensor: Tensor) -> Tensor:
        """Mark `tensor` as a named output, readable from a session."""
        if tensor.graph is not self:
            raise ValueError(f"output {name!r}: tensor belongs to another graph")
        if name in self.outputs and self.outputs[name] != tensor.id:
            raise ValueError(f"output {name!r} is already defined")
        self.outputs[name] = tensor.id
        return tensor

    def assign(self, target: Tensor, value: Tensor) -> None:
        """After each step, `target` (a parameter or optimizer state) takes `value`."""
        if target.node.op != "parameter":
            raise ValueError(f"assign: target must be a parameter, got {target.node.describe()}")
        if value.type != target.type:
            raise ValueError(
                f"assign: {target.node.name!r} is {target.type}, value is {value.type}"
            )
        self.updates[target.id] = value.id

    def write_back(self, target: Tensor, value: Tensor) -> None:
        """Whenever a program computes `value`, state parameter `target` takes it afterwards.

        Unlike `assign` (applied by training steps only), a write-back is applied by every run
        or step whose outputs depend on `value`, and a target may have several, one per
        computation that produces its next value: a KV cache is written back by the prefill
        and by the decode computations of one graph. A program may compute at most one
        write-back of a target. With in-place ops such as write_rows the new value is
        written straight into the target's buffer.
        """
        if target.node.op != "parameter" or not self.parameter_specs[target.node.name].state:
            raise ValueError(
                f"write_back: target must be a state parameter (graph.parameter(..., "
                f"state=True)), got {target.node.describe()}"
            )
        if value.type != target.type:
            raise ValueError(
                f"write_back: {target.node.name!r} is {target.type}, value is {value.type}"
            )
        self.write_backs.setdefault(target.id, []).append(value.id)

    # -- building ----------------------------------------------------------------------------
    def apply(self, op: str, inputs: Sequence[Tensor], **attrs: Any) -> Tensor:
        """Append a node for registered op `op`; its shape rule checks the inputs."""
        from meganeura.ops import get_op

        opdef = get_op(op)
        for t in inputs:
            if t.graph is not self:
                raise ValueError(f"{op}: input tensor belongs to another graph")
        types = [self.nodes[t.id].type for t in inputs]
        try:
            attrs = opdef.normalize(types, attrs) if opdef.normalize else attrs
            ttype = opdef.infer(types, attrs)
        except (ValueError, TypeError) as error:
            # Shape rules only see types; name the tensors so the user can find them.
            operands = ", ".join(_operand(t.node) for t in inputs)
            raise type(error)(f"{error}; operands: {operands}") from None
        return Tensor(self, self._append(op, tuple(t.id for t in inputs), attrs, ttype).id)

    def _append(
        self, op: str, inputs: tuple[int, ...], attrs: dict, ttype: TensorType, name=None
    ) -> Node:
        node = Node(len(self.nodes), op, inputs, attrs, ttype, name)
        self.nodes.append(node)
        return node

    def _check_new_name(self, name: str, kind: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")
        if name in self.inputs or name in self.parameters:
            raise ValueError(f"{kind} {name!r}: the name is already used in this graph")

    # -- queries ---------------------------------------------------------------------------
    def tensor(self, ref: int | str | Tensor) -> Tensor:
        if isinstance(ref, Tensor):
            return ref
        if isinstance(ref, str):
            for table in (self.outputs, self.inputs, self.parameters):
                if ref in table:
                    return Tensor(self, table[ref])
            raise KeyError(
                f"no tensor named {ref!r}; outputs: {sorted(self.outputs)}, "
                f"inputs: {sorted(self.inputs)}, parameters: {sorted(self.parameters)}"
            )
        return Tensor(self, ref)

    def consumers(self) -> list[list[int]]:
        users: list[list[int]] = [[] for _ in self.nodes]
        for node in self.nodes:
            for i in node.inputs:
                users[i].append(node.id)
        return users

    def live_nodes(self, roots: Iterable[int]) -> list[int]:
        """Ids of the nodes that `roots` depend on, in topological order."""
        seen = set()
        stack = list(roots)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(self.nodes[i].inputs)
        return sorted(seen)

    def __str__(self) -> str:
        lines = []
        for node in self.nodes:
            args = ", ".join(f"%{i}" for i in node.inputs)
            attrs = {k: v for k, v in node.attrs.items() if k not in ("value", "name")}
            lines.append(f"{node.describe()} ({args}) {attrs if attrs else ''}".rstrip())
        return "\n".join(lines)


def _operand(node: Node) -> str:
    return f"{node.name!r} {node.type}" if node.name else f"%{node.id} ({node.op}) {node.type}"


def _check_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    out = tuple(int(d) for d in shape)
    if any(d <= 0 for d in out):
        raise ValueError(f"{what}: shape {list(out)} must have positive dimensions")
    return out


class Tensor:
    """A handle to one node of a graph, with NumPy/PyTorch-style operators."""

    __slots__ = ("graph", "id")
    __array_priority__ = 1000  # so ndarray + Tensor defers to Tensor.__radd__

    def __init__(self, graph: Graph, id: int):
        self.graph = graph
        self.id = id

    @property
    def node(self) -> Node:
        return self.graph.nodes[self.id]

    @property
    def type(self) -> TensorType:
        return self.node.type

    @property
    def shape(self) -> tuple[int, ...]:
        return self.node.type.shape

    @property
    def dtype(self) -> str:
        return self.node.type.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return f"Tensor({self.node.describe()})"

    def _lift(self, other: Any) -> Tensor:
        if isinstance(other, Tensor):
            return other
        array = np.asarray(other)
        if array.dtype.kind == "f" and self.dtype not in ("f32", "f16"):
            if array.ndim or not float(array).is_integer():
                raise TypeError(
                    f"cannot combine {self.dtype} tensor {self!r} with float value {other!r}: "
                    "there is no implicit promotion; use .astype('f32') first"
                )
            return self.graph.constant(array, self.dtype)
        if array.dtype.kind in "fiub" and array.ndim == 0:
            return self.graph.constant(array, self.dtype)
        return self.graph.constant(array, self.dtype if array.dtype.kind == "f" else None)

    def _binary(self, op: str, other: Any, reverse: bool = False) -> Tensor:
        other = self._lift(other)
        a, b = (other, self) if reverse else (self, other)
        return self.graph.apply(op, [a, b])

    def __add__(self, o):
        return self._binary("add", o)

    def __radd__(self, o):
        return self._binary("add", o, True)

    def __sub__(self, o):
        return self._binary("sub", o)

    def __rsub__(self, o):
        return self._binary("sub", o, True)

    def __mul__(self, o):
        return self._binary("mul", o)

    def __rmul__(self, o):
        return self._binary("mul", o, True)

    def __truediv__(self, o):
        return self._binary("div", o)

    def __rtruediv__(self, o):
        return self._binary("div", o, True)

    def __matmul__(self, o):
        return matmul(self, self._lift(o))

    def __rmatmul__(self, o):
        return matmul(self._lift(o), self)

    def __pow__(self, o):
        return self._binary("pow", o)

    def __neg__(self):
        return self.graph.apply("neg", [self])

    def __lt__(self, o):
        return self._binary("lt", o)

    def __le__(self, o):
        return self._binary("le", o)

    def __gt__(self, o):
        return self._binary("gt", o)

    def __ge__(self, o):
        return self._binary("ge", o)

    def eq(self, o) -> Tensor:
        return self._binary("eq", o)

    def ne(self, o) -> Tensor:
        return self._binary("ne", o)

    __hash__ = object.__hash__  # comparisons build nodes, so identity is the hash

    # -- unary and shape methods -------------------------------------------------------------
    def exp(self) -> Tensor:
        return self.graph.apply("exp", [self])

    def log(self) -> Tensor:
        return self.graph.apply("log", [self])

    def sqrt(self) -> Tensor:
        return self.graph.apply("sqrt", [self])

    def rsqrt(self) -> Tensor:
        return self.graph.apply("rsqrt", [self])

    def abs(self) -> Tensor:
        return self.graph.apply("abs", [self])

    def relu(self) -> Tensor:
        return self.graph.apply("relu", [self])

    def sigmoid(self) -> Tensor:
        return self.graph.apply("sigmoid", [self])

    def tanh(self) -> Tensor:
        return self.graph.apply("tanh", [self])

    def gelu(self, approximate: str = "none") -> Tensor:
        return gelu(self, approximate)

    def silu(self) -> Tensor:
        return self.graph.apply("silu", [self])

    def sin(self) -> Tensor:
        return self.graph.apply("sin", [self])

    def cos(self) -> Tensor:
        return self.graph.apply("cos", [self])

    def erf(self) -> Tensor:
        return self.graph.apply("erf", [self])

    def softplus(self, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
        return self.graph.apply("softplus", [self], beta=beta, threshold=threshold)

    def clamp(self, min: float | None = None, max: float | None = None) -> Tensor:
        return self.graph.apply("clamp", [self], min=min, max=max)

    def astype(self, dtype: str) -> Tensor:
        return self.graph.apply("cast", [self], dtype=dtype)

    def sum(self, axis=None, keepdims: bool = False) -> Tensor:
        return self.graph.apply("sum", [self], axes=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims: bool = False) -> Tensor:
        return self.graph.apply("mean", [self], axes=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims: bool = False) -> Tensor:
        return self.graph.apply("max", [self], axes=axis, keepdims=keepdims)

    def reshape(self, *shape) -> Tensor:
        if len(shape) == 1 and not isinstance(shape[0], int):
            shape = tuple(shape[0])
        return self.graph.apply("reshape", [self], shape=shape)

    def permute(self, *axes) -> Tensor:
        if len(axes) == 1 and not isinstance(axes[0], int):
            axes = tuple(axes[0])
        return self.graph.apply("permute", [self], axes=axes)

    def transpose(self, axis0: int = -2, axis1: int = -1) -> Tensor:
        """Swap two axes (the last two by default), like torch.transpose."""
        axes = list(range(self.ndim))
        if self.ndim < 2:
            raise ValueError(f"transpose: needs at least 2 dims, got shape {list(self.shape)}")
        a0, a1 = _axis(axis0, self.ndim, "transpose"), _axis(axis1, self.ndim, "transpose")
        axes[a0], axes[a1] = axes[a1], axes[a0]
        return self.permute(axes)

    @property
    def T(self) -> Tensor:
        return self.permute(tuple(reversed(range(self.ndim))))

    def broadcast_to(self, shape: Sequence[int]) -> Tensor:
        return self.graph.apply("broadcast_to", [self], shape=tuple(shape))

    def expand(self, *sizes) -> Tensor:
        """torch.Tensor.expand: broadcast to `sizes`; -1 keeps a dim."""
        from meganeura.ops.views import expand

        return expand(self, _sizes(sizes))

    def repeat(self, *sizes) -> Tensor:
        """torch.Tensor.repeat: tile the tensor `sizes[d]` times along each dim d."""
        from meganeura.ops.views import repeat

        return repeat(self, _sizes(sizes))

    def flip(self, *axes) -> Tensor:
        return self.graph.apply("flip", [self], axes=_sizes(axes))

    def split(self, split_size_or_sections, axis: int = 0) -> list[Tensor]:
        from meganeura.ops.views import split

        return split(self, split_size_or_sections, axis)

    def chunk(self, chunks: int, axis: int = 0) -> list[Tensor]:
        from meganeura.ops.views import chunk

        return chunk(self, chunks, axis)

    def gather(self, axis: int, index: Tensor) -> Tensor:
        return self.graph.apply("gather", [self, index], axis=axis)

    def index_select(self, axis: int, index: Tensor) -> Tensor:
        return self.graph.apply("index_select", [self, index], axis=axis)

    def __getitem__(self, key) -> Tensor:
        """Indexing with ints, slices (any step), None, ... and one integer index tensor."""
        from meganeura.ops.views import getitem

        return getitem(self, key)

    def softmax(self, axis: int = -1) -> Tensor:
        return self.graph.apply("softmax", [self], axis=axis)

    def log_softmax(self, axis: int = -1) -> Tensor:
        return self.graph.apply("log_softmax", [self], axis=axis)


def _sizes(args: tuple) -> tuple:
    """Sizes given either as separate arguments or as one sequence."""
    if len(args) == 1 and not isinstance(args[0], int):
        return tuple(args[0])
    return tuple(args)


def _axis(axis: int, ndim: int, op: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{op}: axis {axis} is out of range for {ndim} dims (valid: {-ndim}..{ndim - 1})"
        )
    return axis % ndim


def normalize_axis(axis: int, ndim: int, op: str) -> int:
    return _axis(axis, ndim, op)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """NumPy matmul semantics: 1-D operands are promoted and the added dim removed."""
    squeeze = []
    if a.ndim == 1:
        a = a.reshape(1, a.shape[0])
        squeeze.append(-2)
    if b.ndim == 1:
        b = b.reshape(b.shape[0], 1)
        squeeze.append(-1)
    out = a.graph.apply("matmul", [a, b])
    if squeeze:
        shape = list(out.shape)
        for ax in sorted(squeeze):
            del shape[ax]
        out = out.reshape(tuple(shape))
    return out


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    if approximate == "none":
        return x.graph.apply("gelu", [x])
    if approximate == "tanh":
        return x.graph.apply("gelu_tanh", [x])
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
