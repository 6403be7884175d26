"""Values of the views that are more than an index map of one input: pad, concat, gather and
index_select. They are inlined into their readers like any view; pad and concat emit branches,
so a padded position reads nothing and a concat reads only the input it picks."""

from __future__ import annotations

from meganeura.backends.wgsl.emit import Emitter, contiguous_strides, inline_value, literal


def linear_index(coords: list[str], shape) -> str:
    """The linear index of `coords` in a contiguous `shape` (size-1 dims skipped)."""
    strides = contiguous_strides(shape)
    terms = [
        c if stride == 1 else f"{c} * {stride}u"
        for c, size, stride in zip(coords, shape, strides, strict=True)
        if size != 1
    ]
    return " + ".join(terms) if terms else "0u"


def coords_of(em: Emitter, idx: str, shape) -> list[str]:
    return [
        "0u" if size == 1 else em.index(Emitter.coord(idx, shape, d))
        for d, size in enumerate(shape)
    ]


@inline_value("pad")
def _pad(em: Emitter, node, idx: str) -> str:
    src = em.graph.nodes[node.inputs[0]]
    out_shape, attrs = node.type.shape, node.attrs
    coords, src_coords, conditions = coords_of(em, idx, out_shape), [], []
    for d, c in enumerate(coords):
        lo, hi, gap, n = attrs["lo"][d], attrs["hi"][d], attrs["interior"][d], src.type.shape[d]
        if lo == 0 and hi == 0 and gap == 0:
            src_coords.append(c)
            continue
        shift = f" - {lo}i" if lo > 0 else f" + {-lo}i" if lo < 0 else ""
        q = em.index(f"i32({c}){shift}")
        if lo > 0:
            conditions.append(f"{q} >= 0i")
        last = (n - 1) * (gap + 1)
        if hi > 0 or gap:
            conditions.append(f"{q} <= {last}i")
        if gap:
            conditions.append(f"{q} % {gap + 1}i == 0i")
            src_coords.append(f"(u32({q}) / {gap + 1}u)")
        else:
            src_coords.append(f"u32({q})")
    src_index = linear_index(src_coords, src.type.shape)
    read = lambda child: child.value(node.inputs[0], child.index(src_index))  # noqa: E731
    if not conditions:
        return read(em)
    default = literal(attrs["value"], node.type.dtype)
    return em.branches(node.type.dtype, [(" && ".join(conditions), read)], default)


@inline_value("concat")
def _concat(em: Emitter, node, idx: str) -> str:
    axis, out_shape = node.attrs["axis"], node.type.shape
    coords = coords_of(em, idx, out_shape)
    cases, offset = [], 0
    for n, nid in enumerate(node.inputs):
        shape = em.graph.nodes[nid].type.shape
        local = list(coords)
        local[axis] = f"({coords[axis]} - {offset}u)" if offset else coords[axis]
        src_index = linear_index(local, shape)
        offset += shape[axis]
        condition = None if n == len(node.inputs) - 1 else f"{coords[axis]} < {offset}u"
        cases.append(
            (condition, lambda child, nid=nid, i=src_index: child.value(nid, child.index(i)))
        )
    return em.branches(node.type.dtype, cases)


@inline_value("gather", "index_select")
def _gather(em: Emitter, node, idx: str) -> str:
    x_id, index_id = node.inputs
    axis, out_shape = node.attrs["axis"], node.type.shape
    coords = coords_of(em, idx, out_shape)
    if node.op == "gather":
        picked = em.value(index_id, idx)  # the index has the output's shape
    else:
        picked = em.value(index_id, coords[axis] if out_shape[axis] != 1 else "0u")
    coords[axis] = f"u32({picked})"
    x_shape = em.graph.nodes[x_id].type.shape
    return em.value(x_id, em.index(linear_index(coords, x_shape)))
