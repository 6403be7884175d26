"""Text generation with a KV cache: sampling, the cache-backed engine, and LanguageModel.

An `Engine` is one session holding the model's weights and a KV cache for `batch` sequences of
up to `capacity` tokens, with one computation per chunk length (powers of two). Feeding tokens
runs chunks that write their keys and values into the cache at the next free slot and attend
over every slot the host marks as valid, so prompts of different lengths share a batch (left
padding, masked), a prompt that extends what the cache holds only feeds the new tokens (chat
turns), and decoding is a chunk of one token. RoPE positions count each sequence's real tokens,
so padding never shifts them.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from meganeura.graph import Graph
from meganeura.io.tokenizer import Tokenizer
from meganeura.models.smollm2 import (
    KVCache,
    Llama,
    LlamaConfig,
    check_f16_range,
    chunk_outputs,
)

MIN_CAPACITY = 256  # room for a few chat turns before the cache must grow


# The storage of a model's weight matrices on the device, by the names users give it.
DTYPES = {"float32": "f32", "f32": "f32", "float16": "f16", "f16": "f16", "half": "f16"}
DTYPE_NAMES = {"f32": "float32", "f16": "float16"}


def weight_dtype(dtype: Any) -> str:
    """Our dtype for a model's weights from `dtype` ("float16", "f16", np.float16, or a
    torch dtype's name), or an error listing what is supported."""
    name = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", str(dtype))
    name = name.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(
            f"dtype {dtype!r} is not supported for a language model's weights; "
            f"valid: {', '.join(DTYPES)} (bfloat16 and others: load as float32 or float16)"
        )
    return DTYPES[name]


class ContextLengthError(ValueError):
    """A prompt that does not fit the model's context."""


# -- sampling ---------------------------------------------------------------------------------


@dataclass
class Sampling:
    """How the next token is picked: greedy (argmax), or drawn from the distribution at
    `temperature`, cut to the `top_k` most likely tokens (0: all) and to the smallest set whose
    probability reaches `top_p` (1.0: all), from a generator seeded with `seed`."""

    greedy: bool = False
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 0.9
    seed: int | None = None

    def __post_init__(self):
        if not self.greedy and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0 (or use greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 keeps every token), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """One token id per row of `logits` [B, vocab]."""
    logits = np.asarray(logits, np.float64)
    if sampling.greedy:
        return logits.argmax(axis=-1)
    scaled = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -sampling.top_k, axis=-1)[:, -sampling.top_k, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        before = np.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass ranked above each
        keep = np.zeros_like(probs, bool)
        np.put_along_axis(keep, order, before < sampling.top_p, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(len(p), p=p) for p in probs])


# -- the engine -------------------------------------------------------------------------------


class Engine:
    """Weights and a KV cache for `batch` sequences of up to `capacity` tokens on a device."""

    def __init__(
        self,
        config: LlamaConfig,
        weights: Mapping[str, Any],
        batch: int,
        capacity: int,
        device: str = "auto",
        keep_quantized: bool = False,
        matmul_precision: str = "highest",
        weight_dtype: str = "f32",
    ):
        from meganeura.session import build

        self.config, self.batch, self.capacity = config, batch, capacity
        graph = Graph()
        model = Llama(
            graph,
            config,
            weights,
            trainable=False,
            keep_quantized=keep_quantized,
            weight_dtype=weight_dtype,
        )
        cache = KVCache(graph, config, batch, capacity)
        self.chunk_sizes = [1 << k for k in range(capacity.bit_length()) if 1 << k <= capacity]
        self.outputs = {t: chunk_outputs(model, cache, t) for t in self.chunk_sizes}
        self.session = build(graph, device=device, matmul_precision=matmul_precision)
        self._runners: dict[str, Any] = {}  # session.runner of each chunk output fed
        self._steps = np.arange(capacity, dtype=np.int32)
        self.reset()

    @property
    def device(self) -> str:
        return self.session.device

    def reset(self) -> None:
        self.length = 0  # cache slots in use
        self.valid = np.zeros((self.batch, self.capacity), bool)
        self.tokens: list[list[int]] = [[] for _ in range(self.batch)]  # real tokens cached
        # The `cache_valid` input (0 for a valid slot, -inf otherwise) and each sequence's
        # real tokens cached, kept with `valid` rather than derived from it for every chunk.
        self._mask = np.full((self.batch, 1, 1, self.capacity), -np.inf, np.float32)
        self._seen = np.zeros(self.batch, np.int32)

    def rewind(self, slots: int) -> None:
        """Forget every cache slot from `slots` on (their rows are masked, then overwritten)."""
        self.valid[:, slots:] = False
        self._mask[..., slots:] = -np.inf
        self._seen = self.valid.sum(axis=1, dtype=np.int32)
        for b in range(self.batch):
            self.tokens[b] = self.tokens[b][: int(self._seen[b])]
        self.length = slots

    def feed(self, ids: np.ndarray, real: np.ndarray | None = None, every: bool = False):
        """Run tokens `ids` [B, T] (pads where `real` is False) through the model, caching
        them. Returns the logits of the last position [B, vocab], or with `every` of every
        position [B, T, vocab]."""
        ids = np.asarray(ids, np.int32)
        real = None if real is None else np.asarray(real, bool)  # None: every token is real
        if ids.shape[1] > self.capacity - self.length:
            raise ContextLengthError(
                f"{ids.shape[1]} more tokens do not fit the cache: {self.length} of "
                f"{self.capacity} slots are used"
            )
        pieces = []
        start = 0
        while start < ids.shape[1]:
            # The largest chunk size (a power of two) that the tokens left fill.
            t = min(1 << ((ids.shape[1] - start).bit_length() - 1), self.chunk_sizes[-1])
            part = None if real is None else real[:, start : start + t]
            pieces.append(self._chunk(ids[:, start : start + t], part, every))
            start += t
        return np.concatenate(pieces, axis=1) if every else pieces[-1]

    def _chunk(self, ids: np.ndarray, real: np.ndarray | None, every: bool) -> np.ndarray:
        b, t = ids.shape
        p = self.length
        feeds, name = self.chunk_inputs(ids, real, every)
        if name not in self._runners:
            self._runners[name] = self.session.runner([name])
        out = self._runners[name](feeds)[name]
        for row in range(b):
            self.tokens[row].extend((ids[row] if real is None else ids[row][real[row]]).tolist())
        self.length = p + t
        return out

    def chunk_inputs(
        self, ids: np.ndarray, real: np.ndarray | None, every: bool = False
    ) -> tuple[dict[str, np.ndarray], str]:
        """The session inputs that feed one chunk of `ids` [B, T] (T one of `chunk_sizes`;
        `real` [B, T] False at pads, None if there are none) after the cache's current
        contents, and the output to read. Marks the chunk's slots valid; `feed` uses it, and
        so can a profiler."""
        t = ids.shape[1]
        p = self.length
        if real is None:
            positions = self._seen[:, None] + self._steps[:t]
            self._seen = self._seen + t
            self.valid[:, p : p + t] = True
            self._mask[:, 0, 0, p : p + t] = 0.0
        else:
            counts = np.cumsum(real, axis=1, dtype=np.int32)
            positions = np.maximum(self._seen[:, None] + counts - 1, 0)
            self._seen = self._seen + counts[:, -1]
            self.valid[:, p : p + t] = real
            self._mask[:, 0, 0, p : p + t] = np.where(real, np.float32(0), np.float32(-np.inf))
        every_name, last_name, _ = self.outputs[t]
        feeds = {
            f"ids.{t}": ids,
            f"positions.{t}": positions,
            "cache_valid": self._mask.copy(),
            "cache_position": np.array([p], np.int32),
        }
        return feeds, every_name if every else last_name

    @property
    def pipelines(self) -> bool:
        """Whether `greedy` can keep the next step's input on the device (a WebGPU session;
        the NumPy executor has no queue to run ahead on)."""
        return hasattr(self.session.executor, "device")

    def greedy(
        self, tokens: np.ndarray, steps: int, stops: Sequence[int], done: np.ndarray
    ) -> Iterator[np.ndarray]:
        """Greedy decoding of `steps` more tokens per sequence after `tokens` [B] (the choice
        from the cache's last logits, not yet fed), yielding each step's tokens [B] as they
        are read, -1 for sequences already stopped (`done` [B], updated in place by the stop
        ids). The same tokens as feeding each one and taking the argmax of its logits, but
        the argmax runs on the device and is copied into the next step's input there: the
        host submits step k + 1 before reading step k's token (a few bytes), so encoding and
        submitting the next step overlap the device's work, and a token costs the longer of
        the two instead of their sum. A sequence that stops has been fed one token past its
        stop; the cache is rewound so that it holds what feeding token by token would have
        left (for batch 1, as chat turns reuse it)."""
        from meganeura.backends.webgpu.runtime import read_mappable

        session = self.session
        wgpu = session.executor.wgpu
        device = session.executor.device
        _, _, name = self.outputs[1]
        root = session.graph.outputs[name]
        program, needed = session._program((root,), "forward")
        ids_name = "ids.1"
        ids_buffer = program.buffer(session.graph.inputs[ids_name])
        token_buffer = program.buffer(root)
        nbytes = 4 * self.batch
        usage = wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST
        ring = [device.create_buffer(size=max(16, nbytes), usage=usage) for _ in range(2)]
        start = self.length
        fed: list[np.ndarray] = []  # the ids of each submitted step (known once read)
        reals: list[np.ndarray] = []

        def submit(ids: np.ndarray | None) -> None:
            if self.length >= self.capacity:
                raise ContextLengthError(f"the cache's {self.capacity} slots are full")
            real = ~done[:, None]
            values, _ = self.chunk_inputs(
                np.zeros((self.batch, 1), np.int32) if ids is None else ids[:, None], real
            )
            # The step's token goes into the next step's input and where the host reads it,
            # in the step's own submission (one for all its kernels: the device is still
            # busy with the step before, so it gains nothing from a first few sent early).
            copies = [
                (token_buffer, ids_buffer, nbytes),
                (token_buffer, ring[len(fed) % 2], nbytes),
            ]
            if ids is None:  # the previous step's argmax, copied there on the device
                del values[ids_name]
                program.run(session._feeds(values, needed - {ids_name}), copies=copies, queued=True)
            else:
                program.run(session._feeds(values, needed), copies=copies)
            fed.append(ids)
            reals.append(real[:, 0].copy())
            self.length += 1

        def read(step: int) -> np.ndarray:
            return read_mappable(
                wgpu, ring[step % 2], nbytes, lambda v: np.frombuffer(v, np.int32).copy()
            )

        stops = list(stops)
        read_steps = 0
        try:
            if steps <= 0:
                return
            submit(tokens.astype(np.int32))
            for step in range(steps):
                if step + 1 < steps:
                    submit(None)  # runs ahead on the device's own choice
                chosen = read(step)
                read_steps += 1
                if step + 1 < len(fed):
                    fed[step + 1] = chosen
                yield np.where(done, -1, chosen)
                done |= np.isin(chosen, stops)
                if done.all():
                    return
        finally:
            # Book the fed tokens, then forget the steps fed past the last one read.
            for ids, real in zip(fed, reals, strict=True):
                if ids is None:
                    continue
                for row in range(self.batch):
                    if real[row]:
                        self.tokens[row].append(int(ids[row]))
            self.rewind(start + read_steps)

    def extend_to(self, ids: Sequence[int]) -> np.ndarray:
        """Make the cache (batch 1) hold `ids`, feeding only what it does not hold already;
        returns the logits after the last token."""
        held = self.tokens[0] if self.length == len(self.tokens[0]) else []
        common = 0
        while common < min(len(held), len(ids) - 1) and held[common] == ids[common]:
            common += 1
        if held:
            self.rewind(common)
        else:
            self.reset()
        return self.feed(np.asarray([ids[common:]]))


# -- the model --------------------------------------------------------------------------------


class LanguageModel:
    """A causal language model with its tokenizer, ready to generate and chat."""

    def __init__(
        self,
        config: LlamaConfig,
        weights: Mapping[str, Any],
        tokenizer: Tokenizer | None,
        device: str = "auto",
        keep_quantized: bool = False,
        source: str = "",
        matmul_precision: str = "highest",
        dtype: Any = "float32",
    ):
        self.config = config
        self.weight_dtype = weight_dtype(dtype)
        self.weights = dict(weights)
        if self.weight_dtype == "f16":  # refuse weights out of f16's range now, not at first use
            for name, value in self.weights.items():
                if isinstance(value, np.ndarray) and value.ndim == 2:
                    check_f16_range(value, name)
        self.tokenizer = tokenizer
        self.device = device
        self.keep_quantized = keep_quantized
        self.source = source
        from meganeura.session import MATMUL_PRECISIONS

        if matmul_precision not in MATMUL_PRECISIONS:
            raise ValueError(
                f"LanguageModel: matmul_precision must be one of {MATMUL_PRECISIONS}, "
                f"got {matmul_precision!r}"
            )
        self.matmul_precision = matmul_precision
        self._engines: dict[tuple[int, int], Engine] = {}

    def __repr__(self) -> str:
        c = self.config
        dtype = self.weight_dtype
        weights = f", {DTYPE_NAMES[dtype]} weights" if dtype != "f32" else ""
        return (
            f"LanguageModel({self.source or 'llama'}: {c.num_hidden_layers} layers, hidden "
            f"{c.hidden_size}, vocab {c.vocab_size}, device {self.device!r}{weights})"
        )

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings

    @property
    def stop_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= self.tokenizer.eos_token_ids
        return ids

    def engine(self, batch: int, tokens: int) -> Engine:
        """An engine whose cache holds `tokens` tokens per sequence (reused when it fits)."""
        if tokens > self.context_length:
            raise ContextLengthError(
                f"{tokens} tokens do not fit the model's context of {self.context_length}"
            )
        for (b, capacity), engine in self._engines.items():
            if b == batch and capacity >= tokens:
                return engine
        capacity = min(max(MIN_CAPACITY, 1 << (tokens - 1).bit_length()), self.context_length)
        self._engines = {k: e for k, e in self._engines.items() if k[0] != batch}
        engine = Engine(
            self.config,
            self.weights,
            batch,
            capacity,
            self.device,
            self.keep_quantized,
            self.matmul_precision,
            self.weight_dtype,
        )
        self._engines[(batch, capacity)] = engine
        return engine

    # -- logits -------------------------------------------------------------------------------
    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        """Next-token logits after each of `input_ids`: [T, vocab]."""
        ids = self._check_prompt(list(input_ids))
        engine = self.engine(1, len(ids))
        engine.reset()
        return engine.feed(np.asarray([ids]), every=True)[0]

    def _check_prompt(self, ids: list[int]) -> list[int]:
        if not ids:
            raise ValueError("the prompt is empty: give at least one token")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is out of range for the vocabulary of {self.config.vocab_size}"
            )
        if len(ids) >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; the model's context is "
                f"{self.context_length} tokens (prompt and reply together)"
            )
        return ids

    # -- generation ---------------------------------------------------------------------------
    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampling: Sampling | None = None,
    ) -> list[list[int]]:
        """New token ids for each prompt (a batch, left-padded), up to and including a stop
        token, at most `max_new_tokens` and never past the context."""
        out: list[list[int]] = [[] for _ in prompts]
        for tokens in self.steps(prompts, max_new_tokens, sampling):
            for b, token in enumerate(tokens):
                if token >= 0:
                    out[b].append(int(token))
        return out

    def steps(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampling: Sampling | None = None,
    ) -> Iterator[np.ndarray]:
        """Each step's new tokens [B] as they are chosen; -1 for sequences already stopped."""
        sampling = sampling or Sampling()
        prompts = [self._check_prompt(list(p)) for p in prompts]
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        longest = max(len(p) for p in prompts)
        budget = min(max_new_tokens, self.context_length - longest)
        engine = self.engine(len(prompts), longest + budget)
        if budget == 0:
            return
        if len(prompts) == 1:
            logits = engine.extend_to(prompts[0])
        else:
            engine.reset()
            ids = np.zeros((len(prompts), longest), np.int32)
            real = np.zeros((len(prompts), longest), bool)
            for b, p in enumerate(prompts):
                ids[b, longest - len(p) :] = p
                real[b, longest - len(p) :] = True
            logits = engine.feed(ids, real)
        rng = np.random.default_rng(sampling.seed)
        stops = list(self.stop_ids)
        done = np.zeros(len(prompts), bool)
        if sampling.greedy and engine.pipelines:
            tokens = sample(logits, sampling, rng)
            yield np.where(done, -1, tokens)
            done |= np.isin(tokens, stops)
            if not done.all():
                yield from engine.greedy(tokens, budget - 1, stops, done)
            return
        for step in range(budget):
            tokens = sample(logits, sampling, rng)
            yield np.where(done, -1, tokens)
            done |= np.isin(tokens, stops)
            if done.all() or step == budget - 1:
                return
            logits = engine.feed(tokens[:, None], ~done[:, None])

    def _encode(self, prompt: str, chat: bool, system: str | None = None) -> list[int]:
        tokenizer = self._need_tokenizer()
        if not chat:
            return tokenizer.encode(prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.encode_chat(messages)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids to generate_ids()")
        return self.tokenizer

    def generate(
        self,
        prompt: str | Sequence[str],
        max_new_tokens: int = 128,
        chat: bool = False,
        greedy: bool = False,
        temperature: float = 0.7,
        top_k: int = 0,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> str | list[str]:
        """The continuation of `prompt` (or of each of a list of prompts, as one batch); with
        `chat`, the prompt is a user message wrapped in the chat template."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        ids = [self._encode(p, chat) for p in prompts]
        sampling = Sampling(greedy, temperature, top_k, top_p, seed)
        new = self.generate_ids(ids, max_new_tokens, sampling)
        texts = [self._need_tokenizer().decode(t) for t in new]
        return texts[0] if isinstance(prompt, str) else texts

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 128,
        chat: bool = False,
        sampling: Sampling | None = None,
    ) -> Iterator[str]:
        """The continuation of one prompt, piece by piece as tokens are generated."""
        ids = self._encode(prompt, chat)
        yield from self._stream_ids(ids, max_new_tokens, sampling or Sampling(), [])

    def _stream_ids(self, ids, max_new_tokens, sampling, reply: list[int]) -> Iterator[str]:
        """Generate after `ids`, appending to `reply` and yielding the text it adds."""
        tokenizer = self._need_tokenizer()
        shown = ""
        for (token,) in self.steps([ids], max_new_tokens, sampling):
            reply.append(int(token))
            text = tokenizer.decode(reply)
            # Hold back a trailing partial UTF-8 character until its other bytes arrive.
            if not text.endswith("\ufffd") and len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        text = tokenizer.decode(reply)
        if len(text) > len(shown):
            yield text[len(shown) :]

    def chat(
        self,
        messages: str | Sequence[Mapping[str, str]],
        max_new_tokens: int = 256,
        greedy: bool = False,
        temperature: float = 0.7,
        top_k: int = 0,
        top_p: float = 0.9,
        seed: int | None = None,
    ) -> str:
        """The assistant's reply to a conversation (a list of {"role", "content"} messages,
        or one user message)."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        ids = self._need_tokenizer().encode_chat(messages)
        sampling = Sampling(greedy, temperature, top_k, top_p, seed)
        (reply,) = self.generate_ids([ids], max_new_tokens, sampling)
        return self._need_tokenizer().decode(reply)

    def start_chat(self, system: str | None = None) -> Conversation:
        return Conversation(self, system)

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace weights by name (fine-tuned ones); engines are rebuilt on next use."""
        unknown = sorted(set(weights) - set(self.weights))
        if unknown:
            raise KeyError(f"load_weights: the model has no weight {unknown[0]!r}")
        self.weights.update(weights)
        self._engines.clear()

    def fine_tuner(self, batch: int, tokens: int, **options) -> Any:
        from meganeura.finetune import FineTuner

        return FineTuner(self, batch, tokens, **options)

    def save_pretrained(self, directory) -> None:
        from meganeura.finetune import save_pretrained

        save_pretrained(self, directory)


class Conversation:
    """A chat whose KV cache is kept between turns: each turn feeds only the new tokens."""

    def __init__(self, model: LanguageModel, system: str | None = None):
        self.model = model
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})

    def send(
        self, text: str, max_new_tokens: int = 256, sampling: Sampling | None = None
    ) -> Iterator[str]:
        """Add a user message and stream the reply; the reply joins the conversation."""
        self.messages.append({"role": "user", "content": text})
        ids = self.model._need_tokenizer().encode_chat(self.messages)
        reply: list[int] = []
        pieces = []
        for piece in self.model._stream_ids(ids, max_new_tokens, sampling or Sampling(), reply):
            pieces.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(pieces)})


def print_stream(pieces: Iterator[str], file=None) -> str:
    """Write pieces of text (to stdout by default) as they come; returns the whole text."""
    file = file or sys.stdout
    text = []
    for piece in pieces:
        file.write(piece)
        file.flush()
        text.append(piece)
    return "".join(text)
