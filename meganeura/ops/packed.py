"""Packed results: one kernel writes several tensors into one buffer; views read them back.

A graph node has one output, but some kernels naturally produce several values (attention's
output and its per-row log-sum-exp, the key and value gradients of attention). Such an op
outputs a flat tensor holding its results one after another, and `segment` views each part
as a tensor of its own: a contiguous range of the packed buffer, so readers index it with no
copy. The gradient of a segment is `unsegment`: the segment's gradient placed in a zero
tensor shaped like the packed one.
"""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import Tensor, TensorType
from meganeura.ops import OpDef, register


def _segment_normalize(types, attrs):
    return {"start": int(attrs["start"]), "shape": tuple(int(d) for d in attrs["shape"])}


def _check_range(op: str, packed: TensorType, start: int, shape: tuple[int, ...]) -> None:
    size = math.prod(shape)
    if any(d <= 0 for d in shape) or start < 0 or start + size > packed.size:
        raise ValueError(
            f"{op}: elements [{start}, {start + size}) as shape {list(shape)} do not lie "
            f"inside {packed} ({packed.size} elements)"
        )


def _segment_infer(types, attrs):
    _check_range("segment", types[0], attrs["start"], attrs["shape"])
    return TensorType(attrs["shape"], types[0].dtype)


def _segment_reference(arrays, attrs):
    start, shape = attrs["start"], attrs["shape"]
    return arrays[0].reshape(-1)[start : start + math.prod(shape)].reshape(shape)


def _segment_vjp(g, x, out, attrs):
    return [g.graph.apply("unsegment", [g], start=attrs["start"], shape=x[0].shape)]


register(
    OpDef(
        "segment",
        "view",
        _segment_infer,
        _segment_reference,
        _segment_vjp,
        normalize=_segment_normalize,
        doc="elements [start, start + prod(shape)) of a tensor's flat data, as `shape`",
    )
)


def _unsegment_infer(types, attrs):
    g, shape = types[0], attrs["shape"]
    packed = TensorType(shape, g.dtype)
    _check_range("unsegment", packed, attrs["start"], g.shape)
    return packed


def _unsegment_reference(arrays, attrs):
    g = arrays[0]
    out = np.zeros(math.prod(attrs["shape"]), g.dtype)
    out[attrs["start"] : attrs["start"] + g.size] = g.reshape(-1)
    return out.reshape(attrs["shape"])


def _unsegment_vjp(g, x, out, attrs):
    return [segment(g, attrs["start"], x[0].shape)]


register(
    OpDef(
        "unsegment",
        "unsegment",
        _unsegment_infer,
        _unsegment_reference,
        _unsegment_vjp,
        normalize=_segment_normalize,
        doc="a zero tensor of `shape` whose flat elements from `start` on hold the input",
    )
)


def segment(packed: Tensor, start: int, shape) -> Tensor:
    """The part of `packed` at flat offset `start`, as a tensor of `shape`.

    The segment of an `unsegment` over the same range is the unsegment's input: gradients
    that flow through a packed result come back out without a copy.
    """
    shape = tuple(int(d) for d in shape)
    node = packed.node
    if node.op == "unsegment" and node.attrs["start"] == start:
        inner = Tensor(packed.graph, node.inputs[0])
        if inner.shape == shape:
            return inner
    return packed.graph.apply("segment", [packed], start=start, shape=shape)
