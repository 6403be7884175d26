"""Training-step latency: meganeura against PyTorch on the same card, in one process.

Two workloads: the CI MLP (128 -> 64 -> 64 -> 10, batch 16, SGD) and a 2-layer pre-norm
transformer (the one the parity tests train; AdamW with gradient clipping). Each is timed two
ways, as medians over repeated runs after a warm-up:

- latency: one step including the batch upload and the readback of the loss (a host sync
  per step, as a loop that logs every step has);
- pipelined: steps queued back to back with no readback, then one sync; the time per step
  (as a loop that reads the loss every few hundred steps has).

PyTorch runs on CUDA when it is available, else on the CPU. Run it on the GPU machine:

    python bench/train.py [--device auto] [--runs 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import asdict

import numpy as np
from timing import median_ms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import meganeura as mn
import meganeura.functional as F
from meganeura.nn import MLP
from tests.models import GPTConfig, TorchGPT, gpt_loss, gpt_training_graph

MLP_SIZES = (128, 64, 64, 10)
MLP_BATCH = 16
MLP_LR = 0.01
GPT = GPTConfig(vocab=512, dim=256, heads=4, layers=2, context=128)
GPT_BATCH = 8
QUICK_GPT = GPTConfig(vocab=32, dim=32, heads=2, layers=2, context=16)  # --quick: a smoke run
GPT_LR, GPT_CLIP = 3e-4, 1.0
PIPELINED_STEPS = 20


# -- workloads: (build meganeura session, torch model and optimizer, batches) -----------------


def mlp_workload(rng):
    x = rng.standard_normal((MLP_BATCH, MLP_SIZES[0])).astype(np.float32)
    y = rng.integers(0, MLP_SIZES[-1], MLP_BATCH).astype(np.int32)

    def ours(device):
        g = mn.Graph()
        xi = g.input("x", (MLP_BATCH, MLP_SIZES[0]))
        yi = g.input("y", (MLP_BATCH,), "i32")
        logits = g.output("logits", MLP(g, "", MLP_SIZES)(xi))
        return mn.build(g, F.cross_entropy(logits, yi), mn.optim.SGD(lr=MLP_LR), device=device)

    def theirs(torch, initial):
        layers = []
        for i, (a, b) in enumerate(itertools.pairwise(MLP_SIZES)):
            layers += [torch.nn.ReLU()] if i else []
            layers.append(torch.nn.Linear(a, b))
        model = torch.nn.Sequential(*layers)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in initial.items()})
        return model, lambda params: torch.optim.SGD(params, lr=MLP_LR), None

    def torch_loss(torch, model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"].long())

    return "MLP 128-64-64-10, batch 16, SGD", {"x": x, "y": y}, ours, theirs, torch_loss


def gpt_workload(rng, config: GPTConfig):
    shape = (GPT_BATCH, config.context)
    batch = {
        "ids": rng.integers(0, config.vocab, shape).astype(np.int32),
        "targets": rng.integers(0, config.vocab, shape).astype(np.int32),
    }

    def ours(device):
        graph, loss = gpt_training_graph(config, GPT_BATCH)
        optimizer = mn.optim.AdamW(lr=GPT_LR, clip_grad_norm=GPT_CLIP)
        return mn.build(graph, loss, optimizer, device=device)

    def theirs(torch, initial):
        model = TorchGPT(config)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in initial.items()})
        return model, lambda params: torch.optim.AdamW(params, lr=GPT_LR), GPT_CLIP

    def torch_loss(torch, model, batch):
        return gpt_loss(model, batch)

    name = (
        f"transformer {config.layers} layers, dim {config.dim}, {config.heads} heads, "
        f"context {config.context}, vocab {config.vocab}, batch {GPT_BATCH}, AdamW + clipping"
    )
    return name, batch, ours, theirs, torch_loss


# -- timing --------------------------------------------------------------------------------


def time_ours(session, batch, runs, warmup):
    def latency():
        session.step(batch)
        session.loss  # noqa: B018 - reading the loss waits for the step

    def pipelined():
        for _ in range(PIPELINED_STEPS):
            session.step(batch)
        session.loss  # noqa: B018

    return (
        median_ms(latency, runs, warmup),
        median_ms(pipelined, max(3, runs // PIPELINED_STEPS), 1, PIPELINED_STEPS),
    )


def time_torch(torch, workload, initial, runs, warmup):
    _, batch, _, theirs, torch_loss = workload
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model, make_optimizer, clip = theirs(torch, initial)
    model = model.to(dev)
    opt = make_optimizer(model.parameters())
    host = {k: torch.from_numpy(v) for k, v in batch.items()}

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(torch, model, {k: v.to(dev) for k, v in host.items()})
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss

    def latency():
        step().item()

    def pipelined():
        for _ in range(PIPELINED_STEPS):
            loss = step()
        loss.item()

    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return (
        f"PyTorch {torch.__version__} on {name}",
        median_ms(latency, runs, warmup),
        median_ms(pipelined, max(3, runs // PIPELINED_STEPS), 1, PIPELINED_STEPS),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="meganeura device (default: auto)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--quick", action="store_true", help="a tiny transformer (smoke test)")
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be at least 3")

    rng = np.random.default_rng(0)
    workloads = [mlp_workload(rng), gpt_workload(rng, QUICK_GPT if args.quick else GPT)]
    results = []
    for workload in workloads:
        name, batch, ours, _, _ = workload
        session = ours(args.device)
        initial = session.parameters()
        latency, pipelined = time_ours(session, batch, args.runs, args.warmup)
        rows = [("meganeura", session.device, latency, pipelined)]
        if not args.no_torch:
            import torch

            rows.append(("pytorch", *time_torch(torch, workload, initial, args.runs, args.warmup)))
        print(f"\n{name}; medians (ms per step)")
        print(f"{'':10} {'latency':>9} {'pipelined':>10}  device")
        for framework, device, lat, pipe in rows:
            print(f"{framework:10} {lat:9.3f} {pipe:10.3f}  {device}")
            results.append(
                {
                    "workload": name,
                    "framework": framework,
                    "device": device,
                    "step_latency_ms": lat,
                    "pipelined_step_ms": pipe,
                }
            )
        if len(rows) == 2:
            (_, _, l0, p0), (_, _, l1, p1) = rows
            print(f"{'ratio':10} {l1 / l0:8.2f}x {p1 / p0:9.2f}x  (PyTorch time / meganeura time)")
    if args.json:
        config = {
            "mlp": {"sizes": MLP_SIZES, "batch": MLP_BATCH, "lr": MLP_LR},
            "transformer": {**asdict(QUICK_GPT if args.quick else GPT), "batch": GPT_BATCH},
            "runs": args.runs,
            "warmup": args.warmup,
            "pipelined_steps": PIPELINED_STEPS,
        }
        with open(args.json, "w") as out:
            json.dump({"config": config, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
