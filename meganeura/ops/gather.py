"""Indexing by integer tensors: gather and index_select (views), and their scatter-add
gradients (kernels).

gather and index_select read their input at an index loaded from another tensor, so like the
other views they are folded into whatever kernel reads them. Their gradients sum many
upstream values into one place; each output element of those kernels adds its contributions
in a fixed order (no atomics), so training is deterministic. embedding is index_select along
axis 0 of the table.
"""

from __future__ import annotations

import numpy as np

from meganeura.graph import TensorType, normalize_axis
from meganeura.ops import OpDef, register

INDEX_DTYPES = ("i32", "u32")


def _check_index(op: str, index: TensorType) -> None:
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{op}: index must be i32 or u32, got {index}")


def _check_range(op: str, index: np.ndarray, n: int) -> None:
    bad = (index < 0) | (index >= n)
    if np.any(bad):
        raise IndexError(f"{op}: index {index[bad][0]} is out of range for size {n}")


def _axis_normalize(op: str):
    def normalize(types, attrs):
        return {"axis": normalize_axis(attrs["axis"], types[0].ndim, op)}

    return normalize


# -- gather ----------------------------------------------------------------------------------


def _gather_infer(types, attrs):
    x, index = types
    axis = attrs["axis"]
    _check_index("gather", index)
    if index.ndim != x.ndim or any(index.shape[d] > x.shape[d] for d in range(x.ndim) if d != axis):
        raise ValueError(
            f"gather: index {index} must have the dims of x {x}, each no larger except on "
            f"axis {axis}"
        )
    return TensorType(index.shape, x.dtype)


def _gather_ref(arrays, attrs):
    x, index = arrays
    axis = attrs["axis"]
    _check_range("gather", index, x.shape[axis])
    crop = tuple(slice(None) if d == axis else slice(0, n) for d, n in enumerate(index.shape))
    return np.take_along_axis(x[crop], index.astype(np.int64), axis=axis)


def _gather_vjp(g, x, out, attrs):
    src, index = x
    grad = g.graph.apply("scatter_add", [g, index], axis=attrs["axis"], shape=src.shape)
    return [grad, None]


register(
    OpDef(
        "gather",
        "view",
        _gather_infer,
        _gather_ref,
        _gather_vjp,
        normalize=_axis_normalize("gather"),
        index_inputs=lambda types, attrs: {1: (types[0].shape[attrs["axis"]], ())},
        doc="torch.gather: out[c] = x[c with c[axis] = index[c]]",
    )
)


def _scatter_add_normalize(types, attrs):
    return {
        "axis": normalize_axis(attrs["axis"], types[0].ndim, "scatter_add"),
        "shape": tuple(int(d) for d in attrs["shape"]),
    }


def _scatter_add_infer(types, attrs):
    src, index = types
    _check_index("scatter_add", index)
    if src.shape != index.shape:
        raise ValueError(f"scatter_add: src {src} and index {index} must have the same shape")
    _gather_infer([TensorType(attrs["shape"], src.dtype), index], attrs)
    return TensorType(attrs["shape"], src.dtype)


def _scatter_add_ref(arrays, attrs):
    src, index = arrays
    axis, shape = attrs["axis"], attrs["shape"]
    _check_range("scatter_add", index, shape[axis])
    out = np.zeros(shape, np.float64)
    coords = list(np.indices(index.shape, sparse=True))
    coords[axis] = index.astype(np.int64)
    np.add.at(out, tuple(coords), src.astype(np.float64))
    return out.astype(src.dtype)


register(
    OpDef(
        "scatter_add",
        "scatter_add",
        _scatter_add_infer,
        _scatter_add_ref,
        lambda g, x, out, attrs: [
            g.graph.apply("gather", [g, x[1]], axis=attrs["axis"]),
            None,
        ],
        normalize=_scatter_add_normalize,
        index_inputs=lambda types, attrs: {1: (attrs["shape"][attrs["axis"]], ())},
        doc="zeros(shape) with src[c] added at c with c[axis] = index[c] (gather's gradient)",
    )
)


# -- index_select ----------------------------------------------------------------------------


def _index_select_infer(types, attrs):
    x, index = types
    _check_index("index_select", index)
    if index.ndim != 1:
        raise ValueError(f"index_select: index must be 1-D, got {index}; reshape it first")
    axis = attrs["axis"]
    return TensorType(x.shape[:axis] + index.shape + x.shape[axis + 1 :], x.dtype)


def _index_select_ref(arrays, attrs):
    x, index = arrays
    _check_range("index_select", index, x.shape[attrs["axis"]])
    return np.take(x, index.astype(np.int64), axis=attrs["axis"])


def _index_select_vjp(g, x, out, attrs):
    src, index = x
    axis = attrs["axis"]
    grad = g.graph.apply("index_add", [g, index], axis=axis, size=src.shape[axis])
    return [grad, None]


register(
    OpDef(
        "index_select",
        "view",
        _index_select_infer,
        _index_select_ref,
        _index_select_vjp,
        normalize=_axis_normalize("index_select"),
        index_inputs=lambda types, attrs: {1: (types[0].shape[attrs["axis"]], ())},
        doc="torch.index_select: the slices of x along axis at the positions in index",
    )
)


def _index_add_normalize(types, attrs):
    size = int(attrs["size"])
    if size < 1:
        raise ValueError(f"index_add: size must be positive, got {size}")
    return {"axis": normalize_axis(attrs["axis"], types[0].ndim, "index_add"), "size": size}


def _index_add_infer(types, attrs):
    src, index = types
    _check_index("index_add", index)
    axis = attrs["axis"]
    if index.ndim != 1 or index.shape[0] != src.shape[axis]:
        raise ValueError(
            f"index_add: index must be 1-D with one entry per slice of src {src} along axis "
            f"{axis}, got {index}"
        )
    return TensorType((*src.shape[:axis], attrs["size"], *src.shape[axis + 1 :]), src.dtype)


def _index_add_ref(arrays, attrs):
    src, index = arrays
    axis, size = attrs["axis"], attrs["size"]
    _check_range("index_add", index, size)
    moved = np.moveaxis(src.astype(np.float64), axis, 0)
    out = np.zeros((size, *moved.shape[1:]), np.float64)
    np.add.at(out, index.astype(np.int64), moved)
    return np.ascontiguousarray(np.moveaxis(out, 0, axis)).astype(src.dtype)


register(
    OpDef(
        "index_add",
        "index_add",
        _index_add_infer,
        _index_add_ref,
        lambda g, x, out, attrs: [
            g.graph.apply("index_select", [g, x[1]], axis=attrs["axis"]),
            None,
        ],
        normalize=_index_add_normalize,
        index_inputs=lambda types, attrs: {1: (attrs["size"], ())},
        doc="zeros with src's slices along axis summed at the positions in index "
        "(the gradient of index_select and embedding)",
    )
)
