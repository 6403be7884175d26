"""Twin models for training-parity tests and benchmarks: each is built once as a meganeura
graph and once as a torch.nn.Module whose state_dict keys are the graph's parameter names,
so one set of initial weights loads into both."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from meganeura import Graph, Tensor, init, nn
from meganeura import functional as F

# -- a 2-layer transformer from primitives: matmul, softmax, RMSNorm, GELU ----------------


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 11
    dim: int = 16
    heads: int = 2
    layers: int = 2
    context: int = 5
    eps: float = 1e-6


def causal_mask(t: int) -> np.ndarray:
    # A large finite negative (not -inf): exp underflows to exactly 0 either way.
    return np.triu(np.full((t, t), -1e9, np.float32), 1)


def gpt_logits(graph: Graph, config: GPTConfig, ids: Tensor) -> Tensor:
    """Pre-norm causal transformer: token and position embeddings, `layers` blocks of
    multi-head self-attention and a GELU MLP, a final RMSNorm and a linear head."""
    batch, t = ids.shape
    d, h = config.dim, config.heads
    dh = d // h
    x = nn.Embedding(graph, "tok", config.vocab, d)(ids)
    x = x + graph.parameter("pos", (t, d), init=init.normal(std=0.02))
    mask = graph.constant(causal_mask(t))

    def heads(y: Tensor) -> Tensor:
        return y.reshape(batch, t, h, dh).permute(0, 2, 1, 3)

    for i in range(config.layers):
        p = f"blocks.{i}"
        a = nn.RMSNorm(graph, f"{p}.norm1", d, config.eps)(x)
        q, k, v = (nn.Linear(graph, f"{p}.{n}", d, d, bias=False)(a) for n in "qkv")
        scores = graph.apply("matmul", [heads(q), heads(k)], trans_b=True) * (1 / math.sqrt(dh))
        att = (scores + mask).softmax(-1)
        out = (att @ heads(v)).permute(0, 2, 1, 3).reshape(batch, t, d)
        x = x + nn.Linear(graph, f"{p}.proj", d, d)(out)
        m = nn.RMSNorm(graph, f"{p}.norm2", d, config.eps)(x)
        x = x + nn.Linear(graph, f"{p}.fc2", 4 * d, d)(
            nn.Linear(graph, f"{p}.fc1", d, 4 * d)(m).gelu()
        )
    x = nn.RMSNorm(graph, "norm", d, config.eps)(x)
    return nn.Linear(graph, "head", d, config.vocab)(x)


def gpt_training_graph(config: GPTConfig, batch: int) -> tuple[Graph, Tensor]:
    graph = Graph()
    ids = graph.input("ids", (batch, config.context), "i32")
    targets = graph.input("targets", (batch, config.context), "i32")
    logits = graph.output("logits", gpt_logits(graph, config, ids))
    return graph, F.cross_entropy(logits, targets)


class TorchBlock(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.dim
        self.config = config
        self.norm1 = torch.nn.RMSNorm(d, eps=config.eps)
        self.q, self.k, self.v = (torch.nn.Linear(d, d, bias=False) for _ in range(3))
        self.proj = torch.nn.Linear(d, d)
        self.norm2 = torch.nn.RMSNorm(d, eps=config.eps)
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.config.heads

        def heads(y):
            return y.reshape(b, t, h, d // h).permute(0, 2, 1, 3)

        a = self.norm1(x)
        scores = heads(self.q(a)) @ heads(self.k(a)).transpose(-1, -2) / math.sqrt(d // h)
        att = (scores + torch.from_numpy(causal_mask(t)).to(scores.device)).softmax(-1)
        out = (att @ heads(self.v(a))).permute(0, 2, 1, 3).reshape(b, t, d)
        x = x + self.proj(out)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TorchGPT(torch.nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.tok = torch.nn.Embedding(config.vocab, config.dim)
        self.pos = torch.nn.Parameter(torch.zeros(config.context, config.dim))
        self.blocks = torch.nn.ModuleList(TorchBlock(config) for _ in range(config.layers))
        self.norm = torch.nn.RMSNorm(config.dim, eps=config.eps)
        self.head = torch.nn.Linear(config.dim, config.vocab)

    def forward(self, ids):
        x = self.tok(ids) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def gpt_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["ids"].long())
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["targets"].long().reshape(-1)
    )


def gpt_batches(config: GPTConfig, batch: int, count: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    shape = (batch, config.context)
    return [
        {
            "ids": rng.integers(0, config.vocab, shape).astype(np.int32),
            "targets": rng.integers(0, config.vocab, shape).astype(np.int32),
        }
        for _ in range(count)
    ]


# -- the small CNN of meganeura.recipes.small_cnn, as torch.nn.Sequential --------------------


def torch_cnn(in_shape, classes: int, channels=(16, 32)) -> torch.nn.Sequential:
    c, h, w = in_shape
    return torch.nn.Sequential(
        torch.nn.Conv2d(c, channels[0], 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(channels[0], channels[1], 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(channels[1] * (h // 4) * (w // 4), classes),
    )
