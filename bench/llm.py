"""Language-model latency: SmolLM2-135M's configuration with random weights, meganeura against
PyTorch eager and Hugging Face generate in the same process.

Measured (medians after a warm-up): building the inference engine (weights uploaded, the
decode and 128-token prefill programs compiled and run once), decode per token with f32
weights and with Q4_1 weights kept quantized (one token through the model against the KV cache,
the next-token logits read back), greedy generation per token (128 tokens after the prompt,
each chosen on the device and fed to the next step there, the host a step behind reading the
token ids: what `generate(..., greedy=True)` runs), and a 128-token prefill. PyTorch runs on
CUDA when available; its decode is Hugging Face's greedy generate per token.

    python bench/llm.py [--device auto] [--runs 30] [--layers 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from timing import median_ms

from meganeura.generation import LanguageModel
from meganeura.io.gguf import QuantizedWeight
from meganeura.models.smollm2 import SMOLLM2_135M, LlamaConfig, parameter_shapes

PREFILL = 128
GENERATE = 128  # greedy tokens per timed generation
CONTEXT = 512
WARMUP = 100


def random_weights(config: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (
            np.ones(shape) if name.endswith("norm.weight") else rng.normal(0, 0.02, shape)
        ).astype(np.float32)
        for name, shape in parameter_shapes(config).items()
    }


def quantize_projections(weights: dict[str, np.ndarray], qtype: str = "Q4_1"):
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    return {
        name: QuantizedWeight(qtype, w.shape, gguf.quantize(w, kind)) if w.ndim == 2 else w
        for name, w in weights.items()
    }


def bench_ours(config, weights, device, runs, quantized, precision="highest"):
    model = LanguageModel(
        config, weights, None, device, keep_quantized=quantized, matmul_precision=precision
    )
    start = time.perf_counter()
    engine = model.engine(1, CONTEXT)
    prompt = np.arange(PREFILL, dtype=np.int32)[None] % config.vocab_size
    engine.feed(prompt)
    engine.feed(np.array([[1]]))
    build_s = time.perf_counter() - start

    def prefill():
        engine.reset()
        engine.feed(prompt)

    def decode():
        if engine.length >= engine.capacity - 1:
            engine.rewind(PREFILL)
        engine.feed(np.array([[7]]))

    # A long warm-up: on a GPU that has just started, the first second of work runs slowly
    # (measured on an H200: a 128-token prefill at 13-15 ms, then 4.9 ms).
    prefill_ms = median_ms(prefill, runs, warmup=WARMUP)
    engine.reset()
    engine.feed(prompt)
    decode_ms = median_ms(decode, runs, warmup=WARMUP)
    result = {"build_s": build_s, "prefill_ms": prefill_ms, "decode_ms": decode_ms}
    if engine.pipelines:

        def generate():  # greedy, the next token chosen and fed on the device
            engine.rewind(PREFILL)
            done = np.zeros(1, bool)
            for _ in engine.greedy(np.array([7], np.int32), GENERATE, [], done):
                pass

        result["generate_ms"] = median_ms(generate, max(3, runs // 5), warmup=2) / GENERATE
    return result, engine.device


def bench_torch(config, weights, runs):
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = LlamaForCausalLM(HFConfig(**config.to_hf_config())).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    model = model.to(device)
    prompt = torch.arange(PREFILL, device=device)[None] % config.vocab_size

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def prefill():
        with torch.no_grad():
            model(prompt)
        sync()

    new = 32

    def generate():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        sync()

    prefill_ms = median_ms(prefill, runs)
    generate_ms = median_ms(generate, max(3, runs // 5), warmup=1)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {"prefill_ms": prefill_ms, "decode_ms": (generate_ms - prefill_ms) / new}, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M.num_hidden_layers)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--high", action="store_true", help='also f32 weights under matmul_precision="high"'
    )
    args = parser.parse_args()
    config = dataclasses.replace(SMOLLM2_135M, num_hidden_layers=args.layers)
    weights = random_weights(config)
    results = {}
    results["f32"], device = bench_ours(config, weights, args.device, args.runs, False)
    q4 = quantize_projections(weights)
    results["q4_1"], _ = bench_ours(config, q4, args.device, args.runs, True)
    if args.high:
        results["f32_high"], _ = bench_ours(config, weights, args.device, args.runs, False, "high")
    if not args.no_torch:
        results["torch"], results["torch_device"] = bench_torch(config, weights, args.runs)
    results["device"] = device
    print(f"meganeura on {device}; {args.layers} layers, SmolLM2-135M shapes")
    for key in ("f32", "q4_1", "f32_high"):
        if key not in results:
            continue
        r = results[key]
        greedy = ""
        if "generate_ms" in r:
            greedy = f", greedy generation {r['generate_ms']:.2f} ms/token"
        print(
            f"  {key:8s} build {r['build_s']:.2f} s, prefill {PREFILL} {r['prefill_ms']:.2f} ms, "
            f"decode {r['decode_ms']:.2f} ms/token{greedy}"
        )
    if "torch" in results:
        t = results["torch"]
        print(
            f"  torch eager on {results['torch_device']}: prefill {t['prefill_ms']:.2f} ms "
            f"({t['prefill_ms'] / results['f32']['prefill_ms']:.1f}x ours), HF generate "
            f"{t['decode_ms']:.2f} ms/token ({t['decode_ms'] / results['f32']['decode_ms']:.1f}x)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
