"""Weights kept in GGUF's quantized blocks on the device, dequantized where they are read.

A quantized weight [rows, cols] lives in a u32 parameter holding the file's bytes (rows of
blocks of 32 values; see QUANT_LAYOUTS). Two ops read it:
- `dequantize(raw)` -> f32 [rows, cols], inlined into its readers (an embedding lookup reads
  only the rows it gathers, never a widened table);
- `quantized_matmul(x, raw)` = x @ dequantize(raw)ᵀ, a kernel that decodes each block once
  and dots it with the rows of x: a [out, in] weight read as compactly as the file holds it.
The NumPy references dequantize with the gguf package, the format's own implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from meganeura.graph import Graph, Tensor, TensorType, matmul
from meganeura.ops import OpDef, get_op, register

# Bytes of one block of 32 values, and where its parts sit: Q8_0 is an f16 scale d and 32 i8
# q (d * q); Q4_0 is d and 16 bytes of nibbles, low nibbles first ((q - 8) * d); Q4_1 is d,
# an f16 minimum m and the nibbles (q * d + m).
QUANT_LAYOUTS = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
BLOCK = 32


@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized weight in a graph: its u32 parameter, block type and logical shape."""

    raw: Tensor
    qtype: str
    shape: tuple[int, int]

    def dequantize(self) -> Tensor:
        return dequantize(self)


def pack_words(blocks: np.ndarray) -> np.ndarray:
    """The bytes of `blocks` as little-endian u32 words (zero-padded to a whole word)."""
    data = np.ascontiguousarray(blocks, np.uint8).reshape(-1)
    data = np.concatenate([data, np.zeros(-data.size % 4, np.uint8)])
    return data.view("<u4").astype(np.uint32)


def _check(op: str, types, attrs) -> None:
    raw = types[0]
    qtype, (rows, cols) = attrs["qtype"], attrs["shape"]
    if qtype not in QUANT_LAYOUTS:
        raise ValueError(f"{op}: qtype {qtype!r} is not one of {', '.join(QUANT_LAYOUTS)}")
    if cols % BLOCK:
        raise ValueError(f"{op}: {qtype} rows need a multiple of {BLOCK} columns, got {cols}")
    words = -(-rows * cols // BLOCK * QUANT_LAYOUTS[qtype] // 4)
    if raw.dtype != "u32" or raw.shape != (words,):
        raise ValueError(
            f"{op}: a {qtype} weight [{rows}, {cols}] needs u32[{words}] raw words, got {raw}"
        )


def _normalize(types, attrs):
    return {"qtype": str(attrs["qtype"]), "shape": tuple(int(d) for d in attrs["shape"])}


def dequantize_words(words: np.ndarray, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    from gguf import GGMLQuantizationType, dequantize

    rows, cols = shape
    row_bytes = cols // BLOCK * QUANT_LAYOUTS[qtype]
    data = words.view(np.uint8)[: rows * row_bytes].reshape(rows, row_bytes)
    return dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32).reshape(shape)


def _dequantize_infer(types, attrs):
    _check("dequantize", types, attrs)
    return TensorType(attrs["shape"], "f32")


register(
    OpDef(
        "dequantize",
        "inline",
        _dequantize_infer,
        lambda arrays, attrs: dequantize_words(arrays[0], attrs["qtype"], attrs["shape"]),
        None,
        normalize=_normalize,
        doc="the f32 values of a GGUF-quantized weight held as u32 words",
    )
)


def _qmm_infer(types, attrs):
    x = types[0]
    _check("quantized_matmul", types[1:], attrs)
    rows, cols = attrs["shape"]
    if x.dtype != "f32" or x.ndim < 1 or x.shape[-1] != cols:
        raise ValueError(
            f"quantized_matmul: x must be f32 [..., {cols}] for a [{rows}, {cols}] weight, got {x}"
        )
    return TensorType((*x.shape[:-1], rows), "f32")


def _qmm_reference(arrays, attrs):
    x, words = arrays
    w = dequantize_words(words, attrs["qtype"], attrs["shape"])
    return np.matmul(x.astype(np.float32), w.T).astype(np.float32)


def _qmm_vjp(g, inputs, out, attrs):
    _, raw = inputs
    w = raw.graph.apply("dequantize", [raw], **attrs)
    return [matmul(g, w), None]


def _computed_x(types, attrs, producers) -> dict[int, int]:
    """x may be computed as it is loaded: each workgroup (two outputs at the least) reads it."""
    return {0: math.ceil(attrs["shape"][0] / 2)}


register(
    OpDef(
        "quantized_matmul",
        "quantized_matmul",
        _qmm_infer,
        _qmm_reference,
        _qmm_vjp,
        normalize=_normalize,
        strided_inputs=True,
        computed_inputs=_computed_x,
        doc="x @ Wᵀ for a GGUF-quantized weight W [out, in], decoded inside the kernel",
    )
)


def _norm_qmm_infer(types, attrs):
    x, *params, raw = types
    if len(params) > 1:
        raise ValueError(
            f"rms_norm_quantized_matmul: takes x, at most one rms_norm weight and the raw "
            f"weight; got {len(types)} inputs"
        )
    try:
        h = get_op("rms_norm").infer([x, *params], {"eps": attrs["eps"]})
    except ValueError as error:
        raise ValueError(f"rms_norm_quantized_matmul: {error}") from None
    return _qmm_infer([h, raw], attrs)


def _norm_qmm_reference(arrays, attrs):
    h = get_op("rms_norm").reference(arrays[:-1], {"eps": attrs["eps"]})
    return _qmm_reference([h, arrays[-1]], attrs)


def _norm_qmm_vjp(g, inputs, out, attrs):
    x, raw = inputs[:-1], inputs[-1]
    h = raw.graph.apply("rms_norm", x, eps=attrs["eps"])
    dh, _ = _qmm_vjp(g, [h, raw], out, {"qtype": attrs["qtype"], "shape": attrs["shape"]})
    return [*get_op("rms_norm").vjp(dh, x, h, {"eps": attrs["eps"]}), None]


def _norm_qmm_normalize(types, attrs):
    return {**_normalize(types, attrs), "eps": float(attrs["eps"])}


register(
    OpDef(
        "rms_norm_quantized_matmul",
        "quantized_matmul",
        _norm_qmm_infer,
        _norm_qmm_reference,
        _norm_qmm_vjp,
        normalize=_norm_qmm_normalize,
        strided_inputs=True,
        doc="quantized_matmul(rms_norm(x, weight, eps), raw): the norm applied as the kernel "
        "loads x (built by the e-graph optimizer)",
    )
)


def quantized_parameter(graph: Graph, name: str, weight) -> QuantizedTensor:
    """A frozen parameter holding `weight` (io.gguf.QuantizedWeight) as u32 words."""
    words = pack_words(weight.blocks)
    raw = graph.parameter(name, words.shape, init=words, trainable=False, dtype="u32")
    return QuantizedTensor(raw, weight.qtype, tuple(weight.shape))


def dequantize(weight: QuantizedTensor) -> Tensor:
    return weight.raw.graph.apply(
        "dequantize", [weight.raw], qtype=weight.qtype, shape=weight.shape
    )


def quantized_matmul(x: Tensor, weight: QuantizedTensor) -> Tensor:
    """x @ Wᵀ, like a Linear layer's matmul with the [out, in] weight read transposed."""
    return x.graph.apply(
        "quantized_matmul", [x, weight.raw], qtype=weight.qtype, shape=weight.shape
    )
