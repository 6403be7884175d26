"""Start-up check of subgroup sums, run once per executor.

Kernels that sum over 32 neighbouring invocations or a whole workgroup (the GEMVs, f32 and
quantized: their lanes' dot products, and a row's sum of squares under an RMSNorm) may do it
with subgroup operations, one barrier instead of one per halving of a tree; the direct
products add their lanes' partial sums by subgroup shuffles. That assumes more
than WGSL promises: subgroups of consecutive invocations whose size divides 32. The check
runs those kernels on random data against NumPy, and the executor uses subgroup sums only
where they come out right.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from meganeura.graph import Graph

DEBUG = int(os.environ.get("MEGANEURA_DEBUG", "0") or 0)


def probe_subgroup_sums(executor) -> bool:
    """Whether the GEMV kernels sum correctly through subgroup operations here: an RMSNorm-ed
    and a plain product of Q4_1 weights and an f32 one (workgroups of 2 and 8 teams), and a
    direct product, against NumPy."""
    if not executor.gpu.has_subgroups:
        return False
    import gguf

    from meganeura.backends.webgpu.runtime import WebGPUProgram  # imports this module
    from meganeura.io.gguf import QuantizedWeight
    from meganeura.ops.quant import pack_words

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 96)).astype(np.float32)
    gamma = rng.normal(1.0, 0.2, size=96).astype(np.float32)
    x64 = x.astype(np.float64)
    normalized = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5) * gamma
    graph = Graph()
    xs, gs = graph.input("x", x.shape), graph.input("g", gamma.shape)
    feeds = {xs.id: x, gs.id: gamma}
    outputs, wants = [], []
    for rows in (24, 2100):  # 2 and 8 weight rows per workgroup
        w = rng.normal(size=(rows, 96)).astype(np.float32)
        weight = QuantizedWeight(
            "Q4_1", (rows, 96), gguf.quantize(w, gguf.GGMLQuantizationType.Q4_1)
        )
        words = pack_words(weight.blocks)
        raw = graph.input(f"w{rows}", words.shape, "u32")
        feeds[raw.id] = words
        attrs = {"qtype": "Q4_1", "shape": (rows, 96)}
        outputs.append(graph.apply("quantized_matmul", [xs, raw], **attrs))
        outputs.append(graph.apply("rms_norm_quantized_matmul", [xs, gs, raw], eps=1e-5, **attrs))
        dense = weight.dequantize().astype(np.float64)
        wants += [x64 @ dense.T, normalized @ dense.T]
        # The f32 GEMV (teams of 32 lanes per weight row) on the same shapes.
        dense_in = graph.input(f"d{rows}", w.shape)
        feeds[dense_in.id] = w
        outputs.append(xs @ dense_in.T)
        wants.append(x64 @ w.astype(np.float64).T)
    # A direct product (backends/wgsl/matmul_direct.py), whose lanes' partial sums meet in a
    # reduce-scatter of subgroup shuffles.
    xd, wd = (
        rng.normal(size=(24, 96)).astype(np.float32),
        rng.normal(size=(40, 96)).astype(np.float32),
    )
    xs_d, ws_d = graph.input("xd", xd.shape), graph.input("wd", wd.shape)
    feeds[xs_d.id], feeds[ws_d.id] = xd, wd
    outputs.append(xs_d @ ws_d.T)
    wants.append(xd.astype(np.float64) @ wd.astype(np.float64).T)
    try:
        options = {**executor.codegen_options, "subgroup_sums": True}
        program = WebGPUProgram(executor, graph, [o.id for o in outputs], {}, options)
        program.run(feeds)
        for out, want in zip(outputs, wants, strict=True):
            got = program.read(out.id)
            if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
                raise ArithmeticError(f"wrong sums: {np.abs(got - want).max()} off")
    except Exception as error:
        if DEBUG:
            print(f"subgroup sums: {error}", file=sys.stderr)
        return False
    return True
