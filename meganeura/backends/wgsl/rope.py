"""The inline value of rope: each element rotated with its partner, cos and sin computed here."""

from __future__ import annotations

from meganeura.backends.wgsl.emit import Emitter, inline_value
from meganeura.backends.wgsl.kernels import _pointwise, archetype

# A rope that must be stored (a graph output, say) is computed by the pointwise kernel.
archetype("rope")(_pointwise)


@inline_value("rope")
def _rope(em: Emitter, node, idx: str) -> str:
    x_id, pos_id, freq_id = node.inputs
    shape = node.type.shape
    B, _, T, D = shape
    half = em.graph.nodes[freq_id].type.shape[0]
    R = 2 * half
    d = em.index(Emitter.coord(idx, shape, 3))
    t = "0u" if T == 1 else em.index(Emitter.coord(idx, shape, 2))
    if em.graph.nodes[pos_id].type.ndim == 2 and B > 1:
        pos_index = em.index(f"{Emitter.coord(idx, shape, 0)} * {T}u + {t}")
    else:
        pos_index = t
    if node.attrs["interleaved"]:
        first = em.index(f"{d} % 2u == 0u")
        j, step = f"{d} / 2u", "1u"
    else:
        first = em.index(f"{d} < {half}u")
        j, step = f"select({d} - {half}u, {d}, {first})", f"{half}u"
    partner = f"select({idx} - {step}, {idx} + {step}, {first})"
    if R < D:
        rotated = em.index(f"{d} < {R}u")
        partner, j = f"select({idx}, {partner}, {rotated})", f"select(0u, {j}, {rotated})"
    x = f"f32({em.value(x_id, idx)})"
    xp = f"f32({em.value(x_id, em.index(partner))})"
    pos = em.value(pos_id, pos_index)
    freq = em.value(freq_id, em.index(j))
    angle = em.index(f"mn_wrap_angle(f32({pos}) * {freq})")
    out = f"{x} * cos({angle}) + select({xp}, -{xp}, {first}) * sin({angle})"
    if R < D:
        out = f"select({x}, {out}, {rotated})"
    return f"f16({out})" if node.type.dtype == "f16" else out
