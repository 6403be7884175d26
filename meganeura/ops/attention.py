"""Scaled dot-product attention, flash style: no [Tq, Tk] matrix is ever stored.

`attention(q[B,Hq,Tq,D], k[B,Hkv,Tk,D], v[B,Hkv,Tk,Dv], mask?)` covers multi-head,
grouped-query and multi-query layouts (Hq a multiple of Hkv: query head h reads kv head
h // (Hq / Hkv)). The logits of query i and key j are

    s = scale * q_i . k_j,  then softcap * tanh(s / softcap) when softcap > 0,
    then + mask[b, h, i, j] (additive, broadcast to [B, Hq, Tq, Tk]),

restricted to the allowed keys: with `causal`, j <= i + (Tk - Tq) (aligned bottom-right, as
when queries continue a KV cache); with `window` w > 0, keys within w positions of the
query's own position i + (Tk - Tq): i + Tk - Tq - j < w when causal, |i + Tk - Tq - j| < w
otherwise. A query with no allowed key outputs zeros (and a zero gradient).

The graph op `attention` writes one packed buffer: the output [B, Hq, Tq, Dv] followed by
the log-sum-exp of each query row [B, Hq, Tq] (+inf for rows with no allowed key), read back
through `segment` views. With `tokens_first` the output part is laid out [B, Tq, Hq, Dv]
instead (`attention()` still returns a [B, Hq, Tq, Dv] view of it): the layout in which a
model merges the heads back into its rows for the output projection, which then reads the
buffer in place rather than through a copy.

The backward ops recompute the logits from q, k and the saved log-sum-exp:
`attention_grad_q` gives dq, `attention_grad_kv` gives dk and dv packed (each kv head summing
over the query heads that share it). Their inputs are (q, k, v, dout, lse, delta[, mask])
with delta = rowsum(dout * out).
"""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import Tensor, TensorType
from meganeura.ops import OpDef, register
from meganeura.ops.packed import segment
from meganeura.ops.reduce import sum_to

FLOATS = ("f32", "f16")


# -- shapes and attributes ------------------------------------------------------------------


def attention_dims(q: TensorType, k: TensorType, v: TensorType, op: str = "attention"):
    """(B, Hq, Hkv, Tq, Tk, D, Dv), or a ValueError naming the shapes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{op}: {name} must be [batch, heads, tokens, head_dim], got {t}")
        if t.dtype not in FLOATS:
            raise TypeError(f"{op}: {name} must be f32 or f16, got {t}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"{op}: q, k and v must share one dtype, got {q}, {k}, {v}")
    B, Hq, Tq, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if Bk != B or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{op}: q {list(q.shape)}, k {list(k.shape)} and v {list(v.shape)} need one batch "
            "size, and k and v one number of heads and of tokens"
        )
    if Dk != D:
        raise ValueError(f"{op}: q and k head dims differ: q {list(q.shape)}, k {list(k.shape)}")
    if Hq % Hkv:
        raise ValueError(
            f"{op}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv}); "
            f"q is {list(q.shape)}, k is {list(k.shape)}"
        )
    return B, Hq, Hkv, Tq, Tk, D, v.shape[3]


def check_mask(mask: TensorType, q: TensorType, k: TensorType, op: str = "attention") -> None:
    B, Hq, Tq, _ = q.shape
    Tk = k.shape[2]
    if mask.dtype not in FLOATS:
        raise TypeError(
            f"{op}: the mask is additive and must be float, got {mask}; turn a boolean mask "
            "into one with where(mask, 0.0, -inf)"
        )
    full = (B, Hq, Tq, Tk)
    try:
        ok = mask.ndim <= 4 and np.broadcast_shapes(mask.shape, full) == full
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{op}: mask {list(mask.shape)} does not broadcast to [batch, q heads, q tokens, "
            f"k tokens] = {list(full)}"
        )


def _normalize(types, attrs):
    q = types[0]
    scale = attrs.get("scale")
    window = int(attrs.get("window", 0) or 0)
    softcap = float(attrs.get("softcap", 0.0) or 0.0)
    if window < 0:
        raise ValueError(f"attention: window must be >= 0 (0 = no window), got {window}")
    if softcap < 0:
        raise ValueError(f"attention: softcap must be >= 0 (0 = none), got {softcap}")
    return {
        "scale": float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale),
        "causal": bool(attrs.get("causal", False)),
        "window": window,
        "softcap": softcap,
        "tokens_first": bool(attrs.get("tokens_first", False)),
    }


def packed_layout(
    q: TensorType, v: TensorType, tokens_first: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Shapes of the output and of the log-sum-exp inside attention's packed buffer."""
    B, Hq, Tq, _ = q.shape
    out = (B, Tq, Hq, v.shape[3]) if tokens_first else (B, Hq, Tq, v.shape[3])
    return out, (B, Hq, Tq)


def _output(packed: Tensor, q: TensorType, v: TensorType, tokens_first: bool) -> Tensor:
    """The output part of a packed buffer (or of its gradient) as [B, Hq, Tq, Dv]."""
    out = segment(packed, 0, packed_layout(q, v, tokens_first)[0])
    return out.permute(0, 2, 1, 3) if tokens_first else out


def _infer(types, attrs):
    q, k, v = types[:3]
    attention_dims(q, k, v)
    if len(types) == 4:
        check_mask(types[3], q, k)
    elif len(types) != 3:
        raise ValueError(f"attention: takes q, k, v and an optional mask, got {len(types)} inputs")
    out, lse = packed_layout(q, v)
    return TensorType((math.prod(out) + math.prod(lse),), "f32")


# -- NumPy reference ---------------------------------------------------------------------------


def allowed_keys(Tq: int, Tk: int, causal: bool, window: int) -> np.ndarray:
    """[Tq, Tk] bool: which keys each query may attend to."""
    pos = np.arange(Tq)[:, None] + (Tk - Tq)  # each query's position among the keys
    dist = pos - np.arange(Tk)[None, :]
    allowed = np.ones((Tq, Tk), bool)
    if causal:
        allowed &= dist >= 0
    if window:
        allowed &= np.abs(dist) < window
    return allowed


def _logits(q, k, mask, attrs):
    """float64 logits [B,Hq,Tq,Tk] (-inf where not allowed) and d(logit)/d(scaled score)."""
    group = q.shape[1] // k.shape[1]
    kk = np.repeat(k.astype(np.float64), group, axis=1)
    s = attrs["scale"] * np.einsum("bhid,bhjd->bhij", q.astype(np.float64), kk)
    slope = np.ones_like(s)
    if attrs["softcap"]:
        t = np.tanh(s / attrs["softcap"])
        s = attrs["softcap"] * t
        slope = 1.0 - t * t
    if mask is not None:
        s = s + mask.astype(np.float64)
    allowed = allowed_keys(q.shape[2], k.shape[2], attrs["causal"], attrs["window"])
    return np.where(allowed, s, -np.inf), slope


def _probabilities(logits):
    """Softmax over keys and the log-sum-exp; rows with no allowed key give 0 and +inf."""
    m = logits.max(axis=-1, keepdims=True)
    empty = ~np.isfinite(m)
    e = np.exp(logits - np.where(empty, 0.0, m))
    total = e.sum(axis=-1, keepdims=True)
    p = np.where(empty, 0.0, e / np.where(empty, 1.0, total))
    lse = np.where(empty, np.inf, m + np.log(np.where(empty, 1.0, total)))[..., 0]
    return p, lse


def _reference(arrays, attrs):
    q, k, v = arrays[:3]
    mask = arrays[3] if len(arrays) > 3 else None
    p, lse = _probabilities(_logits(q, k, mask, attrs)[0])
    group = q.shape[1] // k.shape[1]
    out = p @ np.repeat(v.astype(np.float64), group, axis=1)
    if attrs.get("tokens_first"):
        out = out.transpose(0, 2, 1, 3)
    return np.concatenate([out.reshape(-1), lse.reshape(-1)]).astype(_result_dtype(q))


def _grad_parts(arrays, attrs):
    """dq, dk, dv (float64) from the backward ops' inputs."""
    q, k, v, dout, lse, delta = arrays[:6]
    mask = arrays[6] if len(arrays) > 6 else None
    logits, slope = _logits(q, k, mask, attrs)
    with np.errstate(invalid="ignore"):
        p = np.exp(logits - lse.astype(np.float64)[..., None])
    p = np.nan_to_num(p, nan=0.0)
    group = q.shape[1] // k.shape[1]
    B, Hkv, Tk, D = k.shape
    vv = np.repeat(v.astype(np.float64), group, axis=1)
    dout = dout.astype(np.float64)
    dp = dout @ np.swapaxes(vv, -1, -2)
    ds = p * (dp - delta.astype(np.float64)[..., None]) * slope * attrs["scale"]
    dq = ds @ np.repeat(k.astype(np.float64), group, axis=1)
    dk = (np.swapaxes(ds, -1, -2) @ q.astype(np.float64)).reshape(B, Hkv, group, Tk, D).sum(2)
    dv = (np.swapaxes(p, -1, -2) @ dout).reshape(B, Hkv, group, Tk, -1).sum(2)
    return dq, dk, dv


# -- gradient ---------------------------------------------------------------------------------


def _vjp(g, x, out, attrs):
    q, k, v = x[:3]
    mask = x[3] if len(x) > 3 else None
    tokens_first = attrs["tokens_first"]
    out_shape, lse_shape = packed_layout(q.type, v.type, tokens_first)
    n_out = math.prod(out_shape)
    o = _output(out, q.type, v.type, tokens_first)
    lse = segment(out, n_out, lse_shape)
    inner = Tensor(g.graph, g.node.inputs[0]) if g.node.op == "unsegment" else None
    if inner is not None and g.node.attrs["start"] == 0 and inner.shape == out_shape:
        # Only the output was used: no log-sum-exp gradient.
        dout, dlse = (inner.permute(0, 2, 1, 3) if tokens_first else inner), None
    else:
        dout, dlse = _output(g, q.type, v.type, tokens_first), segment(g, n_out, lse_shape)
    delta = (dout * o).sum(-1)
    if dlse is not None:
        delta = delta - dlse  # d lse_i / d s_ij = p_ij: the lse's gradient shifts delta

    inputs = [q, k, v, dout, lse, delta] + ([mask] if mask is not None else [])
    dq = q.graph.apply("attention_grad_q", inputs, **attrs)
    dkv = q.graph.apply("attention_grad_kv", inputs, **attrs)
    dk = segment(dkv, 0, k.shape)
    dv = segment(dkv, k.type.size, v.shape)
    grads = [t if t.dtype == q.dtype else t.astype(q.dtype) for t in (dq, dk, dv)]
    if mask is not None:
        grads.append(_mask_grad(q, k, v, mask, dout, lse, delta, attrs))
    return grads


def _mask_grad(q, k, v, mask, dout, lse, delta, attrs):
    """d logits summed down to the mask's shape. This one gradient needs the [Tq, Tk] scores,
    so it is built from ordinary ops; it exists in a program only when the mask is trained."""
    from meganeura.ops.elementwise import where

    graph = q.graph
    B, Hq, Hkv, Tq, Tk, D, Dv = attention_dims(q.type, k.type, v.type)
    group = Hq // Hkv

    def grouped(t, dim):  # [B, Hq, Tq, dim] -> [B, Hkv, group, Tq, dim]
        return t.reshape(B, Hkv, group, Tq, dim)

    def shared(t, dim):  # [B, Hkv, Tk, dim] -> [B, Hkv, 1, Tk, dim]
        return t.reshape(B, Hkv, 1, Tk, dim)

    def mm_t(a, b):
        return graph.apply("matmul", [a, b], trans_b=True).reshape(B, Hq, Tq, Tk)

    s = mm_t(grouped(q, D), shared(k, D)) * attrs["scale"]
    if attrs["softcap"]:
        s = (s * (1.0 / attrs["softcap"])).tanh() * attrs["softcap"]
    logits = s + (mask if mask.dtype == "f32" else mask.astype("f32"))
    if attrs["causal"] or attrs["window"]:
        allowed = graph.constant(allowed_keys(Tq, Tk, attrs["causal"], attrs["window"]))
        logits = where(allowed, logits, -np.inf)
    p = (logits - lse.reshape(B, Hq, Tq, 1)).exp()
    dp = mm_t(grouped(dout, Dv), shared(v, Dv))
    ds = p * (dp - delta.reshape(B, Hq, Tq, 1))
    dmask = sum_to(ds, mask.shape)
    return dmask if mask.dtype == "f32" else dmask.astype(mask.dtype)


# -- backward ops -------------------------------------------------------------------------------


def _grad_check(op):
    def check(types, attrs):
        if len(types) not in (6, 7):
            raise ValueError(f"{op}: takes q, k, v, dout, lse, delta and an optional mask")
        q, k, v, dout, lse, delta = types[:6]
        attention_dims(q, k, v, op)
        out_shape, lse_shape = packed_layout(q, v)
        if dout.shape != out_shape or lse.shape != lse_shape or delta.shape != lse_shape:
            raise ValueError(
                f"{op}: dout {dout}, lse {lse} and delta {delta} must be shaped "
                f"{list(out_shape)}, {list(lse_shape)} and {list(lse_shape)}"
            )
        if len(types) == 7:
            check_mask(types[6], q, k, op)
        return q, k, v

    return check


def _grad_q_infer(types, attrs):
    q, _, _ = _grad_check("attention_grad_q")(types, attrs)
    return TensorType(q.shape, "f32")


def _grad_kv_infer(types, attrs):
    _, k, v = _grad_check("attention_grad_kv")(types, attrs)
    return TensorType((k.size + v.size,), "f32")


def _result_dtype(q: np.ndarray) -> np.dtype:
    """f32, or float64 when the references run in float64 (finite-difference checks)."""
    return np.result_type(q.dtype, np.float32)


def _grad_q_reference(arrays, attrs):
    return _grad_parts(arrays, attrs)[0].astype(_result_dtype(arrays[0]))


def _grad_kv_reference(arrays, attrs):
    _, dk, dv = _grad_parts(arrays, attrs)
    return np.concatenate([dk.reshape(-1), dv.reshape(-1)]).astype(_result_dtype(arrays[0]))


register(
    OpDef(
        "attention",
        "attention",
        _infer,
        _reference,
        _vjp,
        normalize=_normalize,
        strided_inputs=True,
        # q (RoPE'd, say) may be computed as it is staged: once per workgroup of its rows, and
        # of each of their key splits.
        computed_inputs=lambda types, attrs, producers: {0: 16},
        doc="packed [output | log-sum-exp] of scaled dot-product attention",
    )
)
register(
    OpDef(
        "attention_grad_q",
        "attention_grad_q",
        _grad_q_infer,
        _grad_q_reference,
        None,
        normalize=_normalize,
        strided_inputs=True,
        doc="dq of attention, recomputing the probabilities from the log-sum-exp",
    )
)
register(
    OpDef(
        "attention_grad_kv",
        "attention_grad_kv",
        _grad_kv_infer,
        _grad_kv_reference,
        None,
        normalize=_normalize,
        strided_inputs=True,
        doc="packed [dk | dv] of attention, summed over the query heads of each kv head",
    )
)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    window: int = 0,
    softcap: float = 0.0,
    tokens_first: bool = False,
) -> Tensor:
    """softmax(logits) @ v for q [B,Hq,Tq,D], k [B,Hkv,Tk,D], v [B,Hkv,Tk,Dv] -> [B,Hq,Tq,Dv].

    `scale` defaults to 1/sqrt(D). See the module docstring for the logits and masks.
    `tokens_first` stores the output as [B, Tq, Hq, Dv] (the result is a view of it), for
    callers that merge the heads into rows next: `out.permute(0, 2, 1, 3).reshape(...)` then
    reads the buffer as it is.
    """
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    packed = q.graph.apply(
        "attention",
        inputs,
        scale=scale,
        causal=causal,
        window=window,
        softcap=softcap,
        tokens_first=tokens_first,
    )
    out = _output(packed, q.type, v.type, tokens_first)
    return out if q.dtype == "f32" else out.astype(q.dtype)
