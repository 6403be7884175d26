"""GGUF's quantized blocks in WGSL, shared by the quantized GEMV (quant.py) and the tiled
products that decode a Q4_1 weight as they stage it (matmul_operands.py): where a weight's
raw words are, and how a word of Q4_1 nibbles becomes four values.

A Q4_1 block is 5 words: the f16 pair (d, m), then 16 bytes whose low nibbles are the block's
values 0-15 and high nibbles 16-31; a value is q * d + m (GGML's block_q4_1).
"""

from __future__ import annotations

from meganeura.lower.plan import strided_view
from meganeura.ops.quant import BLOCK, QUANT_LAYOUTS

Q4_1_WORDS = QUANT_LAYOUTS["Q4_1"] // 4  # words of a Q4_1 block


def raw_words(graph, node, materialized) -> tuple[int, int]:
    """(buffer node, offset in words) of the raw words a dequantize reads: its input's buffer,
    or a contiguous run of one (a slice of a larger buffer)."""
    view = strided_view(graph, node.inputs[0], materialized)
    if view is None or tuple(view[1]) != (1,):
        raise AssertionError(
            f"{node.describe()} reads words that are no contiguous run of a buffer"
        )
    return view[0], view[2]


def q4_1_nibbles(q: str) -> str:
    """The low nibbles of the four bytes of word `q`, as vec4<f32> (byte 0 first)."""
    return f"vec4<f32>(vec4<u32>({q}, {q} >> 8u, {q} >> 16u, {q} >> 24u) & vec4<u32>(15u))"


def q4_1_vec4_function(name: str, raw: str, offset: int, cols: int) -> str:
    """WGSL `fn name(row, k) -> vec4<f32>`: values k..k+3 (k a multiple of 4) of row `row` of a
    Q4_1 weight [rows, cols] whose words start at word `offset` of buffer `raw`."""
    start = f"{offset}u + " if offset else ""
    return f"""fn {name}(row: u32, k: u32) -> vec4<f32> {{
  let w = {start}row * {cols // BLOCK * Q4_1_WORDS}u + (k / {BLOCK}u) * {Q4_1_WORDS}u;
  let dm = unpack2x16float({raw}[w]);
  let j = k % {BLOCK}u;
  let q = {raw}[w + 1u + (j % 16u) / 4u] >> select(0u, 4u, j >= 16u);
  return {q4_1_nibbles("q")} * dm.x + dm.y;
}}
"""
