"""SmolLM2 and the Llama architecture it uses, as meganeura graphs.

Reads top to bottom, like nanoGPT: the config, the projections (optionally quantized, optionally
with LoRA adapters), attention, MLP, the decoder layer, the model, and the graphs built from it.
Parameters carry the Hugging Face names (model.layers.0.self_attn.q_proj.weight, ...) and
layouts (Linear weights [out, in], read transposed by the matmul, never copied), so checkpoints
load by name.

One forward (`Llama.forward`) serves every use: training (causal attention over the sequence)
and inference against a KV cache, where a chunk of T new tokens per sequence is written into
the cache at a run-time position (`write_rows`, planned in place) and attends over the whole
cache through an additive mask (built on the device from the slots the host marks valid
and the chunk's position). Prefill is a chunk of the prompt; decode is a
chunk of one token.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from meganeura import functional as F
from meganeura import init
from meganeura.graph import Graph, Tensor
from meganeura.io.gguf import QuantizedWeight
from meganeura.ops.attention import attention
from meganeura.ops.quant import QuantizedTensor, quantized_matmul, quantized_parameter

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
WEIGHT_DTYPES = ("f32", "f16")  # storage of the weight matrices on the device
F16_MAX = 65504.0
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnsupportedModelError(ValueError):
    """A model configuration this implementation does not cover."""


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], source: str = "config.json") -> LlamaConfig:
        """From a Hugging Face config.json dict; raises for what this model does not implement."""
        archs = config.get("architectures") or []
        if config.get("model_type") != "llama" or any(
            a not in SUPPORTED_ARCHITECTURES for a in archs
        ):
            raise UnsupportedModelError(
                f"{source}: model_type {config.get('model_type')!r} (architectures {archs}) is "
                "not supported; supported: model_type 'llama' "
                f"({', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise UnsupportedModelError(
                f"{source}: RoPE scaling {rope} is not supported; supported: plain RoPE"
            )
        for key, ok in (
            ("hidden_act", "silu"),
            ("attention_bias", False),
            ("mlp_bias", False),
            ("pretraining_tp", 1),
        ):
            if config.get(key, ok) != ok:
                raise UnsupportedModelError(
                    f"{source}: {key}={config[key]!r} is not supported; supported: {ok!r}"
                )
        heads = config["num_attention_heads"]
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        values.setdefault("head_dim", config["hidden_size"] // heads)
        values.setdefault("num_key_value_heads", heads)
        values["rope_theta"] = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        values.setdefault("tie_word_embeddings", False)
        return cls(**values)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json that transformers reads back as this model."""
        out = asdict(self)
        out.update(
            architectures=list(SUPPORTED_ARCHITECTURES),
            model_type="llama",
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        return out

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


SMOLLM2_135M = LlamaConfig()


@dataclass
class LoraConfig:
    """Low-rank adapters: W x + (alpha / rank) B A x on the chosen projections, A and B
    trained, W frozen (PEFT's LoRA, with PEFT's names and initialization)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    layers: Sequence[int] | None = None  # None: every layer

    def __post_init__(self):
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or self.rank <= 0:
            raise ValueError(
                f"LoraConfig: targets must be among {', '.join(PROJECTIONS)} and rank > 0; "
                f"got targets {list(self.targets)}, rank {self.rank}"
            )

    def applies_to(self, layer: int, projection: str) -> bool:
        return projection in self.targets and (self.layers is None or layer in self.layers)


def projection_name(layer: int, projection: str) -> str:
    group = "mlp" if projection in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"model.layers.{layer}.{group}.{projection}.weight"


def parameter_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the model, by Hugging Face name, with its shape."""
    c = config
    d, q = c.hidden_size, c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, d)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (d,)
        for proj, shape in (
            ("q_proj", (q, d)),
            ("k_proj", (kv, d)),
            ("v_proj", (kv, d)),
            ("o_proj", (d, q)),
            ("gate_proj", (c.intermediate_size, d)),
            ("up_proj", (c.intermediate_size, d)),
            ("down_proj", (d, c.intermediate_size)),
        ):
            shapes[projection_name(i, proj)] = shape
        shapes[f"{p}.post_attention_layernorm.weight"] = (d,)
    shapes["model.norm.weight"] = (d,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


Weights = Mapping[str, "np.ndarray | QuantizedWeight"]


def check_f16_range(value: np.ndarray, name: str) -> None:
    """An error naming the weight if its values do not fit f16's range."""
    peak = float(np.max(np.abs(value))) if value.size else 0.0
    if not np.isfinite(peak) or peak > F16_MAX:
        raise ValueError(
            f"{name}: values up to {peak:.6g} do not fit f16 (largest {F16_MAX:g}); "
            "keep this model's weights in f32"
        )


def to_f16(value: np.ndarray, name: str) -> np.ndarray:
    """`value` rounded to f16, or an error naming the weight if it does not fit f16's range."""
    check_f16_range(value, name)
    return value.astype(np.float16)


@dataclass
class Llama:
    """The parameters of a Llama model in `graph`, and the forward pass over them.

    `weights` gives initial values by Hugging Face name (missing ones are initialized as
    transformers initializes them); a QuantizedWeight stays quantized on the device when
    `keep_quantized` is set and is dequantized otherwise. With `weight_dtype="f16"` the
    matrices (projections, embeddings, lm_head) are stored as f16 on the device, half the
    bytes, and widened to f32 as the products load them (norm weights and activations stay
    f32); inference only. With `lora`, base weights are frozen and only the adapters train.
    """

    graph: Graph
    config: LlamaConfig
    weights: Weights = field(default_factory=dict)
    trainable: bool = True
    lora: LoraConfig | None = None
    keep_quantized: bool = False
    weight_dtype: str = "f32"

    def __post_init__(self):
        c = self.config
        if self.weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"Llama: weight_dtype must be one of {WEIGHT_DTYPES}, got {self.weight_dtype!r}"
            )
        if self.weight_dtype != "f32" and self.trainable:
            raise ValueError(
                f"Llama: {self.weight_dtype} weights are for inference; training keeps f32 "
                "weights (build with trainable=False, or weight_dtype='f32')"
            )
        unknown = sorted(set(self.weights) - set(parameter_shapes(self.config)))
        if unknown:
            raise ValueError(
                f"Llama: unexpected weight {unknown[0]!r} for this configuration "
                f"({c.num_hidden_layers} layers, tie_word_embeddings={c.tie_word_embeddings})"
            )
        std = init.normal(0.0, c.initializer_range)
        self.params: dict[str, Tensor | QuantizedTensor] = {}
        for name, shape in parameter_shapes(self.config).items():
            self.params[name] = self._parameter(name, shape, std)
        self.adapters: dict[str, tuple[Tensor, Tensor]] = {}
        if self.lora is not None:
            for i in range(c.num_hidden_layers):
                for proj in PROJECTIONS:
                    if self.lora.applies_to(i, proj):
                        self._add_adapter(projection_name(i, proj))

    # -- parameters --------------------------------------------------------------------------
    def _parameter(self, name: str, shape: tuple[int, ...], std) -> Tensor:
        value = self.weights.get(name)
        trainable = self.trainable and self.lora is None
        if isinstance(value, QuantizedWeight):
            if tuple(value.shape) != shape:
                raise ValueError(f"Llama: {name} is {list(value.shape)}, expected {list(shape)}")
            if self.keep_quantized:
                return quantized_parameter(self.graph, name, value)
            value = value.dequantize()
        if value is None:
            value = np.ones(shape, np.float32) if name.endswith("norm.weight") else std
        elif tuple(value.shape) != shape:
            raise ValueError(f"Llama: {name} is {list(value.shape)}, expected {list(shape)}")
        if self.weight_dtype == "f16" and len(shape) == 2:
            if isinstance(value, np.ndarray):  # (an initializer draws in the parameter's dtype)
                value = to_f16(value, name)
            return self.graph.parameter(name, shape, init=value, trainable=False, dtype="f16")
        return self.graph.parameter(name, shape, init=value, trainable=trainable)

    def _add_adapter(self, weight_name: str) -> None:
        out_features, in_features = parameter_shapes(self.config)[weight_name]
        module = weight_name.removesuffix(".weight")
        r = self.lora.rank
        a = self.graph.parameter(
            f"{module}.lora_A.weight", (r, in_features), init=init.linear_weight()
        )
        b = self.graph.parameter(f"{module}.lora_B.weight", (out_features, r), init="zeros")
        self.adapters[weight_name] = (a, b)

    # -- blocks ------------------------------------------------------------------------------
    def linear(self, x: Tensor, name: str) -> Tensor:
        """x @ W.T for the [out, in] weight `name` (read transposed in place), plus its LoRA
        adapter if it has one."""
        w = self.params[name]
        if isinstance(w, QuantizedTensor):
            y = quantized_matmul(x, w)
        else:
            y = self.graph.apply("matmul", [x, w], trans_b=True)
        if name in self.adapters:
            a, b = self.adapters[name]
            down = self.graph.apply("matmul", [x, a], trans_b=True)
            up = self.graph.apply("matmul", [down, b], trans_b=True)
            y = y + up * (self.lora.alpha / self.lora.rank)
        return y

    def rms_norm(self, x: Tensor, name: str) -> Tensor:
        return F.rms_norm(x, self.params[name], eps=self.config.rms_norm_eps)

    def attention(
        self,
        i: int,
        x: Tensor,
        positions: Tensor,
        mask: Tensor | None,
        cache: KVCache | None,
        last_only: bool = False,
    ) -> Tensor:
        """Self-attention of layer `i` over the normalized rows `x` [B, T, hidden]. With
        `last_only` (a chunk against a cache, `mask` given), keys and values (and the cache
        write) still cover every row, but only the last row attends: the output is
        [B, 1, hidden]. Its query is still projected with the others' (one product with the
        keys and values), then sliced."""
        c = self.config
        batch, tokens, _ = x.shape
        q_proj = self.linear(x, projection_name(i, "q_proj"))
        rows, positions_q, mask_q = tokens, positions, mask
        if last_only:
            if mask is None:
                raise ValueError("Llama.attention: last_only needs the mask of a cached chunk")
            rows, q_proj = 1, q_proj[:, -1:, :]
            positions_q, mask_q = positions[..., -1:], mask[:, :, -1:, :]

        def heads(t: Tensor, count: int, n: int) -> Tensor:  # [B, n, H*D] -> [B, H, n, D]
            return t.reshape(batch, n, count, c.head_dim).permute(0, 2, 1, 3)

        q = F.rope(heads(q_proj, c.num_attention_heads, rows), positions_q, c.rope_theta)
        k_proj = self.linear(x, projection_name(i, "k_proj"))
        k = F.rope(heads(k_proj, c.num_key_value_heads, tokens), positions, c.rope_theta)
        v = heads(self.linear(x, projection_name(i, "v_proj")), c.num_key_value_heads, tokens)
        if cache is not None:
            k, v = cache.write(i, k, v)
        out = attention(q, k, v, mask_q, scale=1.0 / math.sqrt(c.head_dim), causal=mask is None)
        out = out.permute(0, 2, 1, 3).reshape(batch, rows, c.num_attention_heads * c.head_dim)
        return self.linear(out, projection_name(i, "o_proj"))

    def mlp(self, i: int, x: Tensor) -> Tensor:
        gate = self.linear(x, projection_name(i, "gate_proj"))
        up = self.linear(x, projection_name(i, "up_proj"))
        return self.linear(F.swiglu(gate, up), projection_name(i, "down_proj"))

    def layer(self, i, x, positions, mask, cache, last_only: bool = False) -> Tensor:
        """Decoder layer `i` over hidden states x [B, T, hidden]. With `last_only`, only the
        last row comes out ([B, 1, hidden]): keys and values are still computed (and cached)
        for every row, and the rest (the query, the attention, o, the MLP) for the last one."""
        p = f"model.layers.{i}"
        h = self.rms_norm(x, f"{p}.input_layernorm.weight")
        attended = self.attention(i, h, positions, mask, cache, last_only)
        x = (x[:, -1:, :] if last_only else x) + attended
        return x + self.mlp(i, self.rms_norm(x, f"{p}.post_attention_layernorm.weight"))

    # -- the model ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        mask: Tensor | None = None,
        cache: KVCache | None = None,
    ) -> Tensor:
        """Final hidden states [B, T, hidden] of tokens `input_ids` [B, T] at RoPE `positions`
        ([B, T] or [T]). Without a mask, attention is causal over the T tokens; with `cache`,
        the tokens are written into it and `mask` (additive, [B, 1, T, capacity]) says which
        cache rows each token sees."""
        x = self.embed(input_ids)
        for i in range(self.config.num_hidden_layers):
            x = self.layer(i, x, positions, mask, cache)
        return self.final_norm(x)

    def embed(self, input_ids: Tensor) -> Tensor:
        """The token embeddings [B, T, hidden] (f32) of `input_ids` [B, T]."""
        table = self.params["model.embed_tokens.weight"]
        if isinstance(table, QuantizedTensor):
            table = table.dequantize()  # inlined: only the gathered rows are decoded
        x = F.embedding(table, input_ids)
        return x.astype("f32") if x.dtype != "f32" else x

    def final_norm(self, x: Tensor) -> Tensor:
        return self.rms_norm(x, "model.norm.weight")

    def logits(self, hidden: Tensor) -> Tensor:
        head = "model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"
        return self.linear(hidden, head)


class KVCache:
    """Keys and values of every layer: per layer one [2, B, kv heads, capacity, head_dim] state
    parameter (keys, then values), written at the run-time slot `position` (one i32) by
    whichever chunk computation runs. Keys and values side by side are written by one kernel."""

    def __init__(self, graph: Graph, config: LlamaConfig, batch: int, capacity: int):
        self.graph = graph
        self.batch, self.capacity = batch, capacity
        shape = (2, batch, config.num_key_value_heads, capacity, config.head_dim)
        self.position = graph.input("cache_position", (1,), "i32")
        # Per sequence and slot, 0 where the slot holds a real token and -inf where it holds
        # padding or nothing yet: added to every chunk's causal mask, which the device builds.
        self.valid = graph.input("cache_valid", (batch, 1, 1, capacity))
        self.layers = [
            graph.parameter(f"cache.{i}", shape, state=True)
            for i in range(config.num_hidden_layers)
        ]

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values of `layer` with k and v [B, kv heads, T, D] written at
        `position`."""
        cache = self.layers[layer]
        written = self.graph.apply("write_rows", [cache, F.stack([k, v]), self.position], axis=3)
        self.graph.write_back(cache, written)
        return written[0], written[1]


def chunk_outputs(model: Llama, cache: KVCache, tokens: int) -> tuple[str, str, str]:
    """Add the computation of a chunk of `tokens` tokens per sequence against `cache`: inputs
    `ids.T` and `positions.T` (with the cache's `cache_position` and `cache_valid`); outputs
    `logits.T` (every position), `next_logits.T` (the last one, all that sampling needs) and
    `next_token.T` (its argmax, the greedy choice, made on the device). Returns the output
    names.

    Token i of the chunk (in slot cache_position + i) sees the valid slots up to its own:
    the mask [B, 1, T, capacity] is computed on the device, once for every layer, from
    those two inputs rather than sent by the host (a 128-token chunk's is 256 KiB)."""
    g = model.graph
    b = cache.batch
    ids = g.input(f"ids.{tokens}", (b, tokens), "i32")
    positions = g.input(f"positions.{tokens}", (b, tokens), "i32")
    slots = g.constant(np.arange(cache.capacity, dtype=np.int32))
    rows = g.constant(np.arange(tokens, dtype=np.int32).reshape(tokens, 1))
    causal = F.where(slots <= rows + cache.position, 0.0, -np.inf)  # [T, capacity]
    mask = causal + cache.valid
    x = model.embed(ids)
    layers = model.config.num_hidden_layers
    for i in range(layers - 1):
        x = model.layer(i, x, positions, mask, cache)
    hidden = model.final_norm(model.layer(layers - 1, x, positions, mask, cache))
    g.output(f"logits.{tokens}", model.logits(hidden))
    # Sampling needs the last position only, and so does everything in the last layer after
    # its keys and values: that layer is built a second time for the last row alone (its
    # key and value computation and cache write are the same nodes twice, merged by the
    # optimizer), so a prompt's last layer runs its query, attention, o and MLP on one row.
    if tokens > 1:
        last_row = model.layer(layers - 1, x, positions, mask, cache, last_only=True)
        last_hidden = model.final_norm(last_row)[:, -1, :]
    else:
        last_hidden = hidden[:, -1, :]
    last = g.output(f"next_logits.{tokens}", model.logits(last_hidden))
    g.output(f"next_token.{tokens}", F.argmax(last, -1))
    return f"logits.{tokens}", f"next_logits.{tokens}", f"next_token.{tokens}"


def training_loss(model: Llama, batch: int, tokens: int) -> Tensor:
    """Mean next-token cross-entropy of inputs `input_ids` [B, T] against `labels` [B, T]
    (already shifted: labels[:, t] is the token after input_ids[:, t]; -100 is ignored)."""
    g = model.graph
    ids = g.input("input_ids", (batch, tokens), "i32")
    labels = g.input("labels", (batch, tokens), "i32")
    positions = g.constant(np.arange(tokens, dtype=np.int32))
    logits = g.output("logits", model.logits(model.forward(ids, positions)))
    return g.output("loss", F.cross_entropy(logits, labels, ignore_index=-100))
