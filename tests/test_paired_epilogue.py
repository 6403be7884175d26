"""A paired epilogue: SwiGLU of a product's two halves (gate and up), stored by the product's
own kernel (Kernel.pair). The SIMT tiles compute columns j and H + j of the product in one
workgroup; other kernels (GEMVs, matrix units) store the product for SwiGLU's own kernel.
Checked against NumPy in float64, forward only: a gradient would read the product, which
then stays a value of its own."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest

import meganeura.functional as F
from meganeura import Graph, build
from meganeura.backends.wgsl import matmul_simt
from meganeura.backends.wgsl.matmul_simt import TILE_SHAPES, Tile
from meganeura.lower.plan import plan as make_plan
from tests.harness import split_tiles

# lavapipe in CI, and the hardware GPU where there is one (`pytest -m gpu`).
KERNEL_DEVICES = [
    pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe),
    pytest.param("gpu", marks=pytest.mark.gpu),
]
ALL_TILES = [Tile(*shape) for shape in sorted({s for t in TILE_SHAPES for s in (t, t[::-1])})]
EPS = 1e-5


def swiglu_graph(batch, m: int, k: int, h: int, norm: str, split=(0, 1), trans_b=True):
    """out = SwiGLU(y[..., :h], y[..., h:]) for y = norm(x) @ w^T, w [2h, k] (or, without
    `trans_b`, y = norm(x) @ w, w [k, 2h]); `split` moves the slices (in units of h) to make
    a pattern that is not two halves."""
    g = Graph()
    x = g.input("x", (*batch, m, k))
    w = g.input("w", (2 * h, k) if trans_b else (k, 2 * h))
    if norm == "rms":
        x = F.rms_norm(x, g.input("nw", (k,)), eps=EPS)
    elif norm == "layer":
        x = F.layer_norm(x, g.input("nw", (k,)), g.input("nb", (k,)), eps=EPS)
    y = g.apply("matmul", [x, w], trans_b=trans_b)
    lo, hi = (y[..., s * h : (s + 1) * h] for s in split)
    g.output("out", F.swiglu(lo, hi))
    return g


def reference(feeds: dict, h: int, norm: str, trans_b: bool = True) -> np.ndarray:
    x = feeds["x"].astype(np.float64)
    if norm == "layer":
        x = x - x.mean(-1, keepdims=True)
    if norm in ("rms", "layer"):
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * feeds["nw"]
    if norm == "layer":
        x = x + feeds["nb"]
    w = feeds["w"].astype(np.float64)
    y = x @ (w.T if trans_b else w)
    gate, up = y[..., :h], y[..., h:]
    return gate / (1 + np.exp(-gate)) * up


def feeds_for(batch, m, k, h, norm, seed=0, trans_b=True) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {
        "x": rng.standard_normal((*batch, m, k)).astype(np.float32) + 1.0,
        "w": (rng.standard_normal((2 * h, k) if trans_b else (k, 2 * h)) / np.sqrt(k)).astype(
            np.float32
        ),
    }
    if norm != "none":
        feeds["nw"] = rng.standard_normal(k).astype(np.float32)
    if norm == "layer":
        feeds["nb"] = rng.standard_normal(k).astype(np.float32)
    return feeds


def run_session(batch, m, k, h, norm, device="vulkan-cpu", trans_b=True):
    """The session that ran the SwiGLU graph, its output checked against NumPy."""
    session = build(swiglu_graph(batch, m, k, h, norm, trans_b=trans_b), device=device)
    feeds = feeds_for(batch, m, k, h, norm, trans_b=trans_b)
    got = session.run(feeds)["out"]
    want = reference(feeds, h, norm, trans_b)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(want).max()))
    return session


def run(batch, m, k, h, norm, device="vulkan-cpu", trans_b=True):
    """The kernel labels of the program that computed the checked output."""
    session = run_session(batch, m, k, h, norm, device, trans_b)
    return getattr(session._last, "labels", [])  # the NumPy executor runs no kernels


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("tile", ALL_TILES, ids=[f"{t.rows}x{t.cols}" for t in ALL_TILES])
@pytest.mark.parametrize("k", [37, 260], ids=["k37", "k260-vec4-steps"])
def test_every_split_tile_pairs_the_halves(device, tile, k):
    """Every split tile under a deferred RMSNorm: rows past a tile, H = 20 columns (not a
    multiple of any tile's half, so the last workgroups' pairs are partly past the output),
    k off the staging depth (37: scalar loads) and over several steps (260: vec4 loads)."""
    with split_tiles(tile):
        labels = run((), 70, k, 20, "rms", device)
    assert any("+swiglu" in label for label in labels), labels


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize(
    ("batch", "m", "k", "h", "norm"),
    [
        ((), 40, 40, 24, "none"),
        ((2,), 33, 40, 36, "layer"),  # the norm's statistics before the loop; batched
        ((), 128, 64, 48, "rms"),
        ((), 128, 576, 1536, "rms"),  # SmolLM2-135M's gate/up product, a 128-token prompt
    ],
)
def test_paired_epilogue_on_chosen_tiles(device, batch, m, k, h, norm):
    labels = run(batch, m, k, h, norm, device)
    assert any("+swiglu" in label for label in labels), labels


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_a_gemv_stores_the_product_for_swiglu(device):
    """A few rows take the GEMV, which has no paired epilogue: SwiGLU runs as its own kernel."""
    labels = run((), 3, 40, 24, "rms", device)
    assert not any("+swiglu" in label for label in labels), labels
    assert any(label.startswith("swiglu") for label in labels), labels


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize(
    ("m", "k", "h", "norm"),
    [
        (512, 32, 2048, "none"),  # enough 128 x 128 tiles to fill a GPU
        (520, 37, 2020, "rms"),  # partial tiles in both directions, scalar loads, the norm
        (512, 40, 2048, "layer"),
    ],
)
def test_large_tiles_pair_the_halves(device, m, k, h, norm):
    """The 128 x 128 tiles stage weight rows j and H + j in their two column blocks."""
    split = AssertionError("these products take 128 x 128 tiles")
    with mock.patch.object(matmul_simt, "_tiled_split", side_effect=split):
        labels = run((), m, k, h, norm, device)
    assert any("+swiglu" in label for label in labels), labels


def test_the_numpy_executor_computes_the_same():
    run((), 20, 40, 24, "rms", device="cpu")


def _kernels(graph: Graph, pairable):
    roots = list(graph.outputs.values())
    return make_plan(graph, roots, {}, pairable=pairable).kernels


def test_only_two_halves_of_a_pairable_product_make_a_pair():
    paired = _kernels(swiglu_graph((), 16, 8, 4, "none"), lambda g, nid: True)
    assert [k.kind for k in paired] == ["matmul"]
    (kernel,) = paired
    assert kernel.pair is not None and kernel.core is not None
    # The backend cannot pair this product: it is stored, SwiGLU a kernel of its own.
    alone = _kernels(swiglu_graph((), 16, 8, 4, "none"), lambda g, nid: False)
    assert [k.kind for k in alone] == ["matmul", "pointwise"]
    assert all(k.pair is None for k in alone)
    # Gate and up swapped still read the two halves; the same half twice does not.
    swapped = _kernels(swiglu_graph((), 16, 8, 4, "none", split=(1, 0)), lambda g, nid: True)
    assert [k.pair is not None for k in swapped] == [True]
    same = _kernels(swiglu_graph((), 16, 8, 4, "none", split=(0, 0)), lambda g, nid: True)
    assert [k.kind for k in same] == ["matmul", "pointwise"]


@pytest.mark.lavapipe
@pytest.mark.parametrize("m", [70, 520], ids=["split-tiles", "128x128-tiles"])
def test_weights_read_along_n_pair_on_lavapipe(m):
    """x @ W with W [K, 2H] (not a Linear's layout): the weights are staged four columns of
    one k at a time, each four-column block inside one half."""
    labels = run((), m, 40, 2020 if m > 128 else 20, "rms", trans_b=False)
    assert any("+swiglu" in label for label in labels), labels
