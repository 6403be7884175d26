"""Where a language model's decode and prefill time goes: the device time of a step (its
kernels run several times over in one compute pass), GPU time per kernel (timestamp queries,
each kernel in a pass of its own, which adds that pass's cost), grouped by kernel kind,
against the wall-clock time of a token and the host's share of it (encoding and submitting
the kernels, waiting for the logits).

    python bench/llm_profile.py [--device gpu] [--layers 30] [--quantized] [--top 25]
                                [--precision highest|high]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import time

import numpy as np
from llm import CONTEXT, PREFILL, quantize_projections, random_weights
from timing import median_ms

from meganeura.generation import LanguageModel
from meganeura.models.smollm2 import SMOLLM2_135M


def kind_of(label: str) -> str:
    """'matmul%12+add%13' -> 'matmul+add': the fused ops without their node ids."""
    return re.sub(r"%\d+", "", label)


def report(title: str, kernels, wall_ms: float, top: int) -> None:
    total = sum(us for _, _, us in kernels)
    print(
        f"\n{title}: {len(kernels)} kernels, GPU {total / 1e3:.3f} ms (sum of kernels, each "
        f"timed in a compute pass of its own), wall {wall_ms:.3f} ms"
    )
    groups = collections.defaultdict(lambda: [0, 0.0, set()])
    for label, grid, us in kernels:
        g = groups[kind_of(label)]
        g[0] += 1
        g[1] += us
        g[2].add(grid)
    rows = sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]
    for kind, (count, us, grids) in rows:
        grid = ",".join(str(g) for g in sorted(grids)[:2])
        print(f"  {us / 1e3:7.3f} ms {count:4d}x {us / count:7.1f} us  {kind[:70]:70s} {grid}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--layers", type=int, default=SMOLLM2_135M.num_hidden_layers)
    parser.add_argument("--quantized", action="store_true")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--precision", default="highest", choices=("highest", "high"))
    args = parser.parse_args()
    config = dataclasses.replace(SMOLLM2_135M, num_hidden_layers=args.layers)
    weights = random_weights(config)
    if args.quantized:
        weights = quantize_projections(weights)
    model = LanguageModel(
        config,
        weights,
        None,
        args.device,
        keep_quantized=args.quantized,
        matmul_precision=args.precision,
    )
    engine = model.engine(1, CONTEXT)
    session = engine.session
    prompt = np.arange(PREFILL, dtype=np.int32)[None] % config.vocab_size
    one = np.ones((1, 1), bool)
    engine.feed(prompt)
    engine.feed(np.array([[1]]))
    print(f"{session.device}; {args.layers} layers")

    def decode():
        if engine.length >= engine.capacity - 1:
            engine.rewind(PREFILL)
        engine.feed(np.array([[7]]))

    decode_ms = median_ms(decode, args.runs)
    feeds, name = engine.chunk_inputs(np.array([[7]], np.int32), one)
    program = session._run((session.graph.outputs[name],), "forward", feeds)
    default = program.first_chunk
    for chunk in (None, 4, 8, 16, 32):
        program.first_chunk, program._next = chunk, None
        chunked = median_ms(decode, args.runs)
        print(f"decode, first command buffer of {chunk or 'all'} kernels: {chunked:.3f} ms")
    program.first_chunk, program._next = default, None
    # The host's part: preparing inputs, encoding and submitting, then waiting for the read.
    prepare, submit, wait = [], [], []
    for _ in range(args.runs):
        if engine.length >= engine.capacity - 1:
            engine.rewind(PREFILL)
        t0 = time.perf_counter()
        feeds, name = engine.chunk_inputs(np.array([[7]], np.int32), one)
        t1 = time.perf_counter()
        program = session._run((session.graph.outputs[name],), "forward", feeds)
        t2 = time.perf_counter()
        program.read(session.graph.outputs[name])
        t3 = time.perf_counter()
        engine.length += 1
        prepare.append(t1 - t0)
        submit.append(t2 - t1)
        wait.append(t3 - t2)
    ms = lambda xs: 1e3 * float(np.median(xs))  # noqa: E731
    print(
        f"decode {decode_ms:.3f} ms/token: inputs {ms(prepare):.3f} ms, encode+submit "
        f"{ms(submit):.3f} ms, wait+read {ms(wait):.3f} ms"
    )
    # The host's share of a run: encoding the commands (done ahead, while the device works)
    # and submitting them (where Dawn records the backend's command buffer).
    encode, submit_only, latency = [], [], []
    queue = session.executor.device.queue
    for _ in range(args.runs):
        t0 = time.perf_counter()
        commands = program._encode()
        t1 = time.perf_counter()
        queue.submit(commands)
        t2 = time.perf_counter()
        program._fresh = set(program.staging)
        program.read(session.graph.outputs[name])
        t3 = time.perf_counter()
        encode.append(t1 - t0)
        submit_only.append(t2 - t1)
        latency.append(t3 - t1)
    print(
        f"encode {ms(encode):.3f} ms, submit {ms(submit_only):.3f} ms, submit to logits read "
        f"{ms(latency):.3f} ms ({len(program.dispatches)} kernels)"
    )
    # Back-to-back submissions without reading: the device's own rate.
    n = 20
    engine.rewind(PREFILL)
    feeds, name = engine.chunk_inputs(np.array([[7]], np.int32), one)
    t0 = time.perf_counter()
    for _ in range(n):
        program = session._run((session.graph.outputs[name],), "forward", feeds)
    program.read(session.graph.outputs[name])
    print(
        f"decode, {n} submissions then one read: {1e3 * (time.perf_counter() - t0) / n:.3f} ms each"
    )
    engine.rewind(PREFILL)
    feeds, name = engine.chunk_inputs(np.array([[7]], np.int32), one)
    print(f"decode, device time of a step: {session.device_time(feeds, [name]) / 1e3:.3f} ms")
    report("decode", session.profile(feeds, [name]), decode_ms, args.top)

    def prefill():
        engine.reset()
        engine.feed(prompt)

    prefill_ms = median_ms(prefill, args.runs)
    engine.reset()
    feeds, name = engine.chunk_inputs(prompt, np.ones(prompt.shape, bool))
    print(f"\nprefill {PREFILL}, device time: {session.device_time(feeds, [name], 5) / 1e3:.3f} ms")
    report(f"prefill {PREFILL}", session.profile(feeds, [name]), prefill_ms, args.top)


if __name__ == "__main__":
    main()
