"""The direct products (backends/wgsl/matmul_direct.py): x @ W^T products that would take
small split tiles, read straight from storage with k split over the lanes of each group of
outputs. Forward and gradients against PyTorch (the gradients' products take other kernels),
the norm prologues, the paired epilogue and the lanes' sums through subgroup shuffles and
through workgroup memory, on lavapipe and on a hardware GPU."""

from __future__ import annotations

import math

import numpy as np
import pytest

from meganeura import Graph, build
from meganeura.backends.wgsl import matmul_direct
from meganeura.backends.wgsl.kernels import generate
from meganeura.lower.plan import plan as make_plan
from tests.harness import direct_products
from tests.test_matmul import check_matmul
from tests.test_norm_matmul import check_case
from tests.test_paired_epilogue import run_session as run_swiglu_session

DEVICES = [
    pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe),
    pytest.param("gpu", marks=pytest.mark.gpu),
]
SUMS = pytest.mark.parametrize("sums", [False, True], ids=["shared", "subgroups"])


def lane_sums(monkeypatch, device: str, sums: bool) -> None:
    """Kernels built on `device` from here on add their lanes' partial sums through subgroup
    shuffles (`sums`) or through workgroup memory; skips where the device's start-up check
    turned subgroup operations off."""
    gpu = build(Graph(), device=device).executor.gpu
    if sums and not gpu.checks["subgroup_sums"]:
        pytest.skip(f"subgroup sums are off on {gpu.info.name}")
    monkeypatch.setitem(gpu.checks, "subgroup_sums", sums)


def forward_kernel(batch_a, batch_b, m, k, n):
    """The WGSL and grid of the kernel computing x[*batch_a, m, k] @ w[*batch_b, n, k]^T."""
    g = Graph()
    y = g.apply(
        "matmul",
        [g.input("x", (*batch_a, m, k)), g.input("w", (*batch_b, n, k))],
        trans_b=True,
    )
    out = g.output("y", y)
    program = make_plan(g, [out.id], {})
    return generate(program, next(kr for kr in program.kernels if kr.node == out.id))


# (batches, m, k, n, epilogue): k a whole number of loop steps (576: 144 vec4s, 8 lanes times
# 2) or not (40, 260, 1036), short (8 lanes a group) and long (16 lanes, LONG_K); rows and
# columns past a tile; a batch of x over one weight, and batched weights.
CASES = {
    "prefill-o": (((), ()), 128, 576, 96, "residual"),
    "ragged": (((), ()), 70, 40, 20, "none"),
    "ragged-steps": (((), ()), 37, 260, 44, "bias_relu"),
    "long-k": (((), ()), 33, 1036, 24, "residual"),
    "long-k-steps": (((), ()), 16, 1152, 16, "none"),
    "batched-x": (((2,), ()), 20, 64, 40, "residual"),
    "batched-w": (((3,), (3,)), 18, 96, 12, "none"),
}


@SUMS
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_direct_products_match_torch(monkeypatch, case, device, sums):
    (batch_a, batch_b), m, k, n, epilogue = CASES[case]
    source = forward_kernel(batch_a, batch_b, m, k, n)
    assert "dp_red" in source.wgsl, "these products take the direct kernel"
    layout = matmul_direct.layout(k)
    nbatch = math.prod(np.broadcast_shapes(batch_a, batch_b))
    assert source.grid == (-(-n // layout.cols), -(-m // layout.rows), nbatch)
    lane_sums(monkeypatch, device, sums)
    check_matmul(device, (batch_a, batch_b), m, k, n, False, True, epilogue, seed=k + n)


def test_which_products_go_direct():
    # x @ W^T whose split tile would be small: SmolLM2-135M's q/k/v, o and down products of a
    # 128-token prompt; its gate/up product keeps its 32 x 32 split tiles.
    for n, k in ((960, 576), (576, 576), (576, 1536)):
        assert "dp_red" in forward_kernel((), (), 128, k, n).wgsl, (n, k)
    assert "dp_red" not in forward_kernel((), (), 128, 576, 3072).wgsl
    # W as [K, N] (not contiguous along k), k not a multiple of 4, large products: not here.
    g = Graph()
    out = g.output("y", g.input("x", (128, 576)) @ g.input("w", (576, 576)))
    program = make_plan(g, [out.id], {})
    assert "dp_red" not in generate(program, program.kernels[0]).wgsl
    assert "dp_red" not in forward_kernel((), (), 128, 578, 576).wgsl
    assert "dp_red" not in forward_kernel((), (), 2048, 576, 2048).wgsl


@SUMS
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op, params", [("rms_norm_matmul", 1), ("layer_norm_matmul", 2)])
@pytest.mark.parametrize("k", [40, 260, 1040])
def test_direct_products_normalize_their_rows(monkeypatch, op, params, k, device, sums):
    """An RMSNorm scales the outputs (its squares summed over the lanes' loads); a layer norm
    computes its rows' statistics first; both with their gradients against PyTorch."""
    assert "dp_red" in forward_kernel((), (), 70, k, 20).wgsl
    lane_sums(monkeypatch, device, sums)
    check_case(op, params, ((70, k), (20, k), True), device)


@SUMS
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [40, 264, 1040])
@pytest.mark.parametrize("norm", ["rms", "none"])
def test_direct_products_pair_the_halves(monkeypatch, norm, k, device, sums):
    """SwiGLU of a product's two halves stored by the direct kernel: H = 20 columns (the last
    workgroup's pairs partly past the output), rows past a tile."""
    lane_sums(monkeypatch, device, sums)
    session = run_swiglu_session((), 70, k, 20, norm, device)
    labels = session._last.labels
    assert any("+swiglu" in label for label in labels), labels
    assert direct_products(session) == 1
