"""Matrix multiplication: batched, broadcast batch dims, operands optionally transposed."""

from __future__ import annotations

import math

import numpy as np

from meganeura.graph import TensorType, dtype_of_array, numpy_dtype
from meganeura.ops import OpDef, register
from meganeura.ops.reduce import sum_to


def matmul_dims(a: TensorType, b: TensorType, trans_a: bool, trans_b: bool):
    """(batch shape, M, K, N) of op(a) @ op(b), or a ValueError naming the shapes."""
    if a.ndim < 2 or b.ndim < 2:
        raise ValueError(f"matmul: operands need at least 2 dims, got {a} and {b}")
    m, ka = (a.shape[-1], a.shape[-2]) if trans_a else (a.shape[-2], a.shape[-1])
    kb, n = (b.shape[-1], b.shape[-2]) if trans_b else (b.shape[-2], b.shape[-1])
    if ka != kb:
        raise ValueError(
            f"matmul: inner dims differ: a is {list(a.shape)}{'ᵀ' if trans_a else ''}, "
            f"b is {list(b.shape)}{'ᵀ' if trans_b else ''} ({ka} != {kb})"
        )
    try:
        batch = tuple(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    except ValueError:
        raise ValueError(
            f"matmul: batch dims {list(a.shape[:-2])} and {list(b.shape[:-2])} cannot be broadcast"
        ) from None
    return batch, m, ka, n


def _infer(types, attrs):
    a, b = types
    if a.dtype not in ("f32", "f16") or b.dtype not in ("f32", "f16"):
        raise TypeError(f"matmul: operands must be f32 or f16, got {a} and {b}")
    batch, m, _, n = matmul_dims(a, b, attrs["trans_a"], attrs["trans_b"])
    return TensorType((*batch, m, n), _product_dtype(a.dtype, b.dtype))


def _product_dtype(a: str, b: str) -> str:
    """f16 @ f16 is f16; a product with an f32 operand is f32 (f16 weights stored for an f32
    model: the f16 operand is widened as it is loaded, the accumulation is f32 either way)."""
    return "f16" if a == b == "f16" else "f32"


def _normalize(types, attrs):
    return {
        "trans_a": bool(attrs.get("trans_a", False)),
        "trans_b": bool(attrs.get("trans_b", False)),
    }


def _reference(arrays, attrs):
    a, b = arrays
    if attrs["trans_a"]:
        a = np.swapaxes(a, -1, -2)
    if attrs["trans_b"]:
        b = np.swapaxes(b, -1, -2)
    a, b = a.astype(np.float32, copy=False), b.astype(np.float32, copy=False)
    if b.ndim == 2 and a.ndim > 2:
        # One matrix for every row: a single BLAS product (NumPy's stacked matmul with a
        # transposed operand takes a loop hundreds of times slower).
        out = (a.reshape(-1, a.shape[-1]) @ b).reshape(*a.shape[:-1], b.shape[-1])
    else:
        out = np.matmul(a, b)
    return out.astype(numpy_dtype(_product_dtype(*(dtype_of_array(x) for x in arrays))))


def mm(a, b, trans_a=False, trans_b=False):
    return a.graph.apply("matmul", [a, b], trans_a=trans_a, trans_b=trans_b)


def _vjp(g, x, out, attrs):
    a, b = x
    ta, tb = attrs["trans_a"], attrs["trans_b"]
    # C = op(A) op(B): dop(A) = G op(B)^T and dop(B) = op(A)^T G, transposed back where needed.
    da = mm(b, g, trans_a=tb, trans_b=True) if ta else mm(g, b, trans_b=not tb)
    db = mm(g, a, trans_a=True, trans_b=ta) if tb else mm(a, g, trans_a=not ta)
    # With one f16 operand the product and its gradients are f32: each goes back to its
    # operand's dtype.
    return [_as(sum_to(da, a.shape), a), _as(sum_to(db, b.shape), b)]


def _as(grad, x):
    return grad if grad.dtype == x.dtype else grad.astype(x.dtype)


# Products of at most this many rows may compute A as they load it (OpDef.computed_inputs):
# the GEMV kernels, whose workgroups (two output columns each at the least) read A's few rows
# whole. Larger products load A in tiles of vec4s; on an H200, a 128-row prefill's down and o
# projections computing SwiGLU and the heads' transpose as they loaded took 43 us instead of
# 26 us plus a 7.7 us launch storing them.
COMPUTED_A_ROWS = 8
# Larger products may decode a GGUF-quantized weight B [N, K] (`dequantize`, as a prompt's
# dense products of quantized weights read it) as their tiles stage it, four weights per
# vec4, in every workgroup along M (tiles of at least 16 rows): the qtypes whose blocks the
# tiled kernels decode (backends/wgsl/matmul_operands.py). On an H200 a 128-token prefill
# with Q4_1 weights went 4.30 -> 3.84 ms (four launches a layer writing f32 weights gone).
DECODED_B_ROWS = 16
DECODED_QTYPES = ("Q4_1",)


def decoded_b(types, attrs, producers) -> dict[int, int]:
    """{position of B: evaluations} where B, the last input, is a quantized weight the tiled
    kernels decode as they stage it (read transposed, x @ Wᵀ); else {}."""
    b, x = producers[-1], types[0]
    rows = math.prod(x.shape[:-2]) * x.shape[-1 if attrs.get("trans_a") else -2]
    if b.op == "dequantize" and b.attrs["qtype"] in DECODED_QTYPES and attrs["trans_b"]:
        return {len(types) - 1: math.ceil(rows / DECODED_B_ROWS)}
    return {}


def _computed_operands(types, attrs, producers) -> dict[int, int]:
    _, M, _, N = matmul_dims(types[0], types[1], attrs["trans_a"], attrs["trans_b"])
    if M <= COMPUTED_A_ROWS:
        return {0: math.ceil(N / 2)}
    return decoded_b(types, attrs, producers)


register(
    OpDef(
        "matmul",
        "matmul",
        _infer,
        _reference,
        _vjp,
        normalize=_normalize,
        strided_inputs=True,
        computed_inputs=_computed_operands,
    )
)
