"""Latency of a small MLP (128 -> 64 -> 64 -> 10, batch 16): meganeura against PyTorch.

Forward pass and SGD train step, each including the input upload and the readback of the
output (logits, or the loss), timed as medians over repeated runs after a warm-up, in one
process. PyTorch runs on CUDA when it is available, else on the CPU.

    python bench/mlp_latency.py [--device auto] [--runs 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
from timing import median_ms

import meganeura as mn
import meganeura.functional as F
from meganeura.nn import MLP

SIZES = (128, 64, 64, 10)
BATCH = 16
LR = 0.01


def build_ours(device: str):
    g = mn.Graph()
    x = g.input("x", (BATCH, SIZES[0]))
    y = g.input("y", (BATCH,), "i32")
    logits = g.output("logits", MLP(g, "", SIZES)(x))
    loss = F.cross_entropy(logits, y)
    train = mn.build(g, loss=loss, optimizer=mn.optim.SGD(lr=LR), device=device)
    infer = mn.build(g, device=device)
    infer.set_parameters(train.parameters())
    return train, infer


def bench_ours(device: str, x, y, runs, warmup):
    train, infer = build_ours(device)

    def forward():
        infer.run({"x": x})["logits"]

    def step():
        train.step({"x": x, "y": y})
        train.loss  # noqa: B018 - reading the loss waits for the step

    return train.device, median_ms(forward, runs, warmup), median_ms(step, runs, warmup)


def bench_torch(x, y, runs, warmup):
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()

    def forward():
        with torch.no_grad():
            model(xt.to(dev)).cpu().numpy()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(xt.to(dev)), yt.to(dev))
        loss.backward()
        opt.step()
        loss.item()

    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    return (
        f"PyTorch {torch.__version__} on {name}",
        median_ms(forward, runs, warmup),
        median_ms(step, runs, warmup),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="meganeura device (default: auto)")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    args = parser.parse_args()
    if args.runs < 10:
        parser.error("--runs must be at least 10")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[-1], BATCH).astype(np.int32)
    rows = [("meganeura", *bench_ours(args.device, x, y, args.runs, args.warmup))]
    if not args.no_torch:
        rows.append(("pytorch", *bench_torch(x, y, args.runs, args.warmup)))

    print(f"MLP {'-'.join(map(str, SIZES))}, batch {BATCH}; median of {args.runs} runs (ms)")
    print(f"{'':10} {'forward':>9} {'SGD step':>9}  device")
    for name, device, fwd, step in rows:
        print(f"{name:10} {fwd:9.3f} {step:9.3f}  {device}")
    if len(rows) == 2:
        (_, _, f0, s0), (_, _, f1, s1) = rows
        print(f"{'ratio':10} {f1 / f0:8.2f}x {s1 / s0:8.2f}x  (PyTorch time / meganeura time)")
    if args.json:
        results = [
            {"framework": n, "device": d, "forward_ms": f, "train_step_ms": s}
            for n, d, f, s in rows
        ]
        config = {"sizes": SIZES, "batch": BATCH, "runs": args.runs, "warmup": args.warmup}
        with open(args.json, "w") as out:
            json.dump({"config": config, "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
