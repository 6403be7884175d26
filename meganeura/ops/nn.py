"""Row ops of neural networks: softmax, log_softmax and the fused cross-entropy pair."""

from __future__ import annotations

import numpy as np

from meganeura.graph import TensorType, normalize_axis
from meganeura.ops import OpDef, register


def _axis_normalize(op):
    return lambda types, attrs: {"axis": normalize_axis(attrs.get("axis", -1), types[0].ndim, op)}


def _float_same(op):
    def infer(types, attrs):
        if types[0].dtype not in ("f32", "f16"):
            raise TypeError(f"{op}: needs a float tensor, got {types[0]}")
        return types[0]

    return infer


def _softmax_ref(arrays, attrs):
    x = arrays[0].astype(np.float64)
    e = np.exp(x - x.max(axis=attrs["axis"], keepdims=True))
    return (e / e.sum(axis=attrs["axis"], keepdims=True)).astype(arrays[0].dtype)


def _log_softmax_ref(arrays, attrs):
    x = arrays[0].astype(np.float64)
    m = x.max(axis=attrs["axis"], keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=attrs["axis"], keepdims=True)) + m
    return (x - lse).astype(arrays[0].dtype)


def _softmax_vjp(g, x, out, attrs):
    return [out * (g - (g * out).sum(attrs["axis"], keepdims=True))]


def _log_softmax_vjp(g, x, out, attrs):
    return [g - out.exp() * g.sum(attrs["axis"], keepdims=True)]


register(
    OpDef(
        "softmax",
        "row",
        _float_same("softmax"),
        _softmax_ref,
        _softmax_vjp,
        normalize=_axis_normalize("softmax"),
    )
)
register(
    OpDef(
        "log_softmax",
        "row",
        _float_same("log_softmax"),
        _log_softmax_ref,
        _log_softmax_vjp,
        normalize=_axis_normalize("log_softmax"),
    )
)


# Cross-entropy over the last axis with integer labels. `cross_entropy_rows` gives the loss of
# each row (0 where the label is ignore_index); its gradient op reads the logits again, so no
# softmax or one-hot tensor is ever stored.


def _ce_infer(types, attrs):
    logits, labels = types
    if logits.dtype not in ("f32", "f16"):
        raise TypeError(f"cross_entropy: logits must be float, got {logits}")
    if labels.dtype not in ("i32", "u32"):
        raise TypeError(f"cross_entropy: labels must be i32 class indices, got {labels}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"cross_entropy: logits {list(logits.shape)} (classes last) need labels of shape "
            f"{list(logits.shape[:-1])}, got {list(labels.shape)}"
        )
    return TensorType(labels.shape, logits.dtype)


def _ce_parts(logits, labels, ignore_index):
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]
    valid = labels != ignore_index
    safe = np.where(valid, labels, 0).astype(np.int64)
    if np.any(valid & ((safe < 0) | (safe >= x.shape[-1]))):
        bad = labels[valid & ((safe < 0) | (safe >= x.shape[-1]))][0]
        raise IndexError(f"cross_entropy: label {bad} is out of range for {x.shape[-1]} classes")
    picked = np.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    return x, lse, valid, safe, picked


def _ce_ref(arrays, attrs):
    logits, labels = arrays
    _, lse, valid, _, picked = _ce_parts(logits, labels, attrs["ignore_index"])
    return np.where(valid, lse - picked, 0.0).astype(logits.dtype)


def _ce_vjp(g, x, out, attrs):
    logits, labels = x
    grad = logits.graph.apply(
        "cross_entropy_grad", [logits, labels, g], ignore_index=attrs["ignore_index"]
    )
    return [grad, None]


def _ce_normalize(types, attrs):
    return {"ignore_index": int(attrs.get("ignore_index", -100))}


register(
    OpDef(
        "cross_entropy_rows",
        "row",
        _ce_infer,
        _ce_ref,
        _ce_vjp,
        normalize=_ce_normalize,
        index_inputs=lambda types, attrs: {1: (types[0].shape[-1], (attrs["ignore_index"],))},
        doc="per-row cross-entropy of logits[..., C] against integer labels",
    )
)


def _ce_grad_infer(types, attrs):
    logits, labels, g = types
    _ce_infer([logits, labels], attrs)
    if g.shape != labels.shape:
        raise ValueError(f"cross_entropy_grad: upstream gradient {g} must match labels {labels}")
    return logits


def _ce_grad_ref(arrays, attrs):
    logits, labels, g = arrays
    x, lse, valid, safe, _ = _ce_parts(logits, labels, attrs["ignore_index"])
    p = np.exp(x - lse[..., None])
    np.put_along_axis(
        p, safe[..., None], np.take_along_axis(p, safe[..., None], axis=-1) - 1.0, axis=-1
    )
    return (p * np.where(valid, g, 0.0)[..., None]).astype(logits.dtype)


register(
    OpDef(
        "cross_entropy_grad",
        "row",
        _ce_grad_infer,
        _ce_grad_ref,
        None,
        normalize=_ce_normalize,
        index_inputs=lambda types, attrs: {1: (types[0].shape[-1], (attrs["ignore_index"],))},
        doc="(softmax(logits) - onehot(labels)) * g per row, recomputed from the logits",
    )
)
