"""The op registry: every op is registered once, with everything the pipeline needs.

An `OpDef` holds an op's shape/dtype rule (`infer`), its NumPy reference implementation
(`reference`), its vector-Jacobian product (`vjp`, written with other ops) and the kernel
archetype it lowers to (`kind`, plus `wgsl` for pointwise ops). Modules in this package
register their ops on import; `get_op` is the only lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from meganeura.graph import TensorType

# Kernel archetypes an op lowers to.
KINDS = (
    "source",  # input, parameter, constant: a buffer, no kernel
    "pointwise",  # any elementwise expression; fused into one kernel per DAG
    "view",  # reshape, permute, broadcast: an index map folded into the reader
    "reduce",  # reductions over axes
    "row",  # softmax-like ops that read and write whole rows
    "matmul",
)


@dataclass
class OpDef:
    name: str
    kind: str
    infer: Callable[[list[TensorType], dict], TensorType]
    reference: Callable[..., Any] | None = None  # (arrays, attrs) -> ndarray
    vjp: Callable[..., list] | None = None  # (g, inputs, out, attrs) -> [Tensor | None]
    normalize: Callable[[list[TensorType], dict], dict] | None = None
    wgsl: Callable[..., str] | None = None  # pointwise: (args, in_types, out_type, attrs) -> expr
    doc: str = ""


_REGISTRY: dict[str, OpDef] = {}


def register(opdef: OpDef) -> OpDef:
    if opdef.kind not in KINDS:
        raise ValueError(f"op {opdef.name!r}: unknown kind {opdef.kind!r}; valid: {KINDS}")
    if opdef.name in _REGISTRY:
        raise ValueError(f"op {opdef.name!r} is registered twice")
    _REGISTRY[opdef.name] = opdef
    return opdef


def get_op(name: str) -> OpDef:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown op {name!r}; registered ops: {', '.join(sorted(_REGISTRY))}"
        ) from None


def all_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)


# Importing the families registers their ops.
from meganeura.ops import elementwise, linalg, nn, reduce, shape, source  # noqa: E402,F401
