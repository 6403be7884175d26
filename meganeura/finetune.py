"""Fine-tuning language models: full or LoRA, next-token cross-entropy, HF-style saving.

The training graph is the model's forward with causal attention over each sequence, its
logits, and the mean cross-entropy against labels shifted on the host (labels[t] is the token
after input t; -100 masks a position out, such as padding or a prompt that should not be
learned). Quantized GGUF weights are widened to f32 master weights. With LoRA only the adapters
train; saving merges them into the weights, so the result is a plain Llama checkpoint that
`load_pretrained` and transformers both read.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meganeura.graph import Graph
from meganeura.io.gguf import QuantizedWeight
from meganeura.io.safetensors import atomic_write, save_safetensors
from meganeura.models.smollm2 import Llama, LoraConfig, training_loss

IGNORE_INDEX = -100


def next_token_batch(
    sequences: Sequence[Sequence[int]], tokens: int, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, labels), each [len(sequences), tokens]: inputs are a sequence's first
    `tokens` ids, labels the ids that follow them; padding is ignored by the loss."""
    ids = np.full((len(sequences), tokens), pad_id, np.int32)
    labels = np.full((len(sequences), tokens), IGNORE_INDEX, np.int32)
    for b, seq in enumerate(sequences):
        seq = list(seq)[: tokens + 1]
        if len(seq) < 2:
            raise ValueError(f"sequence {b} has {len(seq)} tokens; next-token training needs 2")
        ids[b, : len(seq) - 1] = seq[:-1]
        labels[b, : len(seq) - 1] = seq[1:]
    return ids, labels


class FineTuner:
    """Trains a LanguageModel's weights (or LoRA adapters on some of its projections) on
    batches of `batch` sequences of `tokens` tokens."""

    def __init__(
        self,
        model,
        batch: int,
        tokens: int,
        optimizer: Any = None,
        lora: LoraConfig | None = None,
        device: str | None = None,
        seed: int = 0,
    ):
        from meganeura import optim
        from meganeura.session import build

        self.model = model
        self.lora = lora
        self.batch, self.tokens = batch, tokens
        if tokens > model.context_length:
            raise ValueError(
                f"fine-tuning on {tokens} tokens exceeds the context of {model.context_length}"
            )
        weights = {
            name: value.dequantize() if isinstance(value, QuantizedWeight) else value
            for name, value in model.weights.items()
        }
        graph = Graph()
        self.llama = Llama(graph, model.config, weights, trainable=True, lora=lora)
        self.loss_tensor = training_loss(self.llama, batch, tokens)
        optimizer = optimizer or optim.AdamW(lr=1e-4 if lora is None else 1e-3, weight_decay=0.0)
        self.session = build(graph, self.loss_tensor, optimizer, device or model.device, seed)

    def step(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        """One optimizer step; returns the loss before it."""
        self.session.step({"input_ids": input_ids, "labels": labels})
        return self.session.loss

    def loss(self, input_ids: np.ndarray, labels: np.ndarray) -> float:
        """The loss without training."""
        self.session.run({"input_ids": input_ids, "labels": labels}, outputs=["loss"])
        return self.session.loss

    def fit_texts(self, texts: Iterable[str], steps: int) -> list[float]:
        """Train on texts (cut to `tokens + 1` tokens, cycled in batches); the losses."""
        tokenizer = self.model._need_tokenizer()
        sequences = [tokenizer.encode(t) for t in texts]
        losses = []
        for step in range(steps):
            chunk = [sequences[(step * self.batch + b) % len(sequences)] for b in range(self.batch)]
            ids, labels = next_token_batch(chunk, self.tokens, self._pad_id())
            losses.append(self.step(ids, labels))
        return losses

    def _pad_id(self) -> int:
        pad = self.model.config.pad_token_id
        return 0 if pad is None else int(pad)

    def weights(self) -> dict[str, np.ndarray]:
        """The trained weights by Hugging Face name, LoRA adapters merged in."""
        params = self.session.parameters()
        out = {name: params[name] for name in self.llama.params}
        for name, (a, b) in self.llama.adapters.items():
            delta = params[b.node.name] @ params[a.node.name]
            out[name] = out[name] + np.float32(self.lora.alpha / self.lora.rank) * delta
        return out

    def adapters(self) -> dict[str, np.ndarray]:
        """The LoRA adapters alone (PEFT's names), empty for full fine-tuning."""
        params = self.session.parameters()
        return {
            t.node.name: params[t.node.name] for pair in self.llama.adapters.values() for t in pair
        }

    def apply(self) -> None:
        """Give the model its fine-tuned weights (for generation)."""
        self.model.load_weights(self.weights())

    def save(self, directory: str | Path) -> None:
        """The fine-tuned model as a Hugging Face directory."""
        save_pretrained(self.model, directory, self.weights())


def save_pretrained(model, directory: str | Path, weights: dict | None = None) -> None:
    """config.json, model.safetensors (f32, atomically written) and the tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = dict(model.weights if weights is None else weights)
    for name, value in weights.items():
        if isinstance(value, QuantizedWeight):
            weights[name] = value.dequantize()
    save_safetensors(directory / "model.safetensors", weights)
    config = model.config.to_hf_config()
    config["torch_dtype"] = "float32"
    atomic_write(directory / "config.json", [json.dumps(config, indent=2).encode()])
    tokenizer = model.tokenizer
    if tokenizer is not None:
        tokenizer.backend.save(str(directory / "tokenizer.json.tmp"))
        shutil.move(directory / "tokenizer.json.tmp", directory / "tokenizer.json")
        tokenizer_config = {**tokenizer.special_tokens, "chat_template": tokenizer.chat_template}
        if not tokenizer.chat_template:
            del tokenizer_config["chat_template"]
        atomic_write(
            directory / "tokenizer_config.json", [json.dumps(tokenizer_config, indent=2).encode()]
        )
