"""Kernel benchmarks on a GPU: each generated kernel against PyTorch on the same card.

    python bench/ops.py [--json results.json] [--only NAME ...]
    python bench/ops.py --prefill [--sweep]    # SmolLM2-135M's products: prefill and decode

Our kernels are timed on the device: N repetitions of a program's dispatches recorded in one
compute pass with timestamps at its beginning and end (without timestamp-query: the wall-clock
time of recording, submitting and waiting, which adds the host's 5-8 us per dispatch); N is
chosen so one measurement takes about 50 ms, and the median of several measurements is
reported, after the card has run for two seconds (its clocks rise under load). PyTorch is
timed with CUDA events the same way. Inputs are random; each benchmark also reports the
relative error of our result against PyTorch's (Frobenius norm). Rates: matmuls and attention
in TFLOP/s (attention counts the causal half: fwd 2 B H T^2 D, bwd 2.5x that), GEMV and copies
in GB/s (copies count bytes read plus written).

--prefill times the f32 products of SmolLM2-135M (nn.Linear weights, x @ W^T): a 128-token
prefill (M = 128) and a decoding step (M = 1, plus the tied lm_head), with the residual add
fused where the model has one (torch: addmm). As in a model, every product reads its own
weights from device memory: a run rotates over copies of the weights worth more than the
card's L2, and each product depends on the one before (outputs are rewritten, so WebGPU puts
a barrier between dispatches; CUDA runs a stream in order). --sweep adds every tile shape of
the SIMT kernel for the prefill products and every GEMV workgroup width for the decoding ones.

attention_decode and attention_prefill time SmolLM2-135M's attention against its 512-slot KV
cache (masked, GQA 9/3): in GB/s of K and V read, and in TFLOP/s over all slots; `blocks_s`
is the time of the 64-query block forward on the same inputs, the kernel these shapes ran
before the few-rows forward.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from unittest import mock

import numpy as np
import torch
from timing import write_json

from meganeura import Graph, build
from meganeura.backends.webgpu.runtime import _record
from meganeura.backends.wgsl import attention_rows, matmul_direct, matmul_simt
from meganeura.backends.wgsl import matmul as wgsl_matmul
from meganeura.backends.wgsl.kernels import generate
from meganeura.ops.attention import attention
from meganeura.ops.packed import segment

TARGET_SECONDS = 0.05
REPEATS = 7
GEMV_COPIES = 4  # 4 x 64 MiB of weights: more than an H100's or H200's L2
ROTATED_BYTES = 256 << 20  # weights an LLM benchmark rotates over: several times the L2
# SmolLM2-135M's products (N, K, residual added in the store), hidden size 576.
LLM_PRODUCTS = {
    "qkv": (960, 576, False),
    "o_proj + residual": (576, 576, True),
    "gate_up": (3072, 576, False),
    "down + residual": (576, 1536, True),
}
LLM_HEAD = (49152, 576)
PREFILL_ROWS = 128
# --smoke runs every benchmark at toy sizes on whatever devices there are, to check the
# script itself before spending time on a GPU.
SETTINGS = {"device": "gpu", "torch": "cuda", "size": 4096, "seq": 2048, "llm_scale": 1}


def time_program(program, repeats: int = REPEATS) -> float:
    """Seconds of device time per run of a compiled program's dispatches (inputs already
    uploaded): runs recorded over and over in one compute pass, timestamps at its beginning
    and end, as CUDA events time PyTorch's stream. Without timestamp-query, the wall-clock
    time of recording, submitting and waiting, which also counts the host's recording of
    each dispatch (5-8 us in Python, more than a small kernel takes)."""
    if "timestamp-query" in program.executor.gpu.features:

        def batch(n: int) -> float:
            return program.device_time({}, n) * n / 1e6

    else:
        device = program.executor.device
        probe = next(iter(program.buffers.values()))

        def batch(n: int) -> float:
            start = time.perf_counter()
            encoder = device.create_command_encoder()
            cpass = encoder.begin_compute_pass()
            _record(cpass, program.dispatches * n)
            cpass.end()
            device.queue.submit([encoder.finish()])
            device.queue.read_buffer(probe, 0, 4)
            return time.perf_counter() - start

    batch(2)
    n = max(3, int(TARGET_SECONDS / max(batch(1), 1e-6)))
    return statistics.median(batch(n) / n for _ in range(repeats))


def warm_up(seconds: float = 2.0) -> None:
    """Keeps the card busy for `seconds` so that the first benchmark runs at working clocks."""
    if SETTINGS["torch"] != "cuda":
        return
    x = torch.randn(4096, 4096, device="cuda")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            x @ x
        torch.cuda.synchronize()


def time_copy(executor, nbytes: int, repeats: int = REPEATS) -> float:
    device = executor.device
    src, dst = executor.buffer(nbytes, "src"), executor.buffer(nbytes, "dst")

    def batch(n: int) -> float:
        start = time.perf_counter()
        encoder = device.create_command_encoder()
        for _ in range(n):
            encoder.copy_buffer_to_buffer(src, 0, dst, 0, nbytes)
        device.queue.submit([encoder.finish()])
        device.queue.read_buffer(dst, 0, 4)
        return time.perf_counter() - start

    batch(2)
    n = max(3, int(TARGET_SECONDS / max(batch(1), 1e-6)))
    return statistics.median(batch(n) / n for _ in range(repeats))


def time_torch(fn, repeats: int = REPEATS) -> float:
    for _ in range(3):
        fn()
    if SETTINGS["torch"] == "cpu":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    torch.cuda.synchronize()

    def batch(n: int) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3

    n = max(3, int(TARGET_SECONDS / max(batch(1), 1e-6)))
    return statistics.median(batch(n) / n for _ in range(repeats))


def rel_err(got: np.ndarray, want: torch.Tensor) -> float:
    want = want.detach().double().cpu().numpy()
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


def program_for(session, outputs):
    """A session's forward program for `outputs`, fed once; returns it and its outputs."""
    return session._program(tuple(session.graph.outputs[n] for n in outputs), "forward")[0]


def run(program, feeds: dict[str, np.ndarray], session, outputs):
    """Runs a program of `session` on named inputs and reads named outputs (by the session's
    graph, whose node ids the optimizer may have changed)."""
    graph = session.graph
    program.run({graph.inputs[n]: np.ascontiguousarray(v) for n, v in feeds.items()})
    return {n: program.read(graph.outputs[n]) for n in outputs}


# -- benchmarks ---------------------------------------------------------------------------------


def bench_copy(ctx):
    """Device-to-device copies: PyTorch's (the ceiling GEMV is measured against), WebGPU's
    copy_buffer_to_buffer, and a generated pointwise kernel (y = 2 x)."""
    nbytes = 1 << 29 if SETTINGS["size"] >= 4096 else 1 << 20
    src = torch.empty(nbytes // 4, device=SETTINGS["torch"])
    dst = torch.empty_like(src)
    theirs = time_torch(lambda: dst.copy_(src))
    ctx["copy_gbs"] = 2 * nbytes / theirs / 1e9
    g = Graph()
    g.output("y", g.input("x", (nbytes // 4,)) * 2.0)
    session = build(g, device=SETTINGS["device"])
    program = program_for(session, ["y"])
    run(program, {"x": np.ones(nbytes // 4, np.float32)}, session, ["y"])
    pointwise = time_program(program)
    ctx["copy_extra"] = {
        "webgpu_copy_buffer_to_buffer_gbs": 2 * nbytes / time_copy(ctx["executor"], nbytes) / 1e9,
        "pointwise_kernel_gbs": 2 * nbytes / pointwise / 1e9,
    }
    return dict(
        name="copy (ours: y = 2x kernel)",
        shape=f"{nbytes >> 20} MiB",
        ours_s=pointwise,
        torch_s=theirs,
        work=2 * nbytes,
        unit="GB/s",
        target="(torch's is the ceiling)",
        **ctx["copy_extra"],
    )


def _matmul_case(ctx, name, M, K, N, dtype, precision, trans_b=False, target=""):
    """One matmul; a GEMV rotates over several weights, whose total is larger than the
    card's L2, so that repeated runs read device memory rather than the cache."""
    rng = np.random.default_rng(0)
    np_dtype = np.float16 if dtype == "f16" else np.float32
    gemv = M <= 8
    copies = GEMV_COPIES if gemv else 1
    a = rng.standard_normal((M, K)).astype(np_dtype)
    bs = [
        rng.standard_normal((N, K) if trans_b else (K, N)).astype(np_dtype) for _ in range(copies)
    ]
    g = Graph()
    ta = g.input("a", a.shape, dtype)
    for i, b in enumerate(bs):
        g.output(
            f"y{i}", g.apply("matmul", [ta, g.input(f"b{i}", b.shape, dtype)], trans_b=trans_b)
        )
    outputs = [f"y{i}" for i in range(copies)]
    session = build(g, device=SETTINGS["device"], matmul_precision=precision)
    program = program_for(session, outputs)
    got = run(program, {"a": a, **{f"b{i}": b for i, b in enumerate(bs)}}, session, outputs)
    ours = time_program(program) / copies
    tdt = torch.float16 if dtype == "f16" else torch.float32
    xa = torch.tensor(a, device=SETTINGS["torch"], dtype=tdt)
    xbs = [torch.tensor(b, device=SETTINGS["torch"], dtype=tdt) for b in bs]
    xbs = [xb.T if trans_b else xb for xb in xbs]
    theirs = time_torch(lambda: [xa @ xb for xb in xbs]) / copies
    err = rel_err(got["y0"], xa.double() @ xbs[0].double())
    work = (a.nbytes + bs[0].nbytes + M * N * a.itemsize) if gemv else 2 * M * N * K
    wgsl = [generate(program.plan, k).wgsl for k in program.plan.kernels]
    return dict(
        name=name,
        shape=f"{M}x{K}x{N} {dtype}" + (" (B^T)" if trans_b else ""),
        ours_s=ours,
        torch_s=theirs,
        work=work,
        unit="GB/s" if gemv else "TFLOP/s",
        err=err,
        target=target,
        matrix_units=any("subgroupMatrix" in text for text in wgsl),
    )


def bench_matmul_f32(ctx):
    n = SETTINGS["size"]
    return _matmul_case(ctx, "matmul f32", n, n, n, "f32", "highest", target=">= 20")


def bench_matmul_high(ctx):
    n = SETTINGS["size"]
    return _matmul_case(ctx, "matmul f32 high (f16 units)", n, n, n, "f32", "high", target=">= 150")


def bench_matmul_f16(ctx):
    n = SETTINGS["size"]
    return _matmul_case(ctx, "matmul f16->f32", n, n, n, "f16", "highest", target=">= 150")


def bench_gemv(ctx):
    n = SETTINGS["size"]
    row = _matmul_case(ctx, "gemv f32 (x W^T)", 1, n, n, "f32", "highest", trans_b=True)
    if "copy_gbs" in ctx:
        row["target"] = f">= {0.7 * ctx['copy_gbs']:.0f} (70% torch copy)"
        row["fraction_of_copy"] = row["work"] / row["ours_s"] / 1e9 / ctx["copy_gbs"]
    return row


def bench_gemv_columns(ctx):
    n = SETTINGS["size"]
    return _matmul_case(ctx, "gemv f32 (x W)", 1, n, n, "f32", "highest")


def _attention_inputs(B, H, T, D):
    rng = np.random.default_rng(0)
    return [rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(4)]


def _causal_flops(B, H, T, D):
    return 4 * B * H * T * T * D / 2


def bench_attention_fwd(ctx, B=1, H=16, D=64, precision="highest"):
    T = SETTINGS["seq"]
    q, k, v, _ = _attention_inputs(B, H, T, D)
    g = Graph()
    tq, tk, tv = (g.input(n, a.shape) for n, a in (("q", q), ("k", k), ("v", v)))
    g.output("o", attention(tq, tk, tv, causal=True))
    session = build(g, device=SETTINGS["device"], matmul_precision=precision)
    program = program_for(session, ["o"])
    got = run(program, {"q": q, "k": k, "v": v}, session, ["o"])["o"]
    ours = time_program(program)
    xq, xk, xv = (torch.tensor(a, device=SETTINGS["torch"]) for a in (q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    theirs = time_torch(lambda: sdpa(xq, xk, xv, is_causal=True))
    err = rel_err(got, sdpa(xq.double(), xk.double(), xv.double(), is_causal=True))
    wgsl = [generate(program.plan, k).wgsl for k in program.plan.kernels]
    return dict(
        name="attention fwd f32" + (" high" if precision == "high" else ""),
        shape=f"B{B} H{H} T{T} D{D} causal",
        matrix_units=any("subgroupMatrix" in text for text in wgsl),
        ours_s=ours,
        torch_s=theirs,
        work=_causal_flops(B, H, T, D),
        unit="TFLOP/s",
        err=err,
        target="<= 2x torch",
    )


def bench_attention_fwd_high(ctx):
    return bench_attention_fwd(ctx, precision="high")


def bench_attention_bwd(ctx, B=1, H=16, D=64):
    T = SETTINGS["seq"]
    q, k, v, dout = _attention_inputs(B, H, T, D)
    # The forward's packed output (and its log-sum-exp) is an input: only the backward runs.
    g = Graph()
    tq, tk, tv = (g.input(n, a.shape) for n, a in (("q", q), ("k", k), ("v", v)))
    packed = g.apply("attention", [tq, tk, tv], causal=True)
    g.output("packed", packed)
    fwd = build(g, device=SETTINGS["device"])
    packed_value = run(program_for(fwd, ["packed"]), {"q": q, "k": k, "v": v}, fwd, ["packed"])

    g = Graph()
    tq, tk, tv, tdo = (g.input(n, a.shape) for n, a in (("q", q), ("k", k), ("v", v), ("do", dout)))
    tp = g.input("packed", packed_value["packed"].shape)
    o = segment(tp, 0, (B, H, T, D))
    lse = segment(tp, B * H * T * D, (B, H, T))
    delta = (tdo * o).sum(-1)
    inputs = [tq, tk, tv, tdo, lse, delta]
    g.output("dq", g.apply("attention_grad_q", inputs, causal=True))
    g.output("dkv", g.apply("attention_grad_kv", inputs, causal=True))
    session = build(g, device=SETTINGS["device"])
    program = program_for(session, ["dq", "dkv"])
    feeds = {"q": q, "k": k, "v": v, "do": dout, "packed": packed_value["packed"]}
    got = run(program, feeds, session, ["dq", "dkv"])
    got["dk"], got["dv"] = (part.reshape(B, H, T, D) for part in np.split(got["dkv"], 2))
    ours = time_program(program)

    xs = [torch.tensor(a, device=SETTINGS["torch"], requires_grad=True) for a in (q, k, v)]
    xdo = torch.tensor(dout, device=SETTINGS["torch"])
    out = torch.nn.functional.scaled_dot_product_attention(*xs, is_causal=True)
    theirs = time_torch(lambda: torch.autograd.grad(out, xs, xdo, retain_graph=True))
    want = torch.autograd.grad(out, xs, xdo)
    err = max(rel_err(got[n], w) for n, w in zip(("dq", "dk", "dv"), want, strict=True))
    return dict(
        name="attention bwd f32",
        shape=f"B{B} H{H} T{T} D{D} causal",
        ours_s=ours,
        torch_s=theirs,
        work=2.5 * _causal_flops(B, H, T, D),
        unit="TFLOP/s",
        err=err,
        target="<= 3x torch",
        kernels=[k.kind for k in program.plan.kernels],
    )


def _kernel_shape(program) -> str:
    """Workgroup size and grid of a program's (first) matmul kernel."""
    source = generate(program.plan, program.plan.kernels[0])
    size = source.wgsl.split("@workgroup_size(")[1].split(")")[0]
    return f"wg {math.prod(int(d) for d in size.split(','))} grid {'x'.join(map(str, source.grid))}"


def _llm_case(ctx, name, M, N, K, residual, variant=None, target=""):
    """x[M, K] @ W^T (+ r) over copies of W [N, K] worth ROTATED_BYTES, each product its own
    dispatch; `variant` (a context manager) forces a kernel shape."""
    scale = SETTINGS["llm_scale"]
    M, N, K = math.ceil(M / scale), N // scale, K // scale
    rng = np.random.default_rng(0)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) / math.sqrt(K)).astype(np.float32)
    r = rng.standard_normal((M, N)).astype(np.float32)
    copies = min(128, max(2, math.ceil(ROTATED_BYTES / scale**3 / w.nbytes)))
    g = Graph()
    tx, tr = g.input("x", x.shape), g.input("r", r.shape)
    for i in range(copies):
        y = g.apply("matmul", [tx, g.input(f"w{i}", w.shape)], trans_b=True)
        g.output(f"y{i}", y + tr if residual else y)
    outputs = [f"y{i}" for i in range(copies)]
    with variant or contextlib.nullcontext():
        session = build(g, device=SETTINGS["device"])
        program = program_for(session, outputs)
        kernel = _kernel_shape(program)
    # One kernel per product: the optimizer must not have concatenated the copies.
    assert len(program.plan.kernels) == copies, [k.kind for k in program.plan.kernels]
    got = run(program, {"x": x, "r": r, **{f"w{i}": w for i in range(copies)}}, session, outputs)
    ours = time_program(program) / copies
    dev = SETTINGS["torch"]
    xt, rt = torch.tensor(x, device=dev), torch.tensor(r, device=dev)
    wts = [torch.tensor(w, device=dev) for _ in range(copies)]
    if residual:
        theirs = time_torch(lambda: [torch.addmm(rt, xt, wt.T) for wt in wts]) / copies
    else:
        theirs = time_torch(lambda: [xt @ wt.T for wt in wts]) / copies
    want = xt.double() @ wts[0].double().T + (rt.double() if residual else 0)
    gemv = M <= wgsl_matmul.GEMV_ROWS
    row = dict(
        name=name,
        shape=f"{M}x{K}x{N} f32 (W^T)" + (" +r" if residual else ""),
        ours_s=ours,
        torch_s=theirs,
        work=(x.nbytes + w.nbytes + r.nbytes * (1 + residual)) if gemv else 2 * M * N * K,
        unit="GB/s" if gemv else "TFLOP/s",
        err=rel_err(got["y0"], want),
        target=target,
        kernel=kernel,
    )
    if gemv and "copy_gbs" in ctx:
        row["fraction_of_copy"] = row["work"] / ours / 1e9 / ctx["copy_gbs"]
    return row


class _forced_tile:  # a context manager, used as mock.patch is
    """Products built within take split tiles of shape `tile` (not the direct kernel); can
    be entered again, once per product shape."""

    def __init__(self, tile):
        self.tile = tile

    def __enter__(self):
        self.stack = contextlib.ExitStack()
        self.stack.enter_context(mock.patch.object(matmul_direct, "fits", lambda mm: False))
        self.stack.enter_context(
            mock.patch.object(matmul_simt, "choose_tile", lambda *_: self.tile)
        )

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


def _forced_gemv_columns(columns):
    return mock.patch.object(wgsl_matmul, "_gemv_teams", lambda *_args, **_kw: columns)


def _llm_rows(ctx, name, M, N, K, residual, target, variants):
    """The default kernel's row, then one per forced variant (`--sweep`); a variant that fails
    (a workgroup larger than the device allows) gives an error row."""
    rows = [_llm_case(ctx, name, M, N, K, residual, target=target)]
    for label, variant in variants if ctx.get("sweep") else []:
        try:
            rows.append(_llm_case(ctx, f"  {label}", M, N, K, residual, variant))
        except Exception as error:
            rows.append(dict(name=f"  {label}", error=f"{type(error).__name__}: {error}"))
    return rows


def bench_llm_prefill(ctx):
    """SmolLM2-135M's products for a 128-token prefill."""
    shapes = sorted({s for t in matmul_simt.TILE_SHAPES for s in (t, t[::-1])})
    tiles = [matmul_simt.Tile(*shape) for shape in shapes]
    variants = [(f"tile {t.rows}x{t.cols} k/{t.splits}", _forced_tile(t)) for t in tiles]
    rows = []
    for name, (N, K, residual) in LLM_PRODUCTS.items():
        rows += _llm_rows(ctx, f"prefill {name}", PREFILL_ROWS, N, K, residual, ">= 10", variants)
    return rows


def bench_llm_decode(ctx):
    """SmolLM2-135M's products for one decoded token, and its tied lm_head."""
    variants = [(f"gemv {c} columns/workgroup", _forced_gemv_columns(c)) for c in (2, 4, 8, 16)]
    rows = []
    for name, (N, K, residual) in [*LLM_PRODUCTS.items(), ("lm_head", (*LLM_HEAD, False))]:
        target = ""
        if name == "lm_head" and "copy_gbs" in ctx:
            target = f">= {0.6 * ctx['copy_gbs']:.0f} (60% torch copy)"
        rows += _llm_rows(ctx, f"decode {name}", 1, N, K, residual, target, variants)
    return rows


@contextlib.contextmanager
def block_forward():
    """Attention forwards built within use the 64-query block kernel whatever the shape."""
    saved = attention_rows.FEW_QUERIES, attention_rows.FILL_WORKGROUPS
    attention_rows.FEW_QUERIES = attention_rows.FILL_WORKGROUPS = 0
    try:
        yield
    finally:
        attention_rows.FEW_QUERIES, attention_rows.FILL_WORKGROUPS = saved


def _cache_attention(Tq: int, filled: int, unit: str):
    """SmolLM2-135M's attention (9 query heads over 3 kv heads, head dim 64) of Tq new tokens
    against a 512-slot KV cache whose first `filled` slots hold the earlier tokens: an additive
    mask of 0 and -inf, as the generation engine builds it."""
    B, Hq, Hkv, Tk, D = 1, 9, 3, 512, 64
    rng = np.random.default_rng(0)
    q = rng.standard_normal((B, Hq, Tq, D)).astype(np.float32)
    k, v = (rng.standard_normal((B, Hkv, Tk, D)).astype(np.float32) for _ in range(2))
    visible = np.arange(Tk)[None, :] <= filled + np.arange(Tq)[:, None]
    mask = np.where(visible, 0.0, -np.inf).astype(np.float32)[None, None]
    feeds = {"q": q, "k": k, "v": v, "m": mask}
    g = Graph()
    inputs = [g.input(n, a.shape) for n, a in feeds.items()]
    g.output("o", attention(*inputs, scale=D**-0.5))
    times = []
    for context in (contextlib.nullcontext(), block_forward()):
        with context:
            session = build(g, device=SETTINGS["device"])
            program = program_for(session, ["o"])
        got = run(program, feeds, session, ["o"])["o"]
        times.append(time_program(program))
    xs = [torch.tensor(a, device=SETTINGS["torch"]) for a in (q, k, v, mask)]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    theirs = time_torch(lambda: sdpa(*xs[:3], attn_mask=xs[3], scale=D**-0.5, enable_gqa=True))
    doubles = [x.double() for x in xs]
    want = sdpa(*doubles[:3], attn_mask=doubles[3], scale=D**-0.5, enable_gqa=True)
    kv_bytes, flops = 2 * B * Hkv * Tk * D * 4, 4 * B * Hq * Tq * Tk * D
    return dict(
        name=f"attention Tq={Tq} kv cache",
        shape=f"B{B} H{Hq}/{Hkv} Tk{Tk} D{D} mask",
        ours_s=times[0],
        blocks_s=times[1],
        torch_s=theirs,
        work=kv_bytes if unit == "GB/s" else flops,
        unit=unit,
        err=rel_err(got, want),
        target="<= 2x torch",
    )


def bench_attention_decode(ctx):
    return _cache_attention(1, 300, "GB/s")


def bench_attention_prefill(ctx):
    return _cache_attention(128, 0, "TFLOP/s")


BENCHMARKS = {
    "copy": bench_copy,
    "matmul_f32": bench_matmul_f32,
    "matmul_high": bench_matmul_high,
    "matmul_f16": bench_matmul_f16,
    "gemv": bench_gemv,
    "gemv_columns": bench_gemv_columns,
    "attention_fwd": bench_attention_fwd,
    "attention_fwd_high": bench_attention_fwd_high,
    "attention_bwd": bench_attention_bwd,
    "llm_prefill": bench_llm_prefill,
    "llm_decode": bench_llm_decode,
    "attention_decode": bench_attention_decode,
    "attention_prefill": bench_attention_prefill,
}
DEFAULT = [name for name in BENCHMARKS if not name.startswith("llm_")]


def rate(work: float, seconds: float, unit: str) -> float:
    return work / seconds / (1e12 if unit == "TFLOP/s" else 1e9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), help="run only these")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, any devices")
    parser.add_argument(
        "--prefill", action="store_true", help="SmolLM2-135M's prefill and decoding products"
    )
    parser.add_argument("--sweep", action="store_true", help="with --prefill: every kernel shape")
    args = parser.parse_args()
    if args.smoke:
        cuda = torch.cuda.is_available()
        SETTINGS.update(device="auto" if cuda else "vulkan-cpu", size=136, seq=80, llm_scale=8)
        SETTINGS["torch"] = "cuda" if cuda else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    probe = build(Graph(), device=SETTINGS["device"])
    ctx = {"executor": probe.executor, "sweep": args.sweep}
    card = torch.cuda.get_device_name() if SETTINGS["torch"] == "cuda" else "cpu"
    stamps = "timestamp-query" in probe.executor.gpu.features
    timing = "device timestamps" if stamps else "wall clock"
    print(f"ours: {probe.device} ({timing}); torch {torch.__version__}: {card}", flush=True)
    warm_up()
    rows = []
    names = args.only or (["copy", "llm_prefill", "llm_decode"] if args.prefill else DEFAULT)
    for name in names:
        try:
            result = BENCHMARKS[name](ctx)
        except Exception as error:  # one failing benchmark should not hide the others
            result = dict(name=name, error=f"{type(error).__name__}: {error}")
        for row in result if isinstance(result, list) else [result]:
            if "ours_s" in row:
                row["ours_rate"] = rate(row["work"], row["ours_s"], row["unit"])
                row["torch_rate"] = rate(row["work"], row["torch_s"], row["unit"])
                row["ours_over_torch_time"] = row["ours_s"] / row["torch_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (
        f"{'kernel':30} {'shape':28} {'ours us':>9} {'ours':>9} {'torch us':>9} {'torch':>9}"
        f" {'unit':>8} {'t/t':>6} {'rel err':>8}  target"
    )
    print(f"\n{card} (ours through {probe.device}, {timing})\n{header}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:30} ERROR {r['error'][:200]}")
            continue
        err = f"{r['err']:.1e}" if "err" in r else "-"
        print(
            f"{r['name']:30} {r['shape']:28} {r['ours_s'] * 1e6:9.1f} {r['ours_rate']:9.1f}"
            f" {r['torch_s'] * 1e6:9.1f} {r['torch_rate']:9.1f} {r['unit']:>8}"
            f" {r['ours_over_torch_time']:6.2f} {err:>8}  {r['target']}  {r.get('kernel', '')}"
            + (f" (64-query blocks: {r['blocks_s'] * 1e6:.1f} us)" if "blocks_s" in r else "")
        )
    if args.json:
        results = {"card": card, "ours_device": probe.device, "timing": timing, "results": rows}
        write_json(args.json, results)


if __name__ == "__main__":
    main()
