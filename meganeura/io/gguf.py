"""GGUF files (llama.cpp's format): metadata, a Hugging Face style config, and the weights
under Hugging Face names.

Parsing is the `gguf` package's GGUFReader. Weights in F32, F16 and BF16 load as f32 arrays;
Q8_0, Q4_0 and Q4_1 weights are kept as the blocks the file stores (`QuantizedWeight`), so a
device can run on them without widening; any other type gguf can dequantize is dequantized to
f32 on load. llama.cpp stores the rows of Llama's Q and K projections interleaved for its own
RoPE layout; they are put back in Hugging Face's order here (rows are whole blocks, so this
works on quantized weights too), exactly as transformers' GGUF loader does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meganeura.io.safetensors import WeightFileError

# Quantized types kept as blocks: (elements per block, bytes per block).
QUANT_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20)}
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name patterns of the Llama architecture -> Hugging Face names.
_LLAMA_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


@dataclass
class QuantizedWeight:
    """A weight as GGUF stores it: each of its rows a run of quantization blocks.

    `blocks` is uint8 [rows, bytes per row]; `shape` is the logical [rows, columns].
    """

    qtype: str
    shape: tuple[int, int]
    blocks: np.ndarray

    def dequantize(self) -> np.ndarray:
        from gguf import GGMLQuantizationType, dequantize

        values = dequantize(self.blocks, GGMLQuantizationType[self.qtype])
        return np.ascontiguousarray(values.reshape(self.shape), dtype=np.float32)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes


@dataclass
class GGUFCheckpoint:
    path: Path
    metadata: dict[str, Any]
    config: dict[str, Any]  # Hugging Face config.json keys
    weights: dict[str, np.ndarray | QuantizedWeight]  # Hugging Face names


def read_metadata(reader, path: Path) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception as error:
            raise WeightFileError(f"{path}: corrupt GGUF metadata field {key!r}: {error}") from None
    return out


def open_reader(path: str | Path):
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such GGUF file")
    try:
        return GGUFReader(path)
    except Exception as error:
        raise WeightFileError(f"{path}: not a readable GGUF file ({error})") from None


def llama_config(metadata: dict[str, Any], path: Path, tensor_names: set[str]) -> dict[str, Any]:
    """The Hugging Face config.json of the Llama model a GGUF holds."""

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise WeightFileError(f"{path}: GGUF metadata lacks llama.{key}")
        return value

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = metadata.get("llama.vocab_size", len(tokens) if tokens is not None else None)
    if vocab is None:
        raise WeightFileError(f"{path}: GGUF metadata gives no vocabulary size")
    if "llama.rope.scaling.type" in metadata or "rope_freqs.weight" in tensor_names:
        raise WeightFileError(
            f"{path}: RoPE scaling ({metadata.get('llama.rope.scaling.type', 'rope_freqs')}) is "
            "not supported; supported: Llama with plain RoPE (SmolLM2, Llama 2 style)"
        )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("rope.dimension_count", hidden // heads)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for name, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{key}" in metadata:
            config[name] = int(metadata[f"tokenizer.ggml.{key}"])
    if "tokenizer.ggml.padding_token_id" in metadata:
        config["pad_token_id"] = int(metadata["tokenizer.ggml.padding_token_id"])
    return config


def hf_name(gguf_name: str, path: Path) -> str:
    for pattern, replacement in _LLAMA_NAMES:
        if re.fullmatch(pattern, gguf_name):
            return re.sub(pattern, replacement, gguf_name)
    raise WeightFileError(
        f"{path}: unexpected tensor {gguf_name!r} for the llama architecture; expected "
        "token_embd, output_norm, output and blk.N.{attn_norm, attn_q, attn_k, attn_v, "
        "attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}"
    )


def unpermute_rope_rows(w, heads: int):
    """Undo llama.cpp's reordering of Q/K rows (pairs interleaved per head) back to Hugging
    Face's halves. Works on any array whose first axis is the rows (values or blocks)."""
    rows = w.shape[0]
    half = rows // heads // 2
    return np.ascontiguousarray(
        w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def load_tensor(tensor, path: Path) -> np.ndarray | QuantizedWeight:
    """One GGUF tensor as f32 values, or its blocks when it is a kept quantized type."""
    from gguf import dequantize

    qtype = tensor.tensor_type.name
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims inner first
    if qtype in QUANT_BLOCKS:
        elements, nbytes = QUANT_BLOCKS[qtype]
        if len(shape) != 2 or shape[1] % elements:
            raise WeightFileError(
                f"{path}: tensor {tensor.name!r} is {qtype} with shape {list(shape)}; rows must "
                f"be whole {elements}-element blocks"
            )
        blocks = np.asarray(tensor.data, np.uint8).reshape(shape[0], shape[1] // elements * nbytes)
        return QuantizedWeight(qtype, (shape[0], shape[1]), blocks)
    if qtype in ("F32", "F64"):
        return np.asarray(tensor.data, np.float32).reshape(shape)
    if qtype == "F16":
        return np.asarray(tensor.data).view(np.float16).astype(np.float32).reshape(shape)
    try:
        values = dequantize(np.asarray(tensor.data), tensor.tensor_type)
    except NotImplementedError:
        values = None
    if values is None or qtype.startswith("I"):
        raise WeightFileError(
            f"{path}: tensor {tensor.name!r} has GGUF type {qtype}, which cannot be loaded; "
            f"supported: {', '.join((*FLOAT_TYPES, *QUANT_BLOCKS))} kept as they are, and the "
            "other quantizations the gguf package can dequantize (K-quants, IQ, Q5_0, Q5_1, ...)"
        )
    return np.ascontiguousarray(values, np.float32).reshape(shape)


def load_gguf(path: str | Path) -> GGUFCheckpoint:
    """Metadata, config and weights (Hugging Face names) of a Llama GGUF file."""
    path = Path(path)
    reader = open_reader(path)
    metadata = read_metadata(reader, path)
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WeightFileError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    names = {t.name for t in reader.tensors}
    config = llama_config(metadata, path, names)
    weights: dict[str, np.ndarray | QuantizedWeight] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, path)
        try:
            value = load_tensor(tensor, path)
        except WeightFileError:
            raise
        except Exception as error:
            raise WeightFileError(f"{path}: corrupt tensor {tensor.name!r}: {error}") from None
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            if isinstance(value, QuantizedWeight):
                value = QuantizedWeight(
                    value.qtype, value.shape, unpermute_rope_rows(value.blocks, heads)
                )
            else:
                value = unpermute_rope_rows(value, heads)
        weights[name] = value
    return GGUFCheckpoint(path, metadata, config, weights)
