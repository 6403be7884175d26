"""Language-model latency: SmolLM2-135M's configuration with random weights, meganeura against
PyTorch eager and Hugging Face generate in the same process.

Measured (medians after a warm-up): building the inference engine (weights uploaded, the
decode and 128-token prefill programs compiled and run once), decode per token with f32
weights and with Q4_1 weights kept quantized (one token through the model against the KV cache,
the next-token logits read back), greedy generation per token (128 tokens after the prompt,
each chosen on the device and fed to the next step there, the host a step behind reading the
token ids: what `generate(..., greedy=True)` runs), and a 128-token prefill. PyTorch runs on
CUDA when available; its decode is Hugging Face's greedy generate per token.

    python bench/llm.py [--device auto] [--runs 60] [--rounds 5] [--layers 30] [--json out.json]

The formats are measured in turn, several rounds over (medians over rounds, ranges in
brackets), so a host or GPU whose speed drifts during the run weighs on every format alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
from timing import median_ms, write_json

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


class Ours:
    """One inference engine (f32 or Q4_1 weights) and its timed steps; building it (weights
    uploaded, the decode and 128-token prefill programs compiled and run once) is timed."""

    def __init__(self, config, weights, device, quantized, precision="highest", dtype="float32"):
        model = LanguageModel(
            config,
            weights,
            None,
            device,
            keep_quantized=quantized,
            matmul_precision=precision,
            dtype=dtype,
        )
        start = time.perf_counter()
        self.engine = engine = model.engine(1, CONTEXT)
        self.prompt = np.arange(PREFILL, dtype=np.int32)[None] % config.vocab_size
        engine.feed(self.prompt)
        engine.feed(np.array([[1]]))
        self.build_s = time.perf_counter() - start
        self.model = model

    def prefill(self):
        self.engine.reset()
        self.engine.feed(self.prompt)

    def decode(self):
        if self.engine.length >= self.engine.capacity - 1:
            self.engine.rewind(PREFILL)
        self.engine.feed(np.array([[7]]))

    def generate(self):  # greedy, the next token chosen and fed on the device
        self.engine.rewind(PREFILL)
        done = np.zeros(1, bool)
        for _ in self.engine.greedy(np.array([7], np.int32), GENERATE, [], done):
            pass

    def round(self, runs: int) -> dict[str, float]:
        """One round of measurements (medians of `runs` calls; greedy: of fewer)."""
        out = {"prefill_ms": median_ms(self.prefill, runs)}
        self.engine.reset()
        self.engine.feed(self.prompt)
        out["decode_ms"] = median_ms(self.decode, runs)
        if self.engine.pipelines:
            out["generate_ms"] = median_ms(self.generate, max(3, runs // 5), 1) / GENERATE
        return out

    def device_ms(self) -> dict[str, float]:
        """Device time of a decoding step and of a prefill (their kernels run several times
        over in one compute pass, timestamps around it), where the GPU offers timestamps."""
        session = self.engine.session
        gpu = getattr(session.executor, "gpu", None)  # None: the NumPy executor
        if gpu is None or "timestamp-query" not in gpu.features:
            return {}
        out = {}
        for key, ids in (("decode_device_ms", np.array([[7]])), ("prefill_device_ms", self.prompt)):
            self.engine.reset()
            if ids.shape[1] == 1:
                self.engine.feed(self.prompt)
            feeds, name = self.engine.chunk_inputs(ids.astype(np.int32), np.ones(ids.shape, bool))
            out[key] = min(session.device_time(feeds, [name], 5) for _ in range(3)) / 1e3
        self.engine.reset()
        return out


def bench_ours(engines: dict[str, Ours], runs: int, rounds: int) -> dict[str, dict]:
    """Every engine measured in turn, `rounds` times over (the order rotating each round), so
    that a host or GPU whose speed drifts during the run weighs on every format alike; each
    value is the median over rounds, with its range."""
    # A long warm-up: on a GPU that has just started, the first second of work runs slowly
    # (measured on an H200: a 128-token prefill at 13-15 ms, then 4.9 ms).
    for ours in engines.values():
        for _ in range(WARMUP):
            ours.prefill()
            ours.decode()
    names = list(engines)
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            for key, value in engines[name].round(runs).items():
                samples[name].setdefault(key, []).append(value)
    results = {}
    for name, ours in engines.items():
        results[name] = {"build_s": ours.build_s}
        for key, values in samples[name].items():
            results[name][key] = statistics.median(values)
            results[name][key.replace("_ms", "_range_ms")] = [min(values), max(values)]
    return results


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


def _value(r: dict, name: str) -> str:
    """A measured median with its range over rounds."""
    low, high = r[f"{name}_range_ms"]
    return f"{r[f'{name}_ms']:.2f} ({low:.2f}-{high:.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", type=int, default=60, help="timed calls per format")
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the formats")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M.num_hidden_layers)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument(
        "--high", action="store_true", help='also f32 weights under matmul_precision="high"'
    )
    args = parser.parse_args()
    config = dataclasses.replace(SMOLLM2_135M, num_hidden_layers=args.layers)
    weights = random_weights(config)
    engines = {
        "f32": Ours(config, weights, args.device, False),
        "q4_1": Ours(config, quantize_projections(weights), args.device, True),
        "f16": Ours(config, weights, args.device, False, dtype="float16"),
    }
    if args.high:
        engines["f32_high"] = Ours(config, weights, args.device, False, "high")
    device = engines["f32"].engine.device
    results = bench_ours(engines, max(1, args.runs // args.rounds), args.rounds)
    for name, ours in engines.items():
        results[name].update(ours.device_ms())
    del engines
    if not args.no_torch:
        results["torch"], results["torch_device"] = bench_torch(config, weights, args.runs)
    results["device"] = device
    print(f"meganeura on {device}; {args.layers} layers, SmolLM2-135M shapes")
    for key in ("f32", "q4_1", "f16", "f32_high"):
        if key not in results:
            continue
        r = results[key]
        greedy = ""
        if "generate_ms" in r:
            greedy = f", greedy generation {_value(r, 'generate')} ms/token"
        print(
            f"  {key:8s} build {r['build_s']:.2f} s, prefill {PREFILL} {_value(r, 'prefill')} ms, "
            f"decode {_value(r, 'decode')} ms/token{greedy}"
        )
        if "decode_device_ms" in r:
            print(
                f"  {'':8s} device time: prefill {r['prefill_device_ms']:.3f} ms, "
                f"decoding step {r['decode_device_ms']:.3f} ms"
            )
    if "torch" in results:
        t = results["torch"]
        print(
            f"  torch eager on {results['torch_device']}: prefill {t['prefill_ms']:.2f} ms "
            f"({t['prefill_ms'] / results['f32']['prefill_ms']:.1f}x ours), HF generate "
            f"{t['decode_ms']:.2f} ms/token ({t['decode_ms'] / results['f32']['decode_ms']:.1f}x)"
        )
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
