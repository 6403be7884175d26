"""Start-up checks of the GPU's matrix units (subgroup matrices), run once per executor.

A driver may offer the feature and still get it wrong, or make it slow: the executor uses
matrix-unit kernels only where these checks pass.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from meganeura.backends.wgsl.matmul_units import MATRIX_UNIT_SYNTAXES, UNIT_TILES, UnitTile
from meganeura.graph import Graph

DEBUG = int(os.environ.get("MEGANEURA_DEBUG", "0") or 0)


def probe_matrix_units(executor) -> str | None:
    """The subgroup-matrix syntax whose kernels compile and multiply correctly here, or
    None: small matmuls against NumPy through every tile shape of the matrix-unit kernel
    that fits the device (whole tiles and partial ones, f32 operands in both layouts and f16
    ones), so a driver that offers the feature but gets it wrong, or whose subgroups are not
    the size the tiles assume, falls back to SIMT kernels."""
    gpu = executor.gpu
    if not (gpu.has_subgroup_matrix and gpu.has_f16 and gpu.has_subgroups):
        return None
    budget = workgroup_storage(executor)
    checks = [(tile, _tile_check(tile)) for tile in UNIT_TILES if tile.storage(True) <= budget]
    for syntax in MATRIX_UNIT_SYNTAXES:
        try:
            for tile, (graph, outs, feeds, wants) in checks:
                options = {
                    "matmul_precision": "high",
                    "matrix_unit": syntax,
                    "f32_on_units": True,
                    "workgroup_storage": budget,
                    "unit_tiles": (tile,),
                }
                program = _program(executor, graph, [o.id for o in outs], {}, options)
                program.run(feeds)
                gots = [program.read(o.id) for o in outs]
                # the f16 result rounds to 2^-11 relative
                tolerances = (1e-5, 1e-5, 1e-5, 1e-3)
                if not all(
                    np.linalg.norm(got - want) <= tol * np.linalg.norm(want)
                    for got, want, tol in zip(gots, wants, tolerances, strict=True)
                ):
                    raise ArithmeticError(f"wrong results with {tile}")
        except Exception as error:
            if DEBUG:
                print(f"matrix units, syntax {syntax!r}: {error}", file=sys.stderr)
            continue
        return syntax
    return None


def _tile_check(tile: UnitTile):
    """(graph, outputs, feeds, expected values) of products run through `tile`: partial
    tiles of f32 operands (B row- and column-major; results through the scratch tiles),
    whole ones (stored by the matrix stores), and f16 operands. The operands are f16 values,
    so the products are exact up to f32 accumulation and the f16 result's rounding."""
    rng = np.random.default_rng(0)
    rows, cols = tile.rows, tile.cols
    shapes = ((rows + 22, 40), (40, cols + 2), (cols + 8, 40), (rows, 48), (48, cols))
    a, b, w, c, d = (
        rng.standard_normal(shape).astype(np.float16).astype(np.float32) for shape in shapes
    )
    h, k = (rng.standard_normal(shape).astype(np.float16) for shape in ((rows, 32), (cols, 32)))
    f16_product = (h.astype(np.float64) @ k.astype(np.float64).T).astype(np.float16)
    wants = [a.astype(np.float64) @ b, a.astype(np.float64) @ w.T, c.astype(np.float64) @ d]
    wants.append(f16_product.astype(np.float64))
    graph = Graph()
    ta = graph.input("a", a.shape)
    outs = [ta @ graph.input("b", b.shape), ta @ graph.input("w", w.shape).T]
    outs.append(graph.input("c", c.shape) @ graph.input("d", d.shape))
    product = graph.input("h", h.shape, "f16") @ graph.input("k", k.shape, "f16").T
    outs.append(product.astype("f32"))
    sources = (("a", a), ("b", b), ("w", w), ("c", c), ("d", d), ("h", h), ("k", k))
    return graph, outs, {graph.inputs[n]: x for n, x in sources}, wants


def f32_on_units_pays(executor) -> bool:
    """Whether f32 matmuls run faster on matrix units (operands rounded to f16 as they are
    staged) than on the f32 kernels here: a 2048^3 product timed both ways."""
    n, runs = 2048, 5
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    graph = Graph()
    out = graph.input("a", a.shape) @ graph.input("b", b.shape)
    feeds = {graph.inputs["a"]: a, graph.inputs["b"]: b}
    seconds = {}
    try:
        for units in (True, False):
            options = {
                "matmul_precision": "high",
                "matrix_unit": executor.matrix_unit,
                "f32_on_units": units,
                "workgroup_storage": workgroup_storage(executor),
            }
            program = _program(executor, graph, [out.id], {}, options)
            program.run(feeds)
            result = program.buffers[program.plan.buffer_of[out.id]]
            executor.device.queue.read_buffer(result, 0, 4)
            start = time.perf_counter()
            for _ in range(runs):
                program.run({})
            executor.device.queue.read_buffer(result, 0, 4)
            seconds[units] = time.perf_counter() - start
    except Exception as error:
        if DEBUG:
            print(f"matrix units, f32 timing: {error}", file=sys.stderr)
        return False
    if DEBUG:
        print(
            f"matrix units, {n}^3 f32 on units {seconds[True]:.4f} s, "
            f"f32 kernels {seconds[False]:.4f} s",
            file=sys.stderr,
        )
    return seconds[True] < seconds[False]


def workgroup_storage(executor) -> int:
    """Bytes of workgroup memory the device granted a workgroup (WebGPU's default 16 KiB
    when the limit is not reported)."""
    return executor.gpu.limits.get("max-compute-workgroup-storage-size", 16384)


def _program(executor, graph, roots, updates, options):
    from meganeura.backends.webgpu.runtime import WebGPUProgram  # the runtime imports this module

    return WebGPUProgram(executor, graph, roots, updates, options)
