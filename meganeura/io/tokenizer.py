"""Tokenizers: Hugging Face `tokenizer.json` files, or one rebuilt from a GGUF's vocabulary.

Text goes through the `tokenizers` package; chat templates render with Jinja2 in a sandbox set up
as transformers sets it up (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
a `tojson` that does not escape HTML), so a template gives the same text here as there. A GGUF
holds no tokenizer.json, only its vocabulary, merges and token types, from which the tokenizer
is rebuilt as transformers rebuilds it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# Token types in a GGUF vocabulary (llama.cpp's llama_token_type).
CONTROL, USER_DEFINED = 3, 4

# Pre-tokenizer splits of GGUF `tokenizer.ggml.pre` names whose vocabulary was learned with a
# split other than GPT-2's (the byte-level default).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS = dict.fromkeys(("llama3", "llama-v3", "llama-bpe"), _LLAMA3_SPLIT)
GGUF_TOKENIZER_MODELS = ("gpt2",)


class TokenizerError(ValueError):
    """A tokenizer file or GGUF vocabulary we cannot build a tokenizer from."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


class Tokenizer:
    """Text to token ids and back, special tokens, and the model's chat template."""

    def __init__(
        self,
        backend,
        special_tokens: Mapping[str, str | None],
        chat_template: str | None = None,
        eos_token_ids: Iterable[int] = (),
    ):
        self.backend = backend
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.chat_template = chat_template
        ids = {self.token_to_id(t) for t in [self.special_tokens.get("eos_token")] if t}
        self.eos_token_ids: set[int] = {i for i in ids if i is not None} | set(eos_token_ids)
        self._template = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_directory(cls, directory: str | Path, eos_token_ids: Iterable[int] = ()) -> Tokenizer:
        """From a Hugging Face model directory: tokenizer.json, tokenizer_config.json and, if
        present, chat_template.jinja."""
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{directory}: no tokenizer.json (needed to tokenize text)")
        try:
            backend = Backend.from_file(str(path))
        except Exception as error:
            raise TokenizerError(f"{path}: cannot read the tokenizer: {error}") from None
        config: dict[str, Any] = {}
        config_path = directory / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as error:
                raise TokenizerError(f"{config_path}: corrupt JSON: {error}") from None
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t["name"]: t["template"] for t in template}
            template = named.get("default", next(iter(named.values()), None))
        jinja_path = directory / "chat_template.jinja"
        if jinja_path.is_file():
            template = jinja_path.read_text()
        special = {name: _token_text(config.get(name)) for name in SPECIAL_NAMES}
        return cls(backend, special, template, eos_token_ids)

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str = "GGUF") -> Tokenizer:
        """Rebuild the tokenizer a GGUF describes (`tokenizer.ggml.*` keys), as transformers
        does: byte-level BPE for `gpt2` vocabularies, control tokens added as special tokens."""
        from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
        from tokenizers import Tokenizer as Backend
        from tokenizers.models import BPE

        model = metadata.get("tokenizer.ggml.model")
        if model not in GGUF_TOKENIZER_MODELS:
            raise TokenizerError(
                f"{source}: cannot build a tokenizer for tokenizer.ggml.model={model!r}; "
                f"supported: {', '.join(GGUF_TOKENIZER_MODELS)}"
            )
        tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        types = list(metadata.get("tokenizer.ggml.token_type") or [])
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab = {
            t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode()): i
            for i, t in enumerate(tokens)
        }
        backend = Backend(
            BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="")
        )
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        split = GGUF_PRE_TOKENIZER_SPLITS.get(metadata.get("tokenizer.ggml.pre"))
        if split is not None:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        backend.decoder = decoders.ByteLevel()
        # Control tokens written outside the byte alphabet are llama.cpp mislabels; adding them
        # would grow the vocabulary past the model's.
        control = [
            AddedToken(t, normalized=False, special=True)
            for t, kind in zip(tokens, types, strict=False)
            if kind == CONTROL and set(t) <= alphabet
        ]
        backend.add_special_tokens(control)
        user = [
            AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types, strict=False)
            if kind == USER_DEFINED and t in vocab
        ]
        backend.add_tokens(user)
        special = {}
        for name, key in (
            ("bos_token", "bos_token_id"),
            ("eos_token", "eos_token_id"),
            ("unk_token", "unknown_token_id"),
            ("pad_token", "padding_token_id"),
        ):
            index = metadata.get(f"tokenizer.ggml.{key}")
            special[name] = tokens[index] if index is not None and index < len(tokens) else None
        if metadata.get("tokenizer.ggml.add_bos_token") and special["bos_token"]:
            bos = special["bos_token"]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
            )
        return cls(backend, special, metadata.get("tokenizer.chat_template"))

    # -- text <-> ids -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- chat ---------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, **extra
    ) -> str:
        """The conversation as the text the model was trained on, ready for its reply."""
        if not self.chat_template:
            raise TokenizerError(
                "this model has no chat template (tokenizer_config.json chat_template or GGUF "
                "tokenizer.chat_template); use generate() with plain text instead"
            )
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        for message in messages:
            if not isinstance(message, Mapping) or "role" not in message:
                raise TypeError(f"chat: each message needs a 'role' and 'content', got {message!r}")
        return self._template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **self.special_tokens,
            **extra,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered conversation; the template writes any special tokens."""
        text = self.apply_chat_template(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def _token_text(value) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _compile_template(source: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise TokenizerError(f"the chat template does not parse: {error}") from None
