"""Rotary position embedding (RoPE), computed inline in the kernels that read it.

rope(x[B, H, T, D], positions, inv_freq) rotates each pair of features of x by the angle
position * inv_freq[j]: the halves (j, j + R/2) in Hugging Face's rotate_half convention, or
neighbours (2j, 2j + 1) when interleaved (GPT-J). Features from R = 2 * len(inv_freq) on pass
through unchanged (partial rotary). Positions are an input, so cached decoding at an offset
is just other positions. The angle's cos and sin are computed in the kernel; the frequencies
are an input too, so scaled variants (linear, NTK, Llama 3) only change that table.
The gradient is the inverse rotation: rope with negated frequencies.
"""

from __future__ import annotations

import numpy as np

from meganeura.graph import Tensor
from meganeura.ops import OpDef, register


def _rope_infer(types, attrs):
    x, positions, inv_freq = types
    if x.ndim != 4 or x.dtype not in ("f32", "f16"):
        raise ValueError(f"rope: x must be a float tensor [B, H, T, D], got {x}")
    B, _, T, D = x.shape
    if positions.dtype not in ("i32", "u32"):
        raise TypeError(f"rope: positions must be i32 or u32, got {positions}")
    if positions.shape not in ((T,), (B, T)):
        raise ValueError(
            f"rope: positions must be [T] = [{T}] or [B, T] = [{B}, {T}] for x {x}, got {positions}"
        )
    if inv_freq.ndim != 1 or inv_freq.dtype != "f32" or 2 * inv_freq.shape[0] > D:
        raise ValueError(
            f"rope: inv_freq must be f32[R / 2] with the rotary dim R <= D = {D}, got {inv_freq}"
        )
    return x


def rope_reference(x, positions, inv_freq, interleaved: bool) -> np.ndarray:
    T = x.shape[2]
    half = inv_freq.shape[0]
    # The angle is an f32 product, as in Hugging Face's implementation.
    angle = positions.astype(np.float32)[..., None] * inv_freq.astype(np.float32)
    angle = angle.astype(np.float64).reshape(-1, 1, T, half)
    cos, sin = np.cos(angle), np.sin(angle)
    x64 = x.astype(np.float64)
    out = x64.copy()
    if interleaved:
        a, b = x64[..., 0 : 2 * half : 2], x64[..., 1 : 2 * half : 2]
        out[..., 0 : 2 * half : 2] = a * cos - b * sin
        out[..., 1 : 2 * half : 2] = b * cos + a * sin
    else:
        a, b = x64[..., :half], x64[..., half : 2 * half]
        out[..., :half] = a * cos - b * sin
        out[..., half : 2 * half] = b * cos + a * sin
    return out.astype(x.dtype)


def _rope_vjp(g, x, out, attrs):
    _, positions, inv_freq = x
    back = g.graph.apply("rope", [g, positions, -inv_freq], interleaved=attrs["interleaved"])
    return [back, None, None]


register(
    OpDef(
        "rope",
        "inline",
        _rope_infer,
        lambda arrays, attrs: rope_reference(*arrays, attrs["interleaved"]),
        _rope_vjp,
        normalize=lambda types, attrs: {"interleaved": bool(attrs.get("interleaved", False))},
        doc="rotary position embedding of x[B, H, T, D] at positions, frequencies inv_freq",
    )
)


def rope_frequencies(rotary_dim: int, theta: float = 10000.0) -> np.ndarray:
    """inv_freq[j] = theta^(-2j / rotary_dim), as f32 (the default rotary embedding)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    return (1.0 / np.float64(theta) ** exponents).astype(np.float32)


def rope(
    x: Tensor,
    positions: Tensor,
    theta: float = 10000.0,
    rotary_dim: int | None = None,
    interleaved: bool = False,
    inv_freq: np.ndarray | Tensor | None = None,
) -> Tensor:
    """Rotary embedding of x[B, H, T, D] at integer `positions` ([T] or [B, T]).

    `rotary_dim` (default D) features are rotated, the rest pass through. `inv_freq`
    (f32[rotary_dim / 2]) overrides the frequencies theta^(-2j / rotary_dim).
    """
    D = x.shape[-1]
    if inv_freq is None:
        R = D if rotary_dim is None else int(rotary_dim)
        if R <= 0 or R % 2 or R > D:
            raise ValueError(f"rope: rotary_dim must be even and in 2..{D} for x {x.type}, got {R}")
        if not theta > 0:
            raise ValueError(f"rope: theta must be positive, got {theta!r}")
        inv_freq = rope_frequencies(R, theta)
    if not isinstance(inv_freq, Tensor):
        inv_freq = x.graph.constant(np.asarray(inv_freq, np.float32))
    if rotary_dim is not None and 2 * inv_freq.shape[0] != rotary_dim:
        raise ValueError(
            f"rope: rotary_dim {rotary_dim} disagrees with inv_freq {inv_freq.type} "
            "(which holds rotary_dim / 2 frequencies)"
        )
    return x.graph.apply("rope", [x, positions, inv_freq], interleaved=interleaved)
