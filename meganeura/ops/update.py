"""In-place partial updates: ops whose result is their first input with a region rewritten.

`write_rows(dest, rows, position, axis)` is `dest` with `rows` written at `position` along
`axis` (XLA's dynamic_update_slice along one axis); `position` is an i32 tensor read at run
time, so one compiled program serves every position. The op declares `in_place=0`: when
`dest`'s buffer may be overwritten (dest is a state parameter whose new value this node is,
through `Graph.write_back` or `Graph.assign`, or a transient that nothing reads afterwards),
the planner gives the result dest's buffer and the kernel writes only the rows, so a KV cache
grows by one row per decoded token without being copied. Otherwise the result gets a buffer of
its own and the kernel writes all of it. Ordering is by data dependence: readers of the new
value (attention over the cache) depend on this node, readers of the old value must run first.

The position is clamped so the rows fit, as XLA clamps; callers that need an error for an
out-of-range position check it on the host, where the value is known.
"""

from __future__ import annotations

import numpy as np

from meganeura.graph import normalize_axis
from meganeura.ops import OpDef, register


def _normalize(types, attrs):
    return {"axis": normalize_axis(attrs.get("axis", 0), types[0].ndim, "write_rows")}


def _infer(types, attrs):
    dest, rows, position = types
    axis = attrs["axis"]
    if rows.dtype != dest.dtype:
        raise TypeError(f"write_rows: rows {rows} must have dest's dtype ({dest})")
    count = rows.shape[axis] if rows.ndim == dest.ndim else -1
    expected = (*dest.shape[:axis], count, *dest.shape[axis + 1 :])
    if rows.ndim != dest.ndim or rows.shape != expected or rows.shape[axis] > dest.shape[axis]:
        want = list(dest.shape)
        want[axis] = "n"
        raise ValueError(
            f"write_rows: rows {list(rows.shape)} must be shaped {want} with "
            f"n <= {dest.shape[axis]} (dest is {list(dest.shape)}, axis {axis})"
        )
    if position.dtype != "i32" or position.size != 1:
        raise TypeError(f"write_rows: position must be one i32 value, got {position}")
    return dest


def _reference(arrays, attrs):
    dest, rows, position = arrays
    axis = attrs["axis"]
    count, length = rows.shape[axis], dest.shape[axis]
    start = int(np.clip(int(np.asarray(position).reshape(-1)[0]), 0, length - count))
    out = dest.copy()
    index = [slice(None)] * dest.ndim
    index[axis] = slice(start, start + count)
    out[tuple(index)] = rows
    return out


register(
    OpDef(
        "write_rows",
        "write_rows",
        _infer,
        _reference,
        None,
        normalize=_normalize,
        in_place=0,
        doc="dest with rows written at a run-time position along axis, in place where it can be",
    )
)
