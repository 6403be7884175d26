"""Start-up checks of the GPU's matrix units (subgroup matrices), run once per executor.

A driver may offer the feature and still get it wrong, or make it slow: the executor uses
matrix-unit kernels only where these checks pass.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from meganeura.backends.wgsl.matmul import MATRIX_UNIT_SYNTAXES
from meganeura.graph import Graph

DEBUG = int(os.environ.get("MEGANEURA_DEBUG", "0") or 0)


def probe_matrix_units(executor) -> str | None:
    """The subgroup-matrix syntax whose kernel compiles and multiplies correctly here, or
    None: a small matmul against NumPy, so a driver that offers the feature but gets it
    wrong falls back to SIMT kernels."""
    gpu = executor.gpu
    if not (gpu.has_subgroup_matrix and gpu.has_f16 and gpu.has_subgroups):
        return None
    rng = np.random.default_rng(0)
    # f32 weights both ways round (both staging paths of the kernel), and f16 operands
    # that tile exactly (read by the matrix loads themselves).
    a, b, w = (
        rng.standard_normal(shape).astype(np.float16).astype(np.float32)
        for shape in ((150, 40), (40, 130), (136, 40))
    )
    h, k = (rng.standard_normal(shape).astype(np.float16) for shape in ((64, 32), (64, 32)))
    wants = [a.astype(np.float64) @ b, a.astype(np.float64) @ w.T]
    wants.append(h.astype(np.float64) @ k.astype(np.float64).T)
    graph = Graph()
    ta = graph.input("a", a.shape)
    outs = [ta @ graph.input("b", b.shape), ta @ graph.input("w", w.shape).T]
    outs.append(graph.input("h", h.shape, "f16") @ graph.input("k", k.shape, "f16").T)
    sources = (("a", a), ("b", b), ("w", w), ("h", h), ("k", k))
    feeds = {graph.inputs[n]: x for n, x in sources}
    for syntax in MATRIX_UNIT_SYNTAXES:
        options = {
            "matmul_precision": "high",
            "matrix_unit": syntax,
            "staged_matrix_units": True,
        }
        try:
            program = _program(executor, graph, [o.id for o in outs], {}, options)
            program.run(feeds)
            gots = [program.read(o.id) for o in outs]
        except Exception as error:
            if DEBUG:
                print(f"matrix units, syntax {syntax!r}: {error}", file=sys.stderr)
            continue
        if all(
            # f16 outputs round to 2^-11 relative
            np.linalg.norm(got - want)
            <= (1e-5 if got.dtype == np.float32 else 1e-3) * np.linalg.norm(want)
            for got, want in zip(gots, wants, strict=True)
        ):
            return syntax
        if DEBUG:
            print(f"matrix units, syntax {syntax!r}: wrong results", file=sys.stderr)
    return None


def staged_matrix_units_pay(executor) -> bool:
    """Whether f32 matmuls run faster on matrix units (operands staged as f16 in
    workgroup memory) than on the f32 kernels here: a 2048^3 product timed both ways."""
    n, runs = 2048, 5
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    graph = Graph()
    out = graph.input("a", a.shape) @ graph.input("b", b.shape)
    feeds = {graph.inputs["a"]: a, graph.inputs["b"]: b}
    seconds = {}
    try:
        for staged in (True, False):
            options = {
                "matmul_precision": "high",
                "matrix_unit": executor.matrix_unit,
                "staged_matrix_units": staged,
            }
            program = _program(executor, graph, [out.id], {}, options)
            program.run(feeds)
            result = program.buffers[program.plan.buffer_of[out.id]]
            executor.device.queue.read_buffer(result, 0, 4)
            start = time.perf_counter()
            for _ in range(runs):
                program.run({})
            executor.device.queue.read_buffer(result, 0, 4)
            seconds[staged] = time.perf_counter() - start
    except Exception as error:
        if DEBUG:
            print(f"matrix units, staged timing: {error}", file=sys.stderr)
        return False
    if DEBUG:
        print(
            f"matrix units, {n}^3 staged {seconds[True]:.4f} s, f32 {seconds[False]:.4f} s",
            file=sys.stderr,
        )
    return seconds[True] < seconds[False]


def _program(executor, graph, roots, updates, options):
    from meganeura.backends.webgpu.runtime import WebGPUProgram  # the runtime imports this module

    return WebGPUProgram(executor, graph, roots, updates, options)
