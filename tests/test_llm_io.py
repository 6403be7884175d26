"""Loading language models: safetensors (sharded, bf16), GGUF (quantized, permuted Q/K),
tokenizers and chat templates, against transformers; and errors for bad input."""

import json
import os

import gguf
import numpy as np
import pytest
import torch

from meganeura.generation import ContextLengthError, LanguageModel
from meganeura.io.gguf import QuantizedWeight, load_gguf
from meganeura.io.safetensors import (
    WeightFileError,
    load_checkpoint,
    load_safetensors,
    save_safetensors,
)
from meganeura.io.tokenizer import Tokenizer, TokenizerError
from meganeura.models.smollm2 import LlamaConfig, UnsupportedModelError
from meganeura.pretrained import load_pretrained
from tests.llm_models import (
    load_transformers,
    random_llama,
    save_hf,
    smollm2_gguf,
    write_gguf,
)

TEXTS = [
    "Hello world",
    " the cat in a hat\n\n",
    "What is 12345 + 678?",
    "Ünïcödé 日本語 🤖",
    "<|im_start|>user\nhi<|im_end|>",
    "a\tb\r\nc   d",
    "don't I'll we're",
    "",
]


def dense(value):
    return value.dequantize() if isinstance(value, QuantizedWeight) else value


# -- safetensors ------------------------------------------------------------------------------


def test_safetensors_round_trip_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    tensors = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b": np.ones(4, np.float16),
        "c": np.array([1, 2], np.int32),
    }
    save_safetensors(path, tensors)
    got = load_safetensors(path)
    np.testing.assert_array_equal(got["a"], tensors["a"])
    assert got["b"].dtype == np.float32 and np.all(got["b"] == 1)
    np.testing.assert_array_equal(got["c"], tensors["c"])
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match=r"disk full"):
        save_safetensors(path, {"a": np.zeros(3, np.float32)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shard", [None, 20_000])
def test_checkpoints_load_like_transformers(tmp_path, dtype, shard):
    model = random_llama(tie_word_embeddings=False)
    save_hf(model, tmp_path, shard_bytes=shard, dtype=dtype)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    weights = load_checkpoint(tmp_path)
    reference = load_transformers(tmp_path).state_dict()
    assert set(weights) == set(reference)
    for name, value in weights.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, reference[name].numpy(), err_msg=name)


# -- GGUF -------------------------------------------------------------------------------------

QTYPES = {"q_proj": "Q4_1", "k_proj": "Q4_0", "embed": "Q8_0", "up_proj": "F16", "down": "Q5_0"}


def test_gguf_weights_match_transformers(tmp_path):
    model = random_llama(num_key_value_heads=1)
    path = write_gguf(model, tmp_path / "tiny.gguf", QTYPES, default="Q8_0")
    checkpoint = load_gguf(path)
    kinds = {name: getattr(v, "qtype", "f32") for name, v in checkpoint.weights.items()}
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "Q4_1"
    assert kinds["model.layers.1.self_attn.k_proj.weight"] == "Q4_0"
    assert kinds["model.embed_tokens.weight"] == "Q8_0"
    assert kinds["model.layers.0.mlp.down_proj.weight"] == "f32"  # Q5_0, dequantized on load
    reference = load_transformers(path).state_dict()
    assert set(checkpoint.weights) | {"lm_head.weight"} == set(reference)
    for name, value in checkpoint.weights.items():
        np.testing.assert_array_equal(dense(value), reference[name].numpy(), err_msg=name)
    assert checkpoint.config["tie_word_embeddings"] is True
    assert checkpoint.config["num_key_value_heads"] == 1


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers():
    checkpoint = load_gguf(smollm2_gguf())
    config = LlamaConfig.from_hf_config(checkpoint.config)
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads)
    assert shape == (576, 30, 9)
    assert (config.num_key_value_heads, config.head_dim, config.intermediate_size) == (3, 64, 1536)
    assert (config.vocab_size, config.rope_theta, config.tie_word_embeddings) == (49152, 1e5, True)
    reference = load_transformers(smollm2_gguf()).state_dict()
    for name, value in checkpoint.weights.items():
        np.testing.assert_array_equal(dense(value), reference[name].numpy(), err_msg=name)


# -- tokenizers -------------------------------------------------------------------------------


def test_smollm2_tokenizer_matches_transformers():
    from transformers import AutoTokenizer

    path = smollm2_gguf()
    reader = gguf.GGUFReader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}
    ours = Tokenizer.from_gguf_metadata(metadata)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
    ]
    for messages in (conversation, conversation[1:2]):
        expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages) == expected
        assert ours.encode_chat(messages) == ref.encode(expected, add_special_tokens=False)
    assert ours.eos_token_ids == {2}
    assert ours.special_tokens["eos_token"] == "<|im_end|>"


def test_tokenizer_files_and_gguf_vocabulary_agree(tmp_path):
    from transformers import AutoTokenizer

    model = random_llama()
    path = write_gguf(model, tmp_path / "tiny.gguf")
    checkpoint = load_gguf(path)
    from_gguf = Tokenizer.from_gguf_metadata(checkpoint.metadata)
    directory = save_hf(model, tmp_path / "hf")
    from_files = Tokenizer.from_directory(directory)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert from_gguf.encode(text) == ref.encode(text) == from_files.encode(text), text
    messages = [{"role": "user", "content": "the hat"}]
    assert from_files.encode_chat(messages) == from_gguf.encode_chat(messages)
    assert from_files.eos_token_ids == from_gguf.eos_token_ids == {2}


# -- bad input --------------------------------------------------------------------------------


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere.gguf: no such model"):
        load_pretrained(tmp_path / "nowhere.gguf", device="cpu")
    with pytest.raises(WeightFileError, match=r"no config.json"):
        load_pretrained(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps(random_llama().config.to_dict()))
    with pytest.raises(WeightFileError, match=r"no weights found; expected model.safetensors"):
        load_pretrained(tmp_path, device="cpu")


def test_corrupt_safetensors_are_named(tmp_path):
    directory = save_hf(random_llama(), tmp_path)
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match=r"model.safetensors: truncated safetensors file"):
        load_pretrained(directory, device="cpu")
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightFileError, match=r"corrupt safetensors header"):
        load_pretrained(directory, device="cpu")
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(WeightFileError, match=r"header length .* does not fit"):
        load_pretrained(directory, device="cpu")


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    directory = save_hf(random_llama(), tmp_path)
    weights = load_safetensors(directory / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_safetensors(directory / "model.safetensors", weights)
    with pytest.raises(WeightFileError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
        load_pretrained(directory, device="cpu")
    weights["model.layers.1.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
    save_safetensors(directory / "model.safetensors", weights)
    with pytest.raises(WeightFileError, match=r"up_proj.weight' has shape \[3, 3\]"):
        load_pretrained(directory, device="cpu")


def test_corrupt_gguf_is_named(tmp_path):
    path = write_gguf(random_llama(), tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 5000])
    with pytest.raises(WeightFileError, match=r"tiny.gguf: not a readable GGUF file"):
        load_pretrained(path, device="cpu")
    path.write_bytes(b"NOPE" + data[4:])
    with pytest.raises(WeightFileError, match=r"not a readable GGUF file.*magic"):
        load_pretrained(path, device="cpu")


def test_unsupported_gguf_tensor_type_is_named(tmp_path):
    model = random_llama()
    path = tmp_path / "int.gguf"
    write_gguf(model, path)
    # Rewrite one weight as I8, a type no weight can have.
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(tmp_path / "bad.gguf", "llama")
    for key, field in reader.fields.items():
        if key.startswith(("llama.", "tokenizer.")):
            value = field.contents()
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name == "blk.0.ffn_up.weight":
            data = data.astype(np.int8)
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(WeightFileError, match=r"'blk.0.ffn_up.weight' has GGUF type I8.*Q4_1"):
        load_pretrained(tmp_path / "bad.gguf", device="cpu")


def test_unsupported_architectures_are_named(tmp_path):
    config = random_llama().config.to_dict()
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2'.*supported: model_type"):
        LlamaConfig.from_hf_config({**config, "model_type": "gpt2"}, "x/config.json")
    scaled = {**config, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}
    with pytest.raises(UnsupportedModelError, match=r"RoPE scaling"):
        LlamaConfig.from_hf_config(scaled)
    with pytest.raises(UnsupportedModelError, match=r"attention_bias=True"):
        LlamaConfig.from_hf_config({**config, "attention_bias": True})
    directory = save_hf(random_llama(), tmp_path)
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(UnsupportedModelError, match=r"config.json: model_type 'mistral'"):
        load_pretrained(directory, device="cpu")
    metadata = {"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(TokenizerError, match=r"tokenizer.ggml.model='bert'; supported: gpt2"):
        Tokenizer.from_gguf_metadata(metadata, "f.gguf")


def test_prompt_longer_than_the_context_is_refused(tmp_path):
    directory = save_hf(random_llama(max_position_embeddings=16), tmp_path)
    model = load_pretrained(directory, device="cpu")
    assert isinstance(model, LanguageModel)
    with pytest.raises(ContextLengthError, match=r"20 tokens; the model's context is 16"):
        model.generate_ids([list(range(3, 23))], 4)
    with pytest.raises(ContextLengthError, match=r"context is 16"):
        model.logits(list(range(3, 23)))
    with pytest.raises(ValueError, match=r"token id 9999 is out of range"):
        model.logits([9999])
