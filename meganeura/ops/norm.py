"""Normalization over the last axis: rms_norm and layer_norm, one row kernel each.

Forward is one kernel per op (a workgroup per row). The input gradient has a row kernel of its
own (`*_grad`, re-reading the row instead of storing statistics); the weight and bias
gradients are column sums of the upstream gradient times the normalized input, whose row
statistics are recomputed by small reductions. group_norm and batch_norm are built from these
and from reductions in meganeura.functional.

The weight and bias are optional inputs: `inputs` is [x], [x, weight] or [x, weight, bias]
(layer_norm with a bias and no weight gets a weight of ones).
"""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import TensorType
from meganeura.ops import OpDef, register


def _eps_normalize(op: str):
    def normalize(types, attrs):
        eps = attrs.get("eps")
        if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise ValueError(f"{op}: eps must be a finite number >= 0, got {eps!r}")
        return {"eps": float(eps)}

    return normalize


def _norm_infer(op: str, max_params: int, grad: bool = False):
    def infer(types, attrs):
        x = types[0]
        params = types[1 : len(types) - 1] if grad else types[1:]
        if x.dtype not in ("f32", "f16") or x.ndim == 0:
            raise TypeError(f"{op}: needs a float tensor with at least one dim, got {x}")
        if len(params) > max_params:
            raise ValueError(f"{op}: takes at most {max_params} parameter tensors")
        names = ("weight", "bias")
        for name, p in zip(names, params, strict=False):
            if p.shape != (x.shape[-1],) or p.dtype != x.dtype:
                raise ValueError(
                    f"{op}: {name} must be {x.dtype}[{x.shape[-1]}] (the last dim of x {x}), "
                    f"got {p}"
                )
        if grad and types[-1] != x:
            raise ValueError(f"{op}: the upstream gradient {types[-1]} must match x {x}")
        return x

    return infer


def _stats(x: np.ndarray, centered: bool, eps: float):
    x = x.astype(np.float64)
    mean = x.mean(-1, keepdims=True) if centered else 0.0
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return x - mean, 1.0 / np.sqrt(var + eps)


def _affine(xhat, params):
    if len(params) >= 1:
        xhat = xhat * params[0].astype(np.float64)
    if len(params) == 2:
        xhat = xhat + params[1].astype(np.float64)
    return xhat


def _norm_ref(centered: bool):
    def run(arrays, attrs):
        x, params = arrays[0], arrays[1:]
        xc, rstd = _stats(x, centered, attrs["eps"])
        return _affine(xc * rstd, params).astype(x.dtype)

    return run


def _norm_grad_ref(centered: bool):
    def run(arrays, attrs):
        x, g = arrays[0], arrays[-1].astype(np.float64)
        weight = arrays[1].astype(np.float64) if len(arrays) == 3 else 1.0
        xc, rstd = _stats(x, centered, attrs["eps"])
        xhat, gw = xc * rstd, g * weight
        dx = gw - xhat * (gw * xhat).mean(-1, keepdims=True)
        if centered:
            dx = dx - gw.mean(-1, keepdims=True)
        return (rstd * dx).astype(x.dtype)

    return run


def row_statistics(x, centered: bool, eps: float):
    """(x - mean or x, 1 / sqrt(var + eps)) with the statistics over the last axis, as ops."""
    xc = x - x.mean(-1, keepdims=True) if centered else x
    return xc, ((xc * xc).mean(-1, keepdims=True) + eps).rsqrt()


def _norm_vjp(op: str, centered: bool):
    def vjp(g, x, out, attrs):
        x0, params = x[0], x[1:]
        dx = g.graph.apply(f"{op}_grad", [x0, *params[:1], g], eps=attrs["eps"])
        grads = [dx]
        if params:
            rows = tuple(range(x0.ndim - 1))
            xc, rstd = row_statistics(x0, centered, attrs["eps"])
            grads.append((g * xc * rstd).sum(rows) if rows else g * xc * rstd)
        if len(params) == 2:
            grads.append(g.sum(rows) if rows else g)
        return grads

    return vjp


for _op, _centered, _params, _doc in (
    ("rms_norm", False, 1, "weight * x / sqrt(mean(x^2) + eps) over the last axis (HF Llama)"),
    ("layer_norm", True, 2, "(x - mean) / sqrt(var + eps) * weight + bias over the last axis"),
):
    register(
        OpDef(
            _op,
            "norm",
            _norm_infer(_op, _params),
            _norm_ref(_centered),
            _norm_vjp(_op, _centered),
            normalize=_eps_normalize(_op),
            doc=_doc,
        )
    )
    register(
        OpDef(
            f"{_op}_grad",
            "norm",
            _norm_infer(f"{_op}_grad", 1, grad=True),
            _norm_grad_ref(_centered),
            None,
            normalize=_eps_normalize(f"{_op}_grad"),
            doc=f"the input gradient of {_op}: inputs x, [weight,] upstream gradient",
        )
    )


def _check_norm_param(op: str, name: str, x: TensorType, p) -> None:
    if p is not None and (p.shape != (x.shape[-1],) or p.dtype != x.dtype):
        raise ValueError(
            f"{op}: {name} must be {x.dtype}[{x.shape[-1]}] (the last dim of x {x}), got {p.type}"
        )


def rms_norm(x, weight=None, eps: float = 1e-6):
    """HF Llama's RMSNorm over the last axis: weight * (x / sqrt(mean(x^2) + eps))."""
    _check_norm_param("rms_norm", "weight", x.type, weight)
    inputs = [x] if weight is None else [x, weight]
    return x.graph.apply("rms_norm", inputs, eps=eps)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):
    """LayerNorm over the last axis (torch.nn.functional.layer_norm with one normalized dim)."""
    _check_norm_param("layer_norm", "weight", x.type, weight)
    _check_norm_param("layer_norm", "bias", x.type, bias)
    if weight is None and bias is not None:
        weight = x.graph.constant(np.ones(x.shape[-1]), x.dtype)
    inputs = [x] + [p for p in (weight, bias) if p is not None]
    return x.graph.apply("layer_norm", inputs, eps=eps)
