"""A Llama (SmolLM2) graph written from primitives, as an ONNX export spells it.

No fused op is used: RMSNorm is pow-mean-add-rsqrt-mul, SiLU is x·sigmoid(x), attention is
matmul-scale-mask-softmax-matmul with the softmax itself decomposed, grouped-query heads are
repeated by reshape-expand-reshape, and the loss is log-softmax and a label gather. The
optimizer must turn it into the kernels of the hand-written model.
"""

from __future__ import annotations

import math

import numpy as np

from meganeura import Graph, Tensor
from meganeura.models.smollm2 import LlamaConfig as Config
from meganeura.ops import all_ops

SMOLLM2_135M = Config()
TINY = Config(
    vocab_size=37,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
)


def linear(g: Graph, x: Tensor, w: Tensor) -> Tensor:
    """x @ w.T as an export writes it: a transpose node, then a matmul."""
    return x @ w.transpose(0, 1)


def rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    variance = (x**2.0).mean(-1, keepdims=True)
    return w * (x * (variance + eps).rsqrt())


def softmax(x: Tensor) -> Tensor:
    e = (x - x.max(-1, keepdims=True)).exp()
    return e / e.sum(-1, keepdims=True)


def log_softmax(x: Tensor) -> Tensor:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - shifted.exp().sum(-1, keepdims=True).log()


def repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    b, h, t, d = x.shape
    if n_rep == 1:
        return x
    expanded = x.reshape(b, h, 1, t, d).broadcast_to((b, h, n_rep, t, d))
    return expanded.reshape(b, h * n_rep, t, d)


def causal_mask(tokens: int) -> np.ndarray:
    mask = np.zeros((tokens, tokens), np.float32)
    mask[np.triu_indices(tokens, 1)] = -np.inf
    return mask


def rope_tables(g: Graph, head_dim: int, theta: float, tokens: int) -> tuple[Tensor, Tensor]:
    """cos and sin of position * inv_freq, duplicated over both halves ([T, D])."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(tokens)[:, None] * inv_freq[None, :]
    emb = np.concatenate([angles, angles], axis=-1)
    return g.constant(np.cos(emb).astype(np.float32)), g.constant(np.sin(emb).astype(np.float32))


def rotate_half(x: Tensor) -> Tensor:
    from meganeura.ops.views import concat, slice_axis

    half = x.shape[-1] // 2
    return concat([-slice_axis(x, -1, half, x.shape[-1]), slice_axis(x, -1, 0, half)], -1)


def has_ops(*names: str) -> bool:
    ops = all_ops()
    return all(n in ops for n in names)


def decomposed_llama(c: Config, batch: int, tokens: int, train: bool = True):
    """(graph, loss or None): embeddings as a one-hot matmul when there is no gather op."""
    g = Graph()
    ids = g.input("input_ids", (batch, tokens), "i32")
    embed = g.parameter("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), init="normal")
    if has_ops("index_select"):
        from meganeura.ops.views import index_select

        x = index_select(embed, 0, ids.reshape(batch * tokens)).reshape(
            batch, tokens, c.hidden_size
        )
    else:
        x = g.input("inputs_embeds", (batch, tokens, c.hidden_size))
    mask = g.constant(causal_mask(tokens))
    rope = has_ops("slice", "concat")
    if rope:
        cos, sin = rope_tables(g, c.head_dim, c.rope_theta, tokens)
    scale = 1.0 / math.sqrt(c.head_dim)
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"

        def param(name, shape, p=p):
            return g.parameter(f"{p}.{name}", shape, init="normal")

        ln1 = param("input_layernorm.weight", (c.hidden_size,))
        wq = param("self_attn.q_proj.weight", (hq * d, c.hidden_size))
        wk = param("self_attn.k_proj.weight", (hkv * d, c.hidden_size))
        wv = param("self_attn.v_proj.weight", (hkv * d, c.hidden_size))
        wo = param("self_attn.o_proj.weight", (c.hidden_size, hq * d))
        ln2 = param("post_attention_layernorm.weight", (c.hidden_size,))
        wg = param("mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size))
        wu = param("mlp.up_proj.weight", (c.intermediate_size, c.hidden_size))
        wd = param("mlp.down_proj.weight", (c.hidden_size, c.intermediate_size))

        h = rms_norm(x, ln1, c.rms_norm_eps)
        q = linear(g, h, wq).reshape(batch, tokens, hq, d).permute(0, 2, 1, 3)
        k = linear(g, h, wk).reshape(batch, tokens, hkv, d).permute(0, 2, 1, 3)
        v = linear(g, h, wv).reshape(batch, tokens, hkv, d).permute(0, 2, 1, 3)
        if rope:
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, hq // hkv), repeat_kv(v, hq // hkv)
        scores = (q @ k.transpose(2, 3)) * scale + mask
        attn = softmax(scores) @ v
        attn = attn.permute(0, 2, 1, 3).reshape(batch, tokens, hq * d)
        x = x + linear(g, attn, wo)
        h = rms_norm(x, ln2, c.rms_norm_eps)
        gate = linear(g, h, wg)
        x = x + linear(g, (gate * gate.sigmoid()) * linear(g, h, wu), wd)
    norm = g.parameter("model.norm.weight", (c.hidden_size,), init="normal")
    logits = g.output("logits", linear(g, rms_norm(x, norm, c.rms_norm_eps), embed))
    if not train:
        return g, None
    labels = g.input("labels", (batch, tokens), "i32")
    if has_ops("gather"):
        picked = g.apply("gather", [log_softmax(logits), labels.reshape(batch, tokens, 1)], axis=-1)
        loss = -(picked.mean())
    else:
        from meganeura import functional as F

        loss = F.cross_entropy(logits, labels)
    return g, loss


def fused_llama(c: Config, batch: int, tokens: int, train: bool = True):
    """The same model written with the library's fused ops, as models/smollm2.py writes it:
    rms_norm, rope, attention, swiglu, embedding and cross-entropy."""
    from meganeura import functional as F
    from meganeura.ops.attention import attention
    from meganeura.ops.norm import rms_norm as fused_rms_norm
    from meganeura.ops.rope import rope

    g = Graph()
    ids = g.input("input_ids", (batch, tokens), "i32")
    embed = g.parameter("model.embed_tokens.weight", (c.vocab_size, c.hidden_size), init="normal")
    x = F.embedding(embed, ids)
    positions = g.constant(np.arange(tokens, dtype=np.int32))
    hq, hkv, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim

    def linear(h, w):
        return g.apply("matmul", [h, w], trans_b=True)

    def heads(t, count):
        return t.reshape(batch, tokens, count, d).permute(0, 2, 1, 3)

    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"

        def param(name, shape, p=p):
            return g.parameter(f"{p}.{name}", shape, init="normal")

        ln1 = param("input_layernorm.weight", (c.hidden_size,))
        wq = param("self_attn.q_proj.weight", (hq * d, c.hidden_size))
        wk = param("self_attn.k_proj.weight", (hkv * d, c.hidden_size))
        wv = param("self_attn.v_proj.weight", (hkv * d, c.hidden_size))
        wo = param("self_attn.o_proj.weight", (c.hidden_size, hq * d))
        ln2 = param("post_attention_layernorm.weight", (c.hidden_size,))
        wg = param("mlp.gate_proj.weight", (c.intermediate_size, c.hidden_size))
        wu = param("mlp.up_proj.weight", (c.intermediate_size, c.hidden_size))
        wd = param("mlp.down_proj.weight", (c.hidden_size, c.intermediate_size))

        h = fused_rms_norm(x, ln1, c.rms_norm_eps)
        q = rope(heads(linear(h, wq), hq), positions, c.rope_theta)
        k = rope(heads(linear(h, wk), hkv), positions, c.rope_theta)
        v = heads(linear(h, wv), hkv)
        attn = attention(q, k, v, scale=1.0 / math.sqrt(d), causal=True)
        attn = attn.permute(0, 2, 1, 3).reshape(batch, tokens, hq * d)
        x = x + linear(attn, wo)
        h = fused_rms_norm(x, ln2, c.rms_norm_eps)
        x = x + linear(F.swiglu(linear(h, wg), linear(h, wu)), wd)
    norm = g.parameter("model.norm.weight", (c.hidden_size,), init="normal")
    logits = g.output("logits", linear(fused_rms_norm(x, norm, c.rms_norm_eps), embed))
    if not train:
        return g, None
    labels = g.input("labels", (batch, tokens), "i32")
    return g, F.cross_entropy(logits, labels)
