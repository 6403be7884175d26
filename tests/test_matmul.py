"""Matmul kernels against PyTorch: GEMV and tiled variants, strided operands, epilogue fusion,
f16 storage and the matrix-unit path."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from meganeura import Graph, build, grad, optim
from meganeura import functional as F
from meganeura.backends.wgsl import matmul_direct
from meganeura.backends.wgsl.kernels import generate
from meganeura.backends.wgsl.matmul import GEMV_ROWS, GEMV_WORKGROUPS, UNITS_FILL
from meganeura.backends.wgsl.matmul_simt import TILE_SHAPES, TILED_WORKGROUPS, Tile, choose_tile
from meganeura.lower.plan import plan as make_plan
from meganeura.nn import Linear
from meganeura.ops.packed import segment
from tests.harness import check_against_torch, normal, split_tiles

seeds = st.integers(0, 2**32 - 1)

DEVICES = [
    "cpu",
    pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe),
    pytest.param("gpu", marks=pytest.mark.gpu),
]

# (a shape, b shape, trans_a, trans_b): GEMV rows (M <= 8) and tiles, K with and without
# 16-byte rows, broadcast batch dims, sizes past and off the tile sizes.
SHAPES = [
    ((1, 12), (20, 12), False, True),  # GEMV, weights contiguous along k, vec4 loads
    ((3, 13), (9, 13), False, True),  # GEMV, scalar loads
    ((2, 8, 600), (600, 70), False, False),  # GEMV over columns, batched
    ((2, 3, 64), (64, 36), False, False),  # GEMV over columns, vec4 loads
    ((5, 3), (5, 7), True, False),  # GEMV with a transposed left operand
    ((9, 17), (17, 65), False, False),  # tiled
    ((2, 1, 70, 33), (3, 20, 33), False, True),  # tiled, broadcast batch
    ((33, 66), (20, 33), True, True),  # tiled, both transposed
    ((32, 130, 20), (20, 130), False, False),  # 128 x 128 tiles (enough of them)
    ((16, 20, 260), (260, 20), True, True),  # 128 x 128 tiles, both transposed
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("a_shape", "b_shape", "ta", "tb"), SHAPES)
def test_matmul_and_gradients_match_torch(device, a_shape, b_shape, ta, tb):
    rng = np.random.default_rng(0)
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    g = Graph()
    ta_, tb_ = g.parameter("a", a.shape, init=a), g.parameter("b", b.shape, init=b)
    out = g.output("out", g.apply("matmul", [ta_, tb_], trans_a=ta, trans_b=tb))
    up = rng.standard_normal(out.shape).astype(np.float32)
    da, db = grad((out * g.input("up", up.shape)).sum(), [ta_, tb_])
    g.output("da", da)
    g.output("db", db)
    got = build(g, device=device).run({"up": up})

    ra, rb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    ref = (ra.transpose(-1, -2) if ta else ra) @ (rb.transpose(-1, -2) if tb else rb)
    ref.backward(torch.tensor(up))
    for name, want in (("out", ref), ("da", ra.grad), ("db", rb.grad)):
        want = want.detach().numpy()
        # f32 sums of up to a few thousand terms: errors scale with the largest values.
        atol = 1e-5 * np.abs(want).max()
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=atol, err_msg=name)


def kernels_of(g: Graph, names):
    program = make_plan(g, [g.outputs[n] for n in names], {})
    return program, [(g.nodes[k.node].op, k.core is not None) for k in program.kernels]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [4, 40])
def test_linear_bias_activation_and_residual_run_in_the_matmul_store(device, rows):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((rows, 24)).astype(np.float32)
    g = Graph()
    tx = g.input("x", x.shape)
    hidden = F.gelu(Linear(g, "up", 24, 24)(tx))
    g.output("y", tx + Linear(g, "down", 24, 24)(hidden))
    _, kernels = kernels_of(g, ["y"])
    assert kernels == [("gelu", True), ("add", True)]  # two matmuls, nothing else
    session = build(g, device=device)
    got = session.run({"x": x})["y"]
    p = {k: torch.tensor(v) for k, v in session.parameters().items()}
    tx_ = torch.tensor(x)
    h = torch.nn.functional.gelu(tx_ @ p["up.weight"].T + p["up.bias"])
    want = tx_ + h @ p["down.weight"].T + p["down.bias"]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_a_product_read_twice_is_not_fused():
    g = Graph()
    x, w = g.input("x", (16, 8)), g.input("w", (8, 8))
    y = x @ w
    g.output("a", y.relu())
    g.output("b", y.sigmoid())
    _, kernels = kernels_of(g, ["a", "b"])
    assert ("matmul", False) in kernels
    assert not any(core for _, core in kernels)


def test_a_product_broadcast_by_its_reader_is_not_fused():
    g = Graph()
    x, w = g.input("x", (1, 8)), g.input("w", (8, 8))
    g.output("y", (x @ w) + g.input("z", (5, 8)))  # read at 5 output positions each
    _, kernels = kernels_of(g, ["y"])
    assert kernels == [("matmul", False), ("add", False)]


@pytest.mark.parametrize("device", DEVICES)
def test_sgd_update_runs_in_the_gradient_matmul_in_place(device):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    w0 = rng.standard_normal((3, 5)).astype(np.float32)
    g = Graph()
    tx = g.input("x", x.shape)
    layer = Linear(g, "fc", 5, 3, bias=False)
    loss = (layer(tx) * layer(tx)).mean()
    session = build(g, loss, optim.SGD(lr=0.1), device=device)
    session.set_parameters({"fc.weight": w0})
    graph, updates = session.graph, session.graph.updates
    # w - lr * (x^T dy)^T: the update is the gradient matmul's epilogue, written over w.
    program = session.executor.compile(graph, [loss.id], updates)
    if device != "cpu":
        assert [k.core is not None for k in program.plan.kernels][-1]
        assert not program.plan.copies
    feeds = session._feeds(
        {"x": x, **session._rules.scalars(0)}, session._needed_inputs([loss.id, *updates.values()])
    )
    program.run(feeds)
    tw = torch.tensor(w0, requires_grad=True)
    ((torch.tensor(x) @ tw.T) ** 2).mean().backward()
    np.testing.assert_allclose(
        session.parameters()["fc.weight"], (tw - 0.1 * tw.grad).detach().numpy(), rtol=1e-5
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [3, 12])  # GEMV, tiled
@pytest.mark.parametrize("offset", [5, 8])  # scalar loads, 16-byte loads
def test_operands_at_an_offset_inside_their_buffer(device, rows, offset):
    rng = np.random.default_rng(3)
    flat = rng.standard_normal(offset + rows * 12).astype(np.float32)
    w = rng.standard_normal((12, 6)).astype(np.float32)
    g = Graph()
    part = segment(g.input("flat", flat.shape), offset, (rows, 12))
    g.output("y", part @ g.input("w", w.shape))
    g.output("z", g.apply("matmul", [part, g.input("v", w.T.shape)], trans_b=True))
    got = build(g, device=device).run({"flat": flat, "w": w, "v": np.ascontiguousarray(w.T)})
    want = flat[offset:].reshape(rows, 12) @ w
    np.testing.assert_allclose(got["y"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["z"], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [2, 37])
def test_f16_storage_accumulates_in_f32(device, rows):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((rows, 300)).astype(np.float16)
    b = rng.standard_normal((300, 20)).astype(np.float16)
    g = Graph()
    g.output("y", g.input("a", a.shape, "f16") @ g.input("b", b.shape, "f16"))
    got = build(g, device=device).run({"a": a, "b": b})["y"]
    assert got.dtype == np.float16
    exact = a.astype(np.float64) @ b.astype(np.float64)
    # f32 accumulation: the only error is the final rounding to f16.
    np.testing.assert_allclose(got, exact.astype(np.float16), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("a_shape", "b_shape", "tb"),
    [
        ((1, 576), (96, 576), True),  # decoding: GEMV over contiguous k, vec4<f16> loads
        ((3, 13), (9, 13), True),  # GEMV, scalar loads
        ((2, 3, 64), (64, 36), False),  # GEMV over columns
        ((40, 68), (24, 68), True),  # tiled, k split
        ((260, 24), (260, 24), True),  # 128 x 128 tiles
    ],
)
def test_f32_by_f16_weights_is_f32_with_gradients_in_each_dtype(device, a_shape, b_shape, tb):
    """x (f32) @ W (f16), weights stored in f16 for an f32 model: the product is f32, W
    widened as it is loaded; x's gradient is f32 and W's is rounded to f16."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal(a_shape).astype(np.float32)
    w = rng.standard_normal(b_shape).astype(np.float16)
    g = Graph()
    tx, tw = g.parameter("x", x.shape, init=x), g.parameter("w", w.shape, init=w, dtype="f16")
    out = g.output("out", g.apply("matmul", [tx, tw], trans_b=tb) + 0.5)
    up = rng.standard_normal(out.shape).astype(np.float32)
    dx, dw = grad((out * g.input("up", up.shape)).sum(), [tx, tw])
    g.output("dx", dx)
    g.output("dw", dw)
    got = build(g, device=device).run({"up": up})
    rx, rw = (
        torch.tensor(x, requires_grad=True),
        torch.tensor(w.astype(np.float32), requires_grad=True),
    )
    ref = rx @ (rw.T if tb else rw) + 0.5
    ref.backward(torch.tensor(up))
    assert (got["out"].dtype, got["dx"].dtype, got["dw"].dtype) == (
        np.float32,
        np.float32,
        np.float16,
    )
    for name, want, tol in (("out", ref, 1e-5), ("dx", rx.grad, 1e-5), ("dw", rw.grad, 1e-3)):
        want = want.detach().numpy()
        atol = tol * np.abs(want).max()
        np.testing.assert_allclose(got[name], want, rtol=tol, atol=atol, err_msg=name)


def test_matmul_precision_is_checked():
    g = Graph()
    g.output("y", g.input("a", (2, 2)) @ g.input("b", (2, 2)))
    with pytest.raises(ValueError, match="matmul_precision"):
        build(g, device="cpu", matmul_precision="medium")


@pytest.mark.parametrize("device", DEVICES)
def test_high_precision_runs_where_there_are_no_matrix_units(device):
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 40, 24)).astype(np.float32), rng.standard_normal((24, 30))
    g = Graph()
    g.output("y", g.input("a", a.shape) @ g.input("b", b.shape))
    got = build(g, device=device, matmul_precision="high").run({"a": a, "b": b})["y"]
    np.testing.assert_allclose(got, a @ b, rtol=1e-2, atol=1e-2)


def built_under_high(g: Graph, M: int, N: int):
    """A GPU session of `g` under matmul_precision="high", and whether its M x N product went
    to the matrix units, which it must exactly where the executor found them correct and
    faster than f32 here and the product fills the GPU."""
    session = build(g, device="gpu", matmul_precision="high")
    program, _ = session._program(tuple(g.outputs.values()), "forward")
    wgsl = [generate(program.plan, k).wgsl for k in program.plan.kernels]
    fills = -(-M // 64) * -(-N // 64) >= UNITS_FILL
    units = session.executor.f32_on_units and fills
    assert any("subgroupMatrix" in text for text in wgsl) == units
    return session, units


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(130, 70, 150), (1000, 70, 600), (1024, 256, 1024)])
def test_high_precision_on_a_gpu(shape):
    M, K, N = shape
    rng = np.random.default_rng(6)
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    g = Graph()
    g.output(
        "y",
        (
            g.apply("matmul", [g.input("a", a.shape), g.input("w", w.shape)], trans_b=True)
            + g.input("bias", bias.shape)
        ).relu(),
    )
    session, units = built_under_high(g, M, N)
    got = session.run({"a": a, "w": w, "bias": bias})["y"]
    if units:
        a, w = a.astype(np.float16), w.astype(np.float16)
    want = np.maximum(a.astype(np.float64) @ w.astype(np.float64).T + bias, 0)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(130, 72, 150), (1024, 256, 1024)])
def test_high_precision_with_f16_weights_on_a_gpu(shape):
    """An f32 x f16 product (f16 weight storage) under "high": on the matrix units where the
    product fills the GPU (x rounded to f16 there), else the SIMT kernels widen the weight."""
    M, K, N = shape
    rng = np.random.default_rng(8)
    a = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float16)
    g = Graph()
    y = g.apply("matmul", [g.input("a", a.shape), g.input("w", w.shape, "f16")], trans_b=True)
    g.output("y", y)
    session, units = built_under_high(g, M, N)
    got = session.run({"a": a, "w": w})["y"]
    x = a.astype(np.float16) if units else a
    want = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("shape", [(128, 96, 192), (150, 40, 260), (256, 64, 512)])
def test_matrix_units_multiply_f16_operands(trans_b, shape):
    """f16 operands run on the matrix units whatever the precision setting (f32
    accumulation loses nothing against the f32 kernels): partial tiles, whole ones, batches."""
    M, K, N = shape
    rng = np.random.default_rng(7)
    a = rng.standard_normal((2, M, K)).astype(np.float16)
    b = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float16)
    g = Graph()
    y = g.apply(
        "matmul", [g.input("a", a.shape, "f16"), g.input("b", b.shape, "f16")], trans_b=trans_b
    )
    g.output("y", y.astype("f32") + 1.0)
    session = build(g, device="gpu")
    if not session.executor.matrix_unit:
        pytest.skip(f"no working subgroup matrices on {session.device}")
    program, _ = session._program((g.outputs["y"],), "forward")
    assert any("subgroupMatrix" in generate(program.plan, k).wgsl for k in program.plan.kernels)
    got = session.run({"a": a, "b": b})["y"]
    bb = b.astype(np.float64).T if trans_b else b.astype(np.float64)
    want = (a.astype(np.float64) @ bb).astype(np.float16).astype(np.float64) + 1.0
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


# -- tile and GEMV shapes -----------------------------------------------------------------------
# The tile and the GEMV workgroup shape follow the product's size; these tests force each tile
# on small products, and draw GEMV sizes on both sides of every workgroup-shape threshold.


def kernel_shapes(M, K, N, trans_b=True):
    """(workgroup size, grid) of the kernel computing x[M, K] @ W (W as nn.Linear's [N, K])."""
    g = Graph()
    w = g.input("w", (N, K) if trans_b else (K, N))
    g.output("y", g.apply("matmul", [g.input("x", (M, K)), w], trans_b=trans_b))
    program, _ = kernels_of(g, ["y"])
    source = generate(program, program.kernels[0])
    size = source.wgsl.split("@workgroup_size(")[1].split(")")[0]
    return math.prod(int(s) for s in size.split(",")), source.grid


def test_small_products_get_small_tiles_with_k_split_inside_the_workgroup():
    # SmolLM2-135M prefill of 128 tokens: QKV, attention output, gate/up, down projections.
    assert choose_tile(128, 960, 1) == Tile(16, 32)  # 240 workgroups rather than 480
    assert choose_tile(128, 576, 1) == Tile(16, 16)
    assert choose_tile(128, 3072, 1) == Tile(32, 32)
    assert choose_tile(1024, 512, 1) == Tile(64, 32)  # the long side along the longer of M, N
    assert choose_tile(512, 1024, 1) == Tile(32, 64)
    assert choose_tile(1024, 1024, 1) == Tile(64, 64)
    assert choose_tile(9, 17, 1) == Tile(16, 16)  # too small to fill anything: smallest tile
    assert [Tile(*s).splits for s in TILE_SHAPES] == [1, 2, 4, 8, 16]
    for M, K, N in ((128, 576, 960), (128, 576, 576), (128, 576, 3072), (128, 1536, 576)):
        # W as [K, N] (not contiguous along k): the split tiles.
        size, grid = kernel_shapes(M, K, N, trans_b=False)
        assert size == 256 and math.prod(grid) >= TILED_WORKGROUPS, (M, K, N, grid)
        # nn.Linear's x @ W^T where the split tile is small: the direct products, 16 x 16
        # outputs a workgroup from 8 lanes per group of outputs, 16 x 8 from 16 lanes for
        # long k. gate/up (N = 3072) keeps its 32 x 32 split tiles (test_direct_products).
        size, grid = kernel_shapes(M, K, N)
        cols = 8 if K >= matmul_direct.LONG_K else 16
        if N < 3072:
            assert (size, grid) == (matmul_direct.WG, (N // cols, M // 16, 1)), (M, K, N, grid)
    # Large products keep 128 x 128 tiles.
    assert kernel_shapes(2048, 576, 2048)[1] == (16, 16, 1)


def test_short_gemvs_spread_over_many_workgroups():
    # Decoding one token: every projection makes at least GEMV_WORKGROUPS workgroups.
    for K, N in ((576, 960), (576, 576), (576, 3072), (1536, 576)):
        assert math.prod(kernel_shapes(1, K, N)[1]) >= GEMV_WORKGROUPS, (K, N)
    assert kernel_shapes(1, 576, 49152) == (256, (6144, 1, 1))  # tied lm_head: 8 columns each
    assert kernel_shapes(1, 576, 576, trans_b=False) == (256, (144, 1, 1))  # x @ W, W [K, N]


def test_long_gemv_rows_are_read_by_wider_teams():
    # Each invocation keeps at least 8 vec4 pieces of its row: 32 per row for a decoding
    # step's rows (576, 1536), 64 from 2048, 128 from 4096 (two rows per workgroup).
    assert kernel_shapes(1, 576, 960) == (64, (480, 1, 1))
    assert kernel_shapes(1, 2048, 2048) == (256, (512, 1, 1))
    assert kernel_shapes(1, 4096, 4096) == (256, (2048, 1, 1))
    assert kernel_shapes(1, 4096, 40) == (128, (40, 1, 1))  # too few columns: one row each


ALL_TILES = [Tile(*shape) for shape in sorted({s for t in TILE_SHAPES for s in (t, t[::-1])})]
EPILOGUES = ["none", "residual", "bias_relu"]


def check_matmul(device, batches, m, k, n, trans_a, trans_b, epilogue, seed):
    """x = op(a) @ op(b), then the epilogue, forward and backward against float64 PyTorch."""
    (batch_a, batch_b), rng = batches, np.random.default_rng(seed)
    arrays = {
        "a": normal(rng, batch_a + ((k, m) if trans_a else (m, k))),
        "b": normal(rng, batch_b + ((n, k) if trans_b else (k, n))),
    }
    if epilogue == "residual":
        arrays["r"] = normal(rng, (*np.broadcast_shapes(batch_a, batch_b), m, n))
    elif epilogue == "bias_relu":
        arrays["r"] = normal(rng, (n,))

    def finish(y, r=None):
        return y if r is None else (y + r if epilogue == "residual" else (y + r).relu())

    check_against_torch(
        lambda a, b, **r: finish(
            a.graph.apply("matmul", [a, b], trans_a=trans_a, trans_b=trans_b), **r
        ),
        arrays,
        device,
        lambda a, b, **r: finish((a.mT if trans_a else a) @ (b.mT if trans_b else b), **r),
        # Operands are doubled in the graph: sums of k products of standard deviation 4.
        atol=1e-5 * 4 * math.sqrt(k),
    )


matmul_batches = mutually_broadcastable_shapes(num_shapes=2, max_dims=2, max_side=3).map(
    lambda b: b.input_shapes
)
# batches, m, k, n, trans_a, trans_b, epilogue, seed
MATMUL_ARGS = (
    matmul_batches,
    st.integers(1, 80),
    st.integers(1, 100),
    st.integers(1, 80),
    st.booleans(),
    st.booleans(),
    st.sampled_from(EPILOGUES),
    seeds,
)


@settings(max_examples=30, deadline=None)
@given(*MATMUL_ARGS)
def test_matmul_random_shapes_and_epilogues_on_the_numpy_executor(
    batches, m, k, n, ta, tb, epilogue, seed
):
    check_matmul("cpu", batches, m, k, n, ta, tb, epilogue, seed)


@pytest.mark.lavapipe
@pytest.mark.parametrize("tile", ALL_TILES, ids=lambda t: f"{t.rows}x{t.cols}")
@settings(max_examples=3, deadline=None)
@given(*MATMUL_ARGS)
def test_every_tile_on_lavapipe(tile, batches, m, k, n, ta, tb, epilogue, seed):
    # Every matmul of the graph (forward and both gradients) runs with this tile.
    with split_tiles(tile):
        check_matmul("vulkan-cpu", batches, m, k, n, ta, tb, epilogue, seed)


# GEMV sizes (m, k, n) on each side of every threshold: 2, 4 or 8 columns per workgroup
# (contiguous k) and 4 or 8 (columns), rows read in straight-line code or in a loop, by 32,
# 64 or 128 invocations per row (contiguous k). Many rows only where the sizes are small:
# lavapipe runs each row's reduction in turn.
GEMV_SIZES = {
    "short": (st.integers(1, GEMV_ROWS), st.integers(1, 40), st.integers(1, 40)),
    "2 columns": (st.integers(1, 2), st.integers(1, 40), st.integers(511, 1020)),
    "4 columns": (st.integers(1, 2), st.integers(1, 40), st.integers(1021, 2040)),
    "8 columns": (st.integers(1, 2), st.integers(1, 40), st.integers(2041, 2100)),
    "long rows": (st.integers(1, 2), st.integers(2049, 2100), st.integers(1, 40)),
    "longer rows": (st.integers(1, 2), st.integers(4096, 4200), st.integers(1, 12)),
}
GEMV_ARGS = (st.booleans(), st.booleans(), st.sampled_from(EPILOGUES), seeds)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(sorted(GEMV_SIZES)).flatmap(lambda r: st.tuples(*GEMV_SIZES[r])), *GEMV_ARGS)
def test_gemv_random_shapes_on_the_numpy_executor(mkn, ta, tb, epilogue, seed):
    check_matmul("cpu", ((), ()), *mkn, ta, tb, epilogue, seed)


@pytest.mark.lavapipe
@pytest.mark.parametrize("sizes", sorted(GEMV_SIZES))
@settings(max_examples=2, deadline=None)
@given(st.data(), *GEMV_ARGS)
def test_every_gemv_shape_on_lavapipe(sizes, data, ta, tb, epilogue, seed):
    mkn = data.draw(st.tuples(*GEMV_SIZES[sizes]), label="m, k, n")
    check_matmul("vulkan-cpu", ((), ()), *mkn, ta, tb, epilogue, seed)


@pytest.mark.lavapipe
@pytest.mark.parametrize("sums", [False, True])
@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 96, 24), (3, 130, 2100), (8, 64, 5), (2, 2052, 3), (1, 4100, 9)]
)
def test_gemv_sums_with_and_without_subgroup_operations(monkeypatch, sums, m, k, n):
    # Devices whose start-up check passes sum a GEMV's lanes through subgroup operations;
    # the others through a tree in workgroup memory. Both, here, with a residual epilogue
    # and an RMSNorm prologue.
    gpu = build(Graph(), device="vulkan-cpu").executor.gpu
    monkeypatch.setitem(gpu.checks, "subgroup_sums", sums)
    rng = np.random.default_rng(m * k * n)
    x, w = rng.normal(size=(m, k)), rng.normal(size=(n, k))
    r, gamma = rng.normal(size=(m, n)), rng.normal(1.0, 0.2, size=k)
    graph = Graph()
    xs, ws = graph.input("x", (m, k)), graph.input("w", (n, k))
    graph.output("y", xs @ ws.T + graph.input("r", (m, n)))
    graph.output("z", F.rms_norm(xs, graph.input("g", (k,)), eps=1e-5) @ ws.T)
    session = build(graph, device="vulkan-cpu")
    feeds = {"x": x, "w": w, "r": r, "g": gamma}
    got = session.run({name: v.astype(np.float32) for name, v in feeds.items()})
    program = session._last
    wgsl = "".join(generate(program.plan, kernel).wgsl for kernel in program.plan.kernels)
    assert ("subgroupAdd" in wgsl) is sums
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * gamma
    np.testing.assert_allclose(got["y"], x @ w.T + r, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["z"], h @ w.T, rtol=1e-4, atol=1e-4)
