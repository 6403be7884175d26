"""Language models end to end against transformers: logits, KV-cache generation (batched,
chat turns), sampling, fine-tuning (full and LoRA) and saving."""

import numpy as np
import pytest
import torch

from meganeura.autodiff import grad
from meganeura.finetune import FineTuner, next_token_batch
from meganeura.generation import Sampling, sample
from meganeura.graph import Graph
from meganeura.models.smollm2 import Llama, LlamaConfig, LoraConfig, training_loss
from meganeura.optim import AdamW
from meganeura.pretrained import load_pretrained
from meganeura.session import build
from tests.llm_models import load_transformers, random_llama, save_hf, write_gguf

DEVICES = ["cpu", pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe)]


def reference_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def reference_greedy(model, ids, new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
        )
    return out[0, len(ids) :].tolist()


# -- inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "variant",
    [
        {"tie": True, "shard": None},
        {"tie": False, "shard": 30_000},
    ],
    ids=["tied", "sharded"],
)
def test_random_llama_logits_match_transformers(tmp_path, device, variant):
    model = random_llama(seed=1, tie_word_embeddings=variant["tie"])
    directory = save_hf(model, tmp_path, shard_bytes=variant["shard"])
    ours = load_pretrained(directory, device=device)
    for ids in ([5, 80, 17, 200, 33, 9, 41], [7]):
        np.testing.assert_allclose(
            ours.logits(ids), reference_logits(model, ids), atol=1e-4, rtol=1e-4
        )


def f16_values(model):
    """`model` with its weights rounded to f16 values (kept f32): the model an f16
    checkpoint holds, and what one stored with f16 matrices computes."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_f16_weight_storage_computes_the_f16_rounded_model(tmp_path, device):
    """dtype="float16" stores the matrices as f16 and computes in f32: the logits, decoding
    against the cache and greedy generation are those of the f32 model whose matrices hold
    the same f16 values, within f32 rounding. A float16 checkpoint loads the same way."""
    model = f16_values(random_llama(seed=4, tie_word_embeddings=False))
    ids = [5, 80, 17, 200, 33, 9, 41]
    want = reference_logits(model, ids)
    prompts = [[5, 80, 17, 200, 33, 9, 41, 8], [7, 66]]
    expected = [reference_greedy(model, p, 10) for p in prompts]
    for directory, saved in ((tmp_path / "f32", None), (tmp_path / "f16", torch.float16)):
        directory.mkdir()
        ours = load_pretrained(save_hf(model, directory, dtype=saved), device=device, dtype="f16")
        model.float()  # (save_hf converted it in place)
        assert ours.weight_dtype == "f16" and "float16 weights" in repr(ours)
        np.testing.assert_allclose(ours.logits(ids), want, atol=1e-4, rtol=1e-4)
    assert ours.generate_ids(prompts, 10, Sampling(greedy=True)) == expected
    parameters = ours.engine(1, 16).session.graph
    dtypes = {parameters.nodes[nid].type.dtype for nid in parameters.parameters.values()}
    assert "f16" in dtypes  # the matrices really are stored as f16


def test_weights_out_of_f16_range_and_unknown_dtypes_are_refused(tmp_path):
    model = random_llama(seed=4)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 1e5
    directory = save_hf(model, tmp_path)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj\.weight.*do not fit f16"):
        load_pretrained(directory, device="cpu", dtype="float16")
    ours = load_pretrained(directory, device="cpu")
    with pytest.raises(ValueError, match=r"dtype 'bfloat16' is not supported.*float16"):
        load_pretrained(tmp_path, device="cpu", dtype="bfloat16")
    with pytest.raises(ValueError, match="f16 weights are for inference"):
        Llama(Graph(), ours.config, weight_dtype="f16")
    with pytest.raises(ValueError, match=r"down_proj\.weight: values up to 100000 do not fit"):
        Llama(Graph(), ours.config, ours.weights, trainable=False, weight_dtype="f16")


@pytest.mark.gpu
def test_high_precision_prompt_logits_stay_close_to_transformers(tmp_path):
    """matmul_precision="high" rounds a prompt's product operands to f16 (where the GPU's
    matrix units pay): logits stay within f16 rounding of the f32 reference."""
    model = random_llama(seed=1)
    ours = load_pretrained(save_hf(model, tmp_path), device="gpu", matmul_precision="high")
    ids = list(range(3, 3 + 40))
    want = reference_logits(model, ids)
    got = ours.logits(ids)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2


def test_an_unknown_matmul_precision_is_rejected(tmp_path):
    directory = save_hf(random_llama(seed=1), tmp_path)
    with pytest.raises(ValueError, match=r"matmul_precision must be one of .*'medium'"):
        load_pretrained(directory, device="cpu", matmul_precision="medium")


@pytest.mark.parametrize("device", DEVICES)
def test_gguf_quantized_llama_matches_transformers(tmp_path, device):
    model = random_llama(seed=2)
    path = write_gguf(model, tmp_path / "q.gguf", {"embed": "Q8_0", "proj": "Q4_1"})
    reference = load_transformers(path)
    ours = load_pretrained(path, device=device)
    ids = [3, 99, 150, 7, 12, 250]
    np.testing.assert_allclose(
        ours.logits(ids), reference_logits(reference, ids), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("device", DEVICES)
def test_batched_and_cached_generation_match_transformers(tmp_path, device):
    model = random_llama(seed=3)
    ours = load_pretrained(save_hf(model, tmp_path), device=device)
    prompts = [[5, 80, 17, 200, 33, 9, 41, 8, 100, 101, 4], [7, 66], [250, 3, 3, 3, 90]]
    expected = [reference_greedy(model, p, 12) for p in prompts]
    greedy = Sampling(greedy=True)
    assert ours.generate_ids(prompts, 12, greedy) == expected  # one left-padded batch
    for prompt, tokens in zip(prompts, expected, strict=True):
        assert ours.generate_ids([prompt], 12, greedy) == [tokens]
    # The cache-backed decode gives the logits of the whole sequence at each step.
    engine = ours.engine(1, 32)
    engine.reset()
    sequence = prompts[0] + expected[0]
    stepped = [engine.feed(np.array([sequence[:5]]))[0]]
    stepped += [engine.feed(np.array([[t]]))[0] for t in sequence[5:]]
    np.testing.assert_allclose(
        np.stack(stepped), reference_logits(model, sequence)[4:], atol=1e-4, rtol=1e-4
    )


def projection_rows(graph, output: str) -> dict[str, int]:
    """Rows each projection (by weight name) multiplies in the computation of `output`."""
    from meganeura.ops import get_op

    rows = {}
    for nid in graph.live_nodes([graph.outputs[output]]):
        node = graph.nodes[nid]
        if get_op(node.op).kind == "matmul":
            weight = graph.nodes[node.inputs[-1]].name
            rows[weight] = int(np.prod(node.type.shape[:-1]))
    return rows


@pytest.mark.parametrize("device", DEVICES)
def test_a_prompt_chunk_runs_its_last_layer_past_keys_and_values_on_its_last_row(tmp_path, device):
    """The next-token logits of an 8-token chunk need the last row of the last layer only:
    its q/k/v product and cache write cover all 8 rows, its o, gate/up and down products one
    row; every other layer (and the chunk's every-position logits) all 8. The last-row
    logits equal the every-position logits' last row, after a cached prefix too."""
    model = random_llama(seed=4)
    engine = load_pretrained(save_hf(model, tmp_path), device=device).engine(2, 32)
    graph = engine.session.graph
    last, every = projection_rows(graph, "next_logits.8"), projection_rows(graph, "logits.8")
    layer = f"model.layers.{model.config.num_hidden_layers - 1}"
    one_row = {w for w, n in last.items() if n == 2}  # one row per sequence
    assert one_row == {
        f"{layer}.self_attn.o_proj.weight",
        f"{layer}.mlp.[gate_proj.weight,up_proj.weight]",
        f"{layer}.mlp.down_proj.weight",
        "model.embed_tokens.weight",  # the tied lm_head
    }
    assert all(n == 16 for w, n in last.items() if w not in one_row)
    assert all(n == 16 for w, n in every.items() if w != "model.embed_tokens.weight")
    rng = np.random.default_rng(0)
    prefix, chunk = rng.integers(3, 250, (2, 5)), rng.integers(3, 250, (2, 8))
    real = np.ones((2, 8), bool)
    real[1, :3] = False  # the second sequence's chunk starts with padding
    engine.reset()
    engine.feed(prefix)
    every_logits = engine.feed(chunk, real, every=True)[:, -1]
    engine.rewind(5)
    np.testing.assert_allclose(engine.feed(chunk, real), every_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.lavapipe
def test_prompt_chunks_start_the_device_early_and_decoding_steps_submit_in_few_buffers(tmp_path):
    """A prompt chunk's products run as tiles (the device is the bottleneck): its first
    command buffer is short and each next one three times as long, the last taking all that
    is left once at most three times its size is; a decoding step's are GEMVs (the host is):
    32 kernels first, doubling. Both compute what the NumPy executor does."""
    from meganeura.backends.webgpu.runtime import DEVICE_BOUND_CHUNKS, HOST_BOUND_CHUNKS

    directory = save_hf(random_llama(seed=5, num_hidden_layers=6), tmp_path)
    engines = [load_pretrained(directory, device=d).engine(1, 32) for d in ("vulkan-cpu", "cpu")]
    prompt = np.arange(3, 19)[None]
    logits = [e.feed(prompt) for e in engines]
    session = engines[0].session
    chunk = session._last
    assert (chunk.first_chunk, chunk.chunk_growth, chunk.last_takes_rest) == DEVICE_BOUND_CHUNKS
    first, growth, _ = DEVICE_BOUND_CHUNKS
    sizes, left = [], len(chunk.dispatches)
    while left > 0:
        size = first * growth ** len(sizes)
        sizes.append(left if left <= size * growth else size)
        left -= sizes[-1]
    assert len(chunk._encode()) == len(sizes) > 1
    steps = [[e.feed(np.array([[t]])) for t in (7, 9)] for e in engines]
    step = session._last
    assert (step.first_chunk, step.chunk_growth, step.last_takes_rest) == HOST_BOUND_CHUNKS
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.stack(steps[0]), np.stack(steps[1]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe),
        pytest.param("gpu", marks=pytest.mark.gpu),
    ],
)
def test_pipelined_greedy_decoding_matches_token_by_token(tmp_path, monkeypatch, device):
    """On a WebGPU device, greedy decoding keeps the next token on the device and runs a
    step ahead: the same tokens, stops and cache contents as feeding tokens one by one."""
    from meganeura.generation import Engine

    model = random_llama(seed=3)
    ours = load_pretrained(save_hf(model, tmp_path), device=device)
    prompts = [[5, 80, 17, 200, 33, 9, 41, 8, 100, 101, 4], [7, 66], [250, 3, 3, 3, 90]]
    free = [reference_greedy(model, p, 10) for p in prompts]
    # A stop token that one sequence reaches mid-way, another later or never.
    stop = free[0][4]
    greedy = Sampling(greedy=True)

    calls = []
    greedy_steps = Engine.greedy
    monkeypatch.setattr(
        Engine, "greedy", lambda self, *a: calls.append(1) or greedy_steps(self, *a)
    )

    def run(pipelined: bool):
        monkeypatch.setattr(Engine, "pipelines", property(lambda self: pipelined))
        monkeypatch.setattr(type(ours), "stop_ids", property(lambda self: {stop}))
        batch = ours.generate_ids(prompts, 10, greedy)
        one = ours.generate_ids([prompts[0]], 10, greedy)
        engine = ours.engine(1, len(prompts[0]) + 10)
        return batch, one, engine.length, [list(t) for t in engine.tokens]

    piped = run(True)
    assert calls  # the pipelined path ran
    calls.clear()
    stepped = run(False)
    assert not calls
    assert piped == stepped
    assert piped[1] == [free[0][:5]]  # stopped at (and including) the stop token


def test_chat_turns_feed_only_new_tokens(tmp_path):
    model = random_llama(seed=4)
    ours = load_pretrained(save_hf(model, tmp_path), device="cpu")
    greedy = Sampling(greedy=True)
    conversation = ours.start_chat()
    first = "".join(conversation.send("the hat", 6, greedy))
    engine = ours.engine(1, 1)
    fed = []
    original = engine.feed
    engine.feed = lambda ids, *a, **k: fed.append(np.shape(ids)[1]) or original(ids, *a, **k)
    second = "".join(conversation.send("in a hat", 6, greedy))
    tokenizer = ours.tokenizer
    whole = tokenizer.encode_chat(conversation.messages[:-1])
    first_turn = tokenizer.encode_chat(conversation.messages[:1])
    assert fed[0] <= len(whole) - len(first_turn)  # the prefill skips the cached first turn
    assert fed[1:] == [1] * len(fed[1:])
    # A fresh cache gives the same reply.
    engine.feed = original
    engine.reset()
    assert "".join(ours.start_chat().send("the hat", 6, greedy)) == first
    fresh = ours.chat(conversation.messages[:-1], 6, greedy=True)
    assert fresh == second


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    assert sample(logits, Sampling(greedy=True), rng).tolist() == [0]
    assert sample(logits, Sampling(top_k=1), rng).tolist() == [0]
    assert sample(logits, Sampling(top_p=0.4), rng).tolist() == [0]
    draws = [sample(logits, Sampling(temperature=1.0, top_p=1.0), rng)[0] for _ in range(4000)]
    frequencies = np.bincount(draws, minlength=4) / 4000
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    kept = {sample(logits, Sampling(temperature=1.0, top_p=0.75), rng)[0] for _ in range(300)}
    assert kept == {0, 1}  # 0.5 + 0.3 reaches 0.75
    top3 = Sampling(temperature=1.0, top_k=3, top_p=1.0)
    kept = {sample(logits, top3, rng)[0] for _ in range(300)}
    assert kept == {0, 1, 2}
    hot = [sample(logits, Sampling(temperature=50.0, top_p=1.0), rng)[0] for _ in range(2000)]
    assert np.bincount(hot, minlength=4).min() > 350  # nearly uniform
    a = sample(np.tile(logits, (3, 1)), Sampling(seed=7), np.random.default_rng(7))
    b = sample(np.tile(logits, (3, 1)), Sampling(seed=7), np.random.default_rng(7))
    assert a.tolist() == b.tolist()
    with pytest.raises(ValueError, match=r"temperature must be > 0"):
        Sampling(temperature=0.0)
    with pytest.raises(ValueError, match=r"top_p must be in"):
        Sampling(top_p=0.0)


def test_seeded_generation_is_reproducible(tmp_path):
    ours = load_pretrained(save_hf(random_llama(seed=5), tmp_path), device="cpu")
    runs = [ours.generate("the", 10, temperature=1.5, seed=11) for _ in range(2)]
    assert runs[0] == runs[1]


# -- fine-tuning --------------------------------------------------------------------------------


def torch_loss_and_grads(model, ids, labels_hf):
    model.zero_grad()
    ids, labels_hf = (torch.tensor(a, dtype=torch.long) for a in (ids, labels_hf))
    out = model(ids, labels=labels_hf)
    out.loss.backward()
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return out.loss.item(), grads


def training_data(vocab: int, batch: int = 2, tokens: int = 9, seed: int = 0):
    """Inputs, our labels (shifted) and transformers' labels (unshifted), some ignored."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, tokens)).astype(np.int32)
    hf_labels = ids.astype(np.int64).copy()
    hf_labels[0, :3] = -100  # a prompt that is not learned
    hf_labels[1, -2:] = -100  # padding
    labels = np.full_like(ids, -100)
    labels[:, :-1] = hf_labels[:, 1:]
    return ids, labels, hf_labels


def relative_close(got, want, tol=1e-4):
    scale = max(np.abs(want).max(), 1e-8)
    assert np.abs(got - want).max() <= tol * scale, (np.abs(got - want).max(), scale)


@pytest.mark.parametrize("device", DEVICES)
def test_training_loss_and_gradients_match_pytorch(device):
    reference = random_llama(seed=6, tie_word_embeddings=True)
    config = LlamaConfig.from_hf_config(reference.config.to_dict())
    weights = {n: p.detach().numpy().copy() for n, p in reference.named_parameters()}
    graph = Graph()
    llama = Llama(graph, config, weights)
    loss = training_loss(llama, 2, 9)
    names = list(llama.params)
    for name, g in zip(names, grad(loss, [llama.params[n] for n in names]), strict=True):
        graph.output(f"grad.{name}", g)
    session = build(graph, device=device)
    ids, labels, hf_labels = training_data(config.vocab_size)
    got = session.run({"input_ids": ids, "labels": labels})
    want_loss, want_grads = torch_loss_and_grads(reference, ids, hf_labels)
    relative_close(np.array(got["loss"]), np.array(want_loss))
    for name in names:
        relative_close(got[f"grad.{name}"], want_grads[name])


def test_lora_gradients_and_merge_match_pytorch(tmp_path):
    reference = random_llama(seed=7)
    ours = load_pretrained(save_hf(reference, tmp_path), device="cpu")
    lora = LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"), layers=[1])
    tuner = FineTuner(ours, 2, 9, lora=lora)
    trainable = sorted(n for n, s in tuner.session.graph.parameter_specs.items() if s.trainable)
    assert trainable == [
        "model.layers.1.mlp.down_proj.lora_A.weight",
        "model.layers.1.mlp.down_proj.lora_B.weight",
        "model.layers.1.self_attn.q_proj.lora_A.weight",
        "model.layers.1.self_attn.q_proj.lora_B.weight",
    ]
    rng = np.random.default_rng(0)
    adapters = {
        n: rng.normal(0, 0.1, v.shape).astype(np.float32) for n, v in tuner.adapters().items()
    }
    tuner.session.set_parameters(adapters)
    merged = tuner.weights()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in merged:
                p.copy_(torch.from_numpy(merged[name]))
    ids, labels, hf_labels = training_data(ours.config.vocab_size, seed=1)
    want_loss, want_grads = torch_loss_and_grads(reference, ids, hf_labels)
    relative_close(np.array(tuner.loss(ids, labels)), np.array(want_loss))
    # y = x (W + s B A)^T: dA = s B^T dW and dB = s dW A^T.
    graph = tuner.session.graph
    s = lora.alpha / lora.rank
    for module in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        a, b = adapters[f"{module}.lora_A.weight"], adapters[f"{module}.lora_B.weight"]
        g_w = want_grads[f"{module}.weight"]
        for leaf, want in (("lora_A", s * b.T @ g_w), ("lora_B", s * g_w @ a.T)):
            name = f"{module}.{leaf}.weight"
            (g,) = grad(graph.tensor("loss"), [graph.tensor(name)])
            graph.output(f"grad.{name}", g)
            got = tuner.session.run({"input_ids": ids, "labels": labels}, outputs=[f"grad.{name}"])
            relative_close(got[f"grad.{name}"], want)


def test_lora_lowers_the_loss_and_saves_a_checkpoint_transformers_reads(tmp_path):
    reference = random_llama(seed=8)
    ours = load_pretrained(save_hf(reference, tmp_path / "base"), device="cpu")
    text = "the hat in the hat in a hat"
    tuner = ours.fine_tuner(2, 16, optimizer=AdamW(lr=1e-2), lora=LoraConfig(rank=4, alpha=16.0))
    losses = tuner.fit_texts([text], steps=25)
    assert losses[-1] < 0.5 * losses[0], losses
    ids, labels = next_token_batch([ours.tokenizer.encode(text)] * 2, 16)
    tuned = tuner.loss(ids, labels)
    assert tuned < 0.5 * losses[0]
    tuner.save(tmp_path / "tuned")
    again = load_pretrained(tmp_path / "tuned", device="cpu")
    sequence = ours.tokenizer.encode(text)
    saved = load_transformers(tmp_path / "tuned")
    np.testing.assert_allclose(
        again.logits(sequence), reference_logits(saved, sequence), atol=1e-4, rtol=1e-4
    )
    tuner.apply()
    np.testing.assert_allclose(ours.logits(sequence), again.logits(sequence), atol=1e-5)
    assert again.tokenizer.encode_chat([{"role": "user", "content": "hi"}]) == (
        ours.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    )


def test_full_fine_tuning_from_gguf_uses_f32_master_weights(tmp_path):
    model = random_llama(seed=9)
    path = write_gguf(model, tmp_path / "q.gguf", {"proj": "Q4_1"})
    ours = load_pretrained(path, device="cpu")
    tuner = ours.fine_tuner(1, 12)
    params = tuner.session.parameters()
    assert all(v.dtype == np.float32 for v in params.values())
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(params[q], ours.weights[q].dequantize())
    losses = tuner.fit_texts(["the hat in the hat"], steps=8)
    assert losses[-1] < losses[0]


# -- the command line -----------------------------------------------------------------------


def test_generate_command_streams_only_the_generated_text(tmp_path, capsys):
    from meganeura.cli import main

    directory = save_hf(random_llama(seed=10), tmp_path)
    expected = load_pretrained(directory, device="cpu").generate("the hat", 8, greedy=True)
    args = ["--model", str(directory), "--device", "cpu", "--greedy", "--max-new-tokens", "8"]
    assert main(["generate", *args, "the hat"]) == 0
    out = capsys.readouterr()
    assert out.out == expected + "\n"
    assert "model:" in out.err
    chat = load_pretrained(directory, device="cpu").chat("the hat", 8, greedy=True)
    assert main(["generate", "--chat", *args, "the hat"]) == 0
    assert capsys.readouterr().out == chat + "\n"
    half = load_pretrained(directory, device="cpu", dtype="float16").generate(
        "the hat", 8, greedy=True
    )
    assert main(["generate", *args, "--dtype", "float16", "the hat"]) == 0
    assert capsys.readouterr().out == half + "\n"
    assert main(["generate", "--model", str(tmp_path / "missing"), "x"]) == 2
    assert "missing: no such model" in capsys.readouterr().err


def test_chat_command_keeps_the_conversation(tmp_path, capsys, monkeypatch):
    import io

    from meganeura.cli import main

    directory = save_hf(random_llama(seed=11), tmp_path)
    model = load_pretrained(directory, device="cpu")
    conversation = model.start_chat()
    greedy = Sampling(greedy=True)
    replies = ["".join(conversation.send(text, 6, greedy)) for text in ("the hat", "in a hat")]
    monkeypatch.setattr("sys.stdin", io.StringIO("the hat\nin a hat\n\n"))
    args = ["--model", str(directory), "--device", "cpu", "--greedy", "--max-new-tokens", "6"]
    assert main(["chat", *args]) == 0
    assert capsys.readouterr().out == "".join(r + "\n" for r in replies)
