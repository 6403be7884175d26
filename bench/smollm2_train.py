"""SmolLM2-135M training step with and without the e-graph optimizer, against PyTorch.

Random weights of the real configuration; batch B x T tokens; AdamW. For each of meganeura
with `optimize=True` and `optimize=False`: the kernels per step, the build time, and the
median step time (batch upload, forward, backward, update and the loss readback), after a
warm-up. PyTorch eager fp32 (transformers' LlamaForCausalLM, same configuration) runs in the
same process on CUDA when it is available.

    python bench/smollm2_train.py [--device auto] [--batch 1] [--seq 32] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from timing import median_ms

import meganeura as mn
from meganeura.graph import Graph
from meganeura.models.smollm2 import SMOLLM2_135M, Llama, training_loss


def batch_arrays(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, SMOLLM2_135M.vocab_size, (batch, seq + 1)).astype(np.int32)
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def bench_ours(device: str, optimize: bool, batch: int, seq: int, runs: int) -> dict:
    start = time.perf_counter()
    graph = Graph()
    loss = training_loss(Llama(graph, SMOLLM2_135M), batch, seq)
    session = mn.build(graph, loss, mn.optim.AdamW(1e-4), device=device, optimize=optimize)
    feeds = batch_arrays(batch, seq)
    session.step(feeds)
    first_loss = session.loss
    build_s = time.perf_counter() - start
    kernels = session.kernel_count

    def step():
        session.step(feeds)
        session.loss  # noqa: B018 - reading the loss waits for the step

    return {
        "framework": f"meganeura optimize={optimize}",
        "device": session.device,
        "kernels_per_step": kernels,
        "build_s": build_s,
        "first_loss": first_loss,
        "step_ms": median_ms(step, runs),
    }


def bench_torch(batch: int, seq: int, runs: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    config = LlamaConfig(**SMOLLM2_135M.to_hf_config())
    model = LlamaForCausalLM(config).to(dev).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    arrays = batch_arrays(batch, seq)
    ids = torch.from_numpy(arrays["input_ids"]).long()
    labels = torch.from_numpy(arrays["labels"]).long()

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=ids.to(dev)).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.to(dev).flatten())
        loss.backward()
        opt.step()
        loss.item()

    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return {
        "framework": f"PyTorch {torch.__version__} eager fp32",
        "device": name,
        "step_ms": median_ms(step, runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    rows = [bench_ours(args.device, opt, args.batch, args.seq, args.runs) for opt in (True, False)]
    if not args.no_torch:
        rows.append(bench_torch(args.batch, args.seq, args.runs))
    print(f"SmolLM2-135M training step, batch {args.batch} x {args.seq} tokens, AdamW (ms)")
    for row in rows:
        extra = (
            f"  kernels {row['kernels_per_step']:5d}  build {row['build_s']:.1f} s"
            if "kernels_per_step" in row
            else ""
        )
        print(f"{row['framework']:34} {row['step_ms']:9.2f}{extra}  {row['device']}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"config": vars(args), "results": rows}, out, indent=2)


if __name__ == "__main__":
    main()
