"""A normalization over the last axis read by a matmul, as one op: rms_norm_matmul and
layer_norm_matmul.

`rms_norm_matmul(x, [weight,] b)` is `matmul(rms_norm(x, weight), b, trans_b=trans_b)`, and
`layer_norm_matmul(x, [weight[, bias],] b)` the same with layer_norm. The matmul kernel
computes the statistics of its own rows of x in a pass before its main loop and normalizes
each element of x as it loads it, so the normalized rows never go through device memory and
the norm launches no kernel of its own. The e-graph optimizer builds these ops where its cost
model says that pays: where nothing else reads the norm's output (in inference, the fused
q/k/v and gate/up projections and the final norm before the logits). In training the matmul's
weight gradient reads the normalized rows, so the norm keeps its kernel there.

Inputs are x [..., M, K], the norm's parameters as the norm takes them, and b [..., K, N]
([..., N, K] with trans_b); attributes eps and trans_b. The gradient is the norm's and the
matmul's, through the unfused ops (the backward pass normalizes x again).
"""

from __future__ import annotations

import math

from meganeura.ops import OpDef, get_op, register
from meganeura.ops.linalg import decoded_b

NORMS = {"rms_norm_matmul": ("rms_norm", 1), "layer_norm_matmul": ("layer_norm", 2)}


def _parts(attrs: dict) -> tuple[dict, dict]:
    """The attributes of the norm and of the matmul that the op computes."""
    return {"eps": attrs["eps"]}, {"trans_a": False, "trans_b": attrs["trans_b"]}


def _normalize(op: str):
    def normalize(types, attrs):
        eps = attrs.get("eps")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
        return {"eps": float(eps), "trans_b": bool(attrs.get("trans_b", False))}

    return normalize


def _infer(op: str, norm: str, max_params: int):
    def infer(types, attrs):
        if not 2 <= len(types) <= max_params + 2:
            raise ValueError(
                f"{op}: takes x, up to {max_params} {norm} parameters and the matmul's right "
                f"operand; got {len(types)} inputs"
            )
        norm_attrs, mm_attrs = _parts(attrs)
        try:
            h = get_op(norm).infer(list(types[:-1]), norm_attrs)
            return get_op("matmul").infer([h, types[-1]], mm_attrs)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{op}: {error}") from None

    return infer


def _reference(norm: str):
    def run(arrays, attrs):
        norm_attrs, mm_attrs = _parts(attrs)
        h = get_op(norm).reference(arrays[:-1], norm_attrs)
        return get_op("matmul").reference([h, arrays[-1]], mm_attrs)

    return run


def _vjp(norm: str):
    def vjp(g, x, out, attrs):
        norm_attrs, mm_attrs = _parts(attrs)
        h = g.graph.apply(norm, x[:-1], **norm_attrs)
        dh, db = get_op("matmul").vjp(g, [h, x[-1]], out, mm_attrs)
        return [*get_op(norm).vjp(dh, x[:-1], h, norm_attrs), db]

    return vjp


for _op, (_norm, _params) in NORMS.items():
    register(
        OpDef(
            _op,
            "matmul",
            _infer(_op, _norm, _params),
            _reference(_norm),
            _vjp(_norm),
            normalize=_normalize(_op),
            strided_inputs=True,
            computed_inputs=decoded_b,
            doc=f"matmul({_norm}(x, params, eps), b, trans_b): the norm applied as the "
            "matmul loads x",
        )
    )
