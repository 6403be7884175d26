"""Views that move data without arithmetic: slice, flip, pad, concat and tile.

Each is an index map inlined into the kernels that read it, so none launches a kernel of its
own. slice (positive steps) is affine, so matmul-like archetypes read it in place; pad tests
bounds and concat picks its input by coordinate, in branches emitted by
`meganeura.backends.wgsl.views`. The user-facing functions (`getitem`, `split`, `pad`, ...)
follow PyTorch's argument conventions and check their arguments at graph-build time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from meganeura.graph import Tensor, TensorType, normalize_axis
from meganeura.ops import OpDef, register


def _per_axis(op: str, x: TensorType, name: str, values, default) -> list:
    if values is None:
        return [default(d) for d in range(x.ndim)]
    values = list(values)
    if len(values) != x.ndim:
        raise ValueError(f"{op}: {name} {values} must have one entry per dim of {x}")
    return [default(d) if v is None else v for d, v in enumerate(values)]


# -- slice --------------------------------------------------------------------------------


def _slice_normalize(types, attrs):
    x = types[0]
    starts = _per_axis("slice", x, "starts", attrs.get("starts"), lambda d: 0)
    stops = _per_axis("slice", x, "stops", attrs.get("stops"), lambda d: x.shape[d])
    steps = _per_axis("slice", x, "steps", attrs.get("steps"), lambda d: 1)
    out_starts, out_stops, out_steps = [], [], []
    for d, (start, stop, step, n) in enumerate(zip(starts, stops, steps, x.shape, strict=True)):
        where = f"slice: axis {d} of {x}"
        if int(step) != step or step < 1:
            raise ValueError(
                f"{where}: step {step!r} must be a positive integer (use flip to reverse)"
            )
        if not -n <= start < n:
            raise ValueError(f"{where}: start {start} is out of range (valid: {-n}..{n - 1})")
        if not -n <= stop <= n:
            raise ValueError(f"{where}: stop {stop} is out of range (valid: {-n}..{n})")
        start, stop = int(start) % n, int(stop) + (n if stop < 0 else 0)
        if stop <= start:
            raise ValueError(
                f"{where}: the slice [{starts[d]}:{stops[d]}] is empty; stop must exceed start"
            )
        count = math.ceil((stop - start) / step)
        out_starts.append(start)
        out_stops.append(start + (count - 1) * int(step) + 1)  # canonical: just past the last
        out_steps.append(int(step))
    return {"starts": tuple(out_starts), "stops": tuple(out_stops), "steps": tuple(out_steps)}


def _slice_shape(attrs) -> tuple[int, ...]:
    return tuple(
        math.ceil((stop - start) / step)
        for start, stop, step in zip(attrs["starts"], attrs["stops"], attrs["steps"], strict=True)
    )


def _slice_ref(arrays, attrs):
    index = tuple(
        slice(a, b, c)
        for a, b, c in zip(attrs["starts"], attrs["stops"], attrs["steps"], strict=True)
    )
    return np.ascontiguousarray(arrays[0][index])


def _slice_vjp(g, x, out, attrs):
    # The gradient lands on the sliced positions, zero elsewhere: a pad with interior gaps.
    n = x[0].shape
    lo = attrs["starts"]
    hi = tuple(n[d] - attrs["stops"][d] for d in range(len(n)))
    interior = tuple(s - 1 for s in attrs["steps"])
    return [g.graph.apply("pad", [g], lo=lo, hi=hi, interior=interior, value=0.0)]


register(
    OpDef(
        "slice",
        "view",
        lambda types, attrs: TensorType(_slice_shape(attrs), types[0].dtype),
        _slice_ref,
        _slice_vjp,
        normalize=_slice_normalize,
        doc="x[start:stop:step] on every axis (positive steps)",
    )
)


# -- flip -----------------------------------------------------------------------------------


def _axes_normalize(op: str):
    def normalize(types, attrs):
        x = types[0]
        axes = attrs["axes"]
        axes = [axes] if isinstance(axes, int) else list(axes)
        norm = [normalize_axis(a, x.ndim, op) for a in axes]
        if len(set(norm)) != len(norm):
            raise ValueError(f"{op}: axes {axes} of {x} repeat an axis")
        return {"axes": tuple(sorted(norm))}

    return normalize


register(
    OpDef(
        "flip",
        "view",
        lambda types, attrs: types[0],
        lambda arrays, attrs: np.ascontiguousarray(np.flip(arrays[0], attrs["axes"])),
        lambda g, x, out, attrs: [g.graph.apply("flip", [g], axes=attrs["axes"])],
        normalize=_axes_normalize("flip"),
        doc="reverse the order of elements along axes",
    )
)


# -- pad -------------------------------------------------------------------------------------


def _pad_value(op: str, value, dtype: str):
    if isinstance(value, (bool, np.bool_)) or dtype == "bool":
        if dtype != "bool" or value not in (0, 1, True, False):
            raise TypeError(f"{op}: value {value!r} does not fit a {dtype} tensor")
        return bool(value)
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{op}: value must be a number, got {value!r}")
    if dtype in ("i32", "u32"):
        if float(value) != int(value) or (dtype == "u32" and value < 0):
            raise ValueError(f"{op}: value {value!r} does not fit a {dtype} tensor")
        return int(value)
    return float(value)


def _pad_normalize(types, attrs):
    x = types[0]
    lo = _per_axis("pad", x, "lo", attrs.get("lo"), lambda d: 0)
    hi = _per_axis("pad", x, "hi", attrs.get("hi"), lambda d: 0)
    interior = _per_axis("pad", x, "interior", attrs.get("interior"), lambda d: 0)
    for d in range(x.ndim):
        if interior[d] < 0:
            raise ValueError(f"pad: interior padding {interior[d]} of axis {d} must be >= 0")
        if interior[d] and (lo[d] < 0 or hi[d] < 0):
            raise ValueError(f"pad: axis {d} mixes interior padding with cropping; unsupported")
        size = lo[d] + hi[d] + x.shape[d] + (x.shape[d] - 1) * interior[d]
        if size <= 0 or -lo[d] >= x.shape[d] or -hi[d] >= x.shape[d]:
            raise ValueError(
                f"pad: padding ({lo[d]}, {hi[d]}) of axis {d} of {x} leaves nothing "
                f"(negative padding crops, and must keep at least one element)"
            )
    return {
        "lo": tuple(int(v) for v in lo),
        "hi": tuple(int(v) for v in hi),
        "interior": tuple(int(v) for v in interior),
        "value": _pad_value("pad", attrs.get("value", 0.0), x.dtype),
    }


def _pad_infer(types, attrs):
    x = types[0]
    shape = tuple(
        lo + hi + n + (n - 1) * gap
        for lo, hi, gap, n in zip(attrs["lo"], attrs["hi"], attrs["interior"], x.shape, strict=True)
    )
    return TensorType(shape, x.dtype)


def _pad_ref(arrays, attrs):
    x = arrays[0]
    out = np.full(_pad_infer([TensorType(x.shape, "f32")], attrs).shape, attrs["value"], x.dtype)
    src, dst = [], []
    for lo, gap, n, size in zip(attrs["lo"], attrs["interior"], x.shape, out.shape, strict=True):
        positions = lo + np.arange(n) * (gap + 1)
        keep = (positions >= 0) & (positions < size)
        src.append(np.flatnonzero(keep))
        dst.append(positions[keep])
    out[np.ix_(*dst)] = x[np.ix_(*src)]
    return out


def _pad_vjp(g, x, out, attrs):
    lo, hi, interior = attrs["lo"], attrs["hi"], attrs["interior"]
    if all(v >= 0 for v in lo + hi):
        steps = tuple(gap + 1 for gap in interior)
        stops = tuple(lo[d] + (x[0].shape[d] - 1) * steps[d] + 1 for d in range(len(lo)))
        return [g.graph.apply("slice", [g], starts=lo, stops=stops, steps=steps)]
    # Cropping: the cropped elements get no gradient, the padded ones are dropped.
    neg_lo, neg_hi = tuple(-v for v in lo), tuple(-v for v in hi)
    return [g.graph.apply("pad", [g], lo=neg_lo, hi=neg_hi, value=0.0)]


register(
    OpDef(
        "pad",
        "view",
        _pad_infer,
        _pad_ref,
        _pad_vjp,
        normalize=_pad_normalize,
        doc="constant padding: lo/hi elements before/after each axis (negative crops), "
        "interior elements between neighbours",
    )
)


# -- concat ----------------------------------------------------------------------------------


def _concat_normalize(types, attrs):
    if not types:
        raise ValueError("concat: needs at least one tensor")
    return {"axis": normalize_axis(attrs.get("axis", 0), types[0].ndim, "concat")}


def _concat_infer(types, attrs):
    axis, first = attrs["axis"], types[0]
    for n, t in enumerate(types):
        if t.dtype != first.dtype:
            raise TypeError(f"concat: tensor {n} is {t}, tensor 0 is {first}; dtypes must match")
        other = t.shape[:axis] + t.shape[axis + 1 :]
        if t.ndim != first.ndim or other != first.shape[:axis] + first.shape[axis + 1 :]:
            raise ValueError(
                f"concat along axis {axis}: tensor {n} is {t}, tensor 0 is {first}; "
                f"shapes must match except on axis {axis}"
            )
    size = sum(t.shape[axis] for t in types)
    return TensorType((*first.shape[:axis], size, *first.shape[axis + 1 :]), first.dtype)


def _concat_vjp(g, x, out, attrs):
    axis, grads, offset = attrs["axis"], [], 0
    for t in x:
        n = t.shape[axis]
        grads.append(slice_axis(g, axis, offset, offset + n))
        offset += n
    return grads


register(
    OpDef(
        "concat",
        "view",
        _concat_infer,
        lambda arrays, attrs: np.concatenate(arrays, axis=attrs["axis"]),
        _concat_vjp,
        normalize=_concat_normalize,
        doc="join tensors along an existing axis",
    )
)


# -- tile ------------------------------------------------------------------------------------


def _tile_normalize(types, attrs):
    x = types[0]
    reps = list(attrs["reps"])
    if len(reps) != x.ndim:
        raise ValueError(f"tile: reps {reps} must have one entry per dim of {x}")
    if any(int(r) != r or r < 1 for r in reps):
        raise ValueError(f"tile: reps {reps} must be positive integers")
    return {"reps": tuple(int(r) for r in reps)}


def _tile_vjp(g, x, out, attrs):
    split = []
    for r, n in zip(attrs["reps"], x[0].shape, strict=True):
        split += [r, n]
    summed = g.reshape(tuple(split)).sum(tuple(range(0, len(split), 2)))
    return [summed]


register(
    OpDef(
        "tile",
        "view",
        lambda types, attrs: TensorType(
            tuple(r * n for r, n in zip(attrs["reps"], types[0].shape, strict=True)),
            types[0].dtype,
        ),
        lambda arrays, attrs: np.tile(arrays[0], attrs["reps"]),
        _tile_vjp,
        normalize=_tile_normalize,
        doc="repeat the whole tensor reps[d] times along each axis d",
    )
)


# -- user-facing functions ----------------------------------------------------------------------


def slice_axis(x: Tensor, axis: int, start: int, stop: int, step: int = 1) -> Tensor:
    """x[..., start:stop:step, ...] along one axis."""
    axis = normalize_axis(axis, x.ndim, "slice")
    starts, stops, steps = [None] * x.ndim, [None] * x.ndim, [None] * x.ndim
    starts[axis], stops[axis], steps[axis] = start, stop, step
    return x.graph.apply("slice", [x], starts=starts, stops=stops, steps=steps)


def flip(x: Tensor, axes: int | Sequence[int]) -> Tensor:
    """torch.flip: reverse the order of elements along `axes`."""
    return x.graph.apply("flip", [x], axes=axes)


def getitem(x: Tensor, key) -> Tensor:
    """x[key] for ints, slices (any step), None, Ellipsis and one integer index tensor.

    Ints drop their axis, None inserts one, negative steps flip. An integer Tensor selects
    along its axis like torch: the index's dims replace that axis.
    """
    key = key if isinstance(key, tuple) else (key,)
    if sum(k is Ellipsis for k in key) > 1:
        raise IndexError(f"index {key}: at most one Ellipsis")
    consumed = sum(1 for k in key if k is not None and k is not Ellipsis)
    if consumed > x.ndim:
        raise IndexError(f"index {key}: too many indices for {x.type} ({consumed} > {x.ndim})")
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (x.ndim - consumed) + key[at + 1 :]
    else:
        key = key + (slice(None),) * (x.ndim - consumed)
    starts, stops, steps, flips, shape = [], [], [], [], []
    tensor_index = None  # (axis of x, index tensor)
    axis = 0
    for k in key:
        if k is None:
            shape.append(1)
            continue
        n = x.shape[axis]
        if isinstance(k, Tensor):
            if tensor_index is not None:
                raise IndexError(f"index {key}: only one index tensor is supported")
            if k.dtype not in ("i32", "u32"):
                raise IndexError(f"index: an index tensor must be i32 or u32, got {k.type}")
            tensor_index = (axis, k)
            starts.append(0)
            stops.append(n)
            steps.append(1)
            shape.extend(k.shape)
        elif isinstance(k, slice):
            rng = range(*k.indices(n))
            if len(rng) == 0:
                raise IndexError(f"index: slice {k} of axis {axis} (size {n}) is empty")
            first, last = (rng[0], rng[-1]) if rng.step > 0 else (rng[-1], rng[0])
            starts.append(first)
            stops.append(last + 1)
            steps.append(abs(rng.step))
            if rng.step < 0:
                flips.append(axis)
            shape.append(len(rng))
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of range for axis {axis} of size {n}")
            starts.append(int(k) % n)
            stops.append(int(k) % n + 1)
            steps.append(1)
        else:
            raise IndexError(
                f"index: unsupported key {k!r}; use ints, slices, None, ... or one index tensor"
            )
        axis += 1
    out = x
    if any(
        (a, b, c) != (0, n, 1) for a, b, c, n in zip(starts, stops, steps, x.shape, strict=True)
    ):
        out = x.graph.apply("slice", [out], starts=starts, stops=stops, steps=steps)
    if flips:
        out = flip(out, flips)
    if tensor_index is not None:
        # The index's dims take the place of its axis; the final reshape puts them there.
        at, index = tensor_index
        out = index_select(out, at, index.reshape(index.type.size))
    return out.reshape(tuple(shape)) if out.shape != tuple(shape) else out


def index_select(x: Tensor, axis: int, index: Tensor) -> Tensor:
    return x.graph.apply("index_select", [x, index], axis=axis)


def split(x: Tensor, split_size_or_sections: int | Sequence[int], axis: int = 0) -> list[Tensor]:
    """torch.split: pieces of `split_size` along `axis` (the last may be smaller), or pieces
    of the given `sections` sizes. Each piece is a slice view."""
    ax = normalize_axis(axis, x.ndim, "split")
    n = x.shape[ax]
    if isinstance(split_size_or_sections, (int, np.integer)):
        size = int(split_size_or_sections)
        if size < 1:
            raise ValueError(f"split: split_size must be positive, got {size}")
        sections = [min(size, n - start) for start in range(0, n, size)]
    else:
        sections = [int(s) for s in split_size_or_sections]
        if any(s < 1 for s in sections) or sum(sections) != n:
            raise ValueError(
                f"split: sections {sections} must be positive and sum to {n}, the size of "
                f"axis {ax} of {x.type}"
            )
    pieces, start = [], 0
    for s in sections:
        pieces.append(x if s == n else slice_axis(x, ax, start, start + s))
        start += s
    return pieces


def chunk(x: Tensor, chunks: int, axis: int = 0) -> list[Tensor]:
    """torch.chunk: `chunks` pieces of ceil(n / chunks) (fewer when that divides evenly)."""
    if chunks < 1:
        raise ValueError(f"chunk: chunks must be positive, got {chunks}")
    n = x.shape[normalize_axis(axis, x.ndim, "chunk")]
    return split(x, math.ceil(n / chunks), axis)


# Each concat node reads at most this many tensors, so a kernel that inlines it stays within
# the storage-buffer limit; longer lists become a tree of concats.
CONCAT_FAN_IN = 4


def concat(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """torch.cat: join tensors along an existing axis."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("concat: needs at least one tensor")
    if len(tensors) == 1:
        return tensors[0]
    if len(tensors) > CONCAT_FAN_IN:
        step = math.ceil(len(tensors) / CONCAT_FAN_IN)
        tensors = [concat(tensors[i : i + step], axis) for i in range(0, len(tensors), step)]
    return tensors[0].graph.apply("concat", tensors, axis=axis)


def stack(tensors: Sequence[Tensor], axis: int = 0) -> Tensor:
    """torch.stack: join same-shaped tensors along a new axis."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("stack: needs at least one tensor")
    ax = normalize_axis(axis, tensors[0].ndim + 1, "stack")
    for n, t in enumerate(tensors):
        if t.shape != tensors[0].shape:
            raise ValueError(
                f"stack: tensor {n} is {t.type}, tensor 0 is {tensors[0].type}; shapes must match"
            )
    shape = (*tensors[0].shape[:ax], 1, *tensors[0].shape[ax:])
    return concat([t.reshape(shape) for t in tensors], ax)


def pad(x: Tensor, pads: Sequence[int], value: float = 0.0, mode: str = "constant") -> Tensor:
    """torch.nn.functional.pad: `pads` = (left, right) of the last axis, then of the one
    before, ...; negative entries crop."""
    if mode != "constant":
        raise ValueError(f"pad: mode {mode!r} is not supported; only 'constant' is")
    pads = [int(p) for p in pads]
    if len(pads) % 2 or len(pads) // 2 > x.ndim:
        raise ValueError(
            f"pad: pads {pads} must hold (before, after) pairs for at most {x.ndim} dims of "
            f"{x.type}"
        )
    lo, hi = [0] * x.ndim, [0] * x.ndim
    for k in range(len(pads) // 2):
        lo[x.ndim - 1 - k], hi[x.ndim - 1 - k] = pads[2 * k], pads[2 * k + 1]
    if not any(lo + hi):
        return x
    return x.graph.apply("pad", [x], lo=lo, hi=hi, value=value)


def tile(x: Tensor, reps: Sequence[int]) -> Tensor:
    """torch.tile / numpy.tile: reps shorter than x's dims are padded with leading ones,
    longer ones add leading axes."""
    reps = [int(r) for r in reps]
    if len(reps) < x.ndim:
        reps = [1] * (x.ndim - len(reps)) + reps
    if len(reps) > x.ndim:
        x = x.reshape((1,) * (len(reps) - x.ndim) + x.shape)
    if all(r == 1 for r in reps):
        return x
    return x.graph.apply("tile", [x], reps=reps)


def repeat(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """torch.Tensor.repeat: like tile, but `sizes` must cover every dim of x."""
    if len(sizes) < x.ndim:
        raise ValueError(
            f"repeat: {len(sizes)} sizes {list(sizes)} cannot cover the {x.ndim} dims of {x.type}"
        )
    return tile(x, sizes)


def expand(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """torch.Tensor.expand: broadcast to `sizes`, where -1 keeps a dim's size."""
    sizes = [int(s) for s in sizes]
    lead = len(sizes) - x.ndim
    if lead < 0:
        raise ValueError(f"expand: sizes {sizes} have fewer dims than {x.type}")
    shape = []
    for d, s in enumerate(sizes):
        if s == -1:
            if d < lead:
                raise ValueError(f"expand: -1 is not allowed for the new leading dim {d}")
            s = x.shape[d - lead]
        shape.append(s)
    return x if tuple(shape) == x.shape else x.broadcast_to(shape)
