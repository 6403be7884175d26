"""rms_norm_matmul and layer_norm_matmul, a norm applied by the matmul as it loads its rows:
forward and backward against PyTorch through every matmul kernel variant, the choice of
variant, and errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meganeura import Graph, build
from meganeura.backends.wgsl import matmul_direct
from meganeura.backends.wgsl.kernels import generate
from meganeura.backends.wgsl.matmul_simt import TILE_SHAPES, Tile
from meganeura.lower.plan import plan as make_plan
from tests.harness import split_tiles
from tests.torch_check import check, normal

PARAMS = {"rms_norm_matmul": (0, 1), "layer_norm_matmul": (0, 1, 2)}
EPS = 1e-5

# (x shape, b shape, trans_b), each selecting a kernel variant on a device.
CASES = [
    ((1, 12), (20, 12), True),  # GEMV, weights contiguous along k, vec4 loads
    ((3, 13), (9, 13), True),  # GEMV, scalar loads
    ((2, 8, 600), (600, 70), False),  # GEMV over columns, batched, long rows
    ((70, 33), (20, 33), True),  # small-product tiles (16 x 16, k split), rows past a tile
    ((2, 1, 70, 40), (3, 20, 40), True),  # small-product tiles, vec4 loads, broadcast batch
    ((32, 130, 20), (20, 130), False),  # 128 x 128 tiles (enough of them)
    ((1, 1), (3, 1), True),  # rows of one element
]
ALL_TILES = [Tile(*shape) for shape in sorted({s for t in TILE_SHAPES for s in (t, t[::-1])})]
OPS = [(op, n) for op, counts in PARAMS.items() for n in counts]


def torch_norm_matmul(op: str, trans_b: bool):
    def run(x, *rest):
        *params, b = rest
        if op == "layer_norm_matmul":
            x = x - x.mean(-1, keepdim=True)
        h = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + EPS)
        if params:
            h = h * params[0]
        if len(params) == 2:
            h = h + params[1]
        return h @ (b.mT if trans_b else b)

    return run


def norm_matmul(op: str, trans_b: bool):
    def run(x, *rest):
        return x.graph.apply(op, [x, *rest], eps=EPS, trans_b=trans_b)

    return run


def inputs_for(op: str, params: int, x_shape, b_shape, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    # An offset from zero: layer_norm's variance is computed about the mean.
    x = normal(rng, *x_shape, scale=2.0) + 3.0
    out = {"x": x}
    for name in ("w", "bias")[:params]:
        out[name] = normal(rng, x_shape[-1])
    out["b"] = normal(rng, *b_shape)
    return out


def check_case(op, params, case, device, seed=0, transposed=False):
    """With `transposed`, x is given as its transpose and read through a transposed view:
    rows of A run down the buffer's columns."""
    x_shape, b_shape, trans_b = case
    inputs = inputs_for(op, params, x_shape, b_shape, seed)
    # Sums over up to a few hundred terms: f32 errors scale with the result.
    scale = max(1.0, np.abs(inputs["b"]).sum(-2 if not trans_b else -1).max())
    fn, torch_fn = norm_matmul(op, trans_b), torch_norm_matmul(op, trans_b)
    if transposed:
        inputs["x"] = np.ascontiguousarray(np.swapaxes(inputs["x"], -1, -2))
        fn = (lambda f: lambda x, *rest: f(x.transpose(-2, -1), *rest))(fn)
        torch_fn = (lambda f: lambda x, *rest: f(x.mT, *rest))(torch_fn)
    check(fn, torch_fn, inputs, device, rtol=1e-4, atol=1e-5 * scale)


def device_cases():
    """Everything on the NumPy executor; on lavapipe (pipelines compile slowly) every kernel
    variant with rms_norm's weight, layer_norm's weight and bias on the main variants, and
    the other parameter counts on the first."""
    out = [
        pytest.param("cpu", case, op, n, id=f"cpu-{op}-{n}-{k}")
        for k, case in enumerate(CASES)
        for op, n in OPS
    ]
    lavapipe = [(k, "rms_norm_matmul", 1) for k in range(len(CASES))]
    lavapipe += [(k, "layer_norm_matmul", 2) for k in (0, 2, 3, 5)]
    lavapipe += [
        (0, "rms_norm_matmul", 0),
        (0, "layer_norm_matmul", 0),
        (0, "layer_norm_matmul", 1),
    ]
    out += [
        pytest.param(
            "vulkan-cpu", CASES[k], op, n, marks=pytest.mark.lavapipe, id=f"vk-{op}-{n}-{k}"
        )
        for k, op, n in lavapipe
    ]
    return out


@pytest.mark.parametrize(("device", "case", "op", "params"), device_cases())
def test_norm_matmul_and_gradients_match_torch(device, case, op, params):
    check_case(op, params, case, device)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(OPS),
    st.lists(st.integers(1, 3), max_size=2),
    st.tuples(st.integers(1, 12), st.integers(1, 20), st.integers(1, 12)),
    st.booleans(),
    st.integers(0, 2**32 - 1),
)
def test_norm_matmul_random_shapes(op_params, batch, mkn, trans_b, seed):
    (op, params), (m, k, n) = op_params, mkn
    b_shape = (n, k) if trans_b else (k, n)
    check_case(op, params, ((*batch, m, k), b_shape, trans_b), "cpu", seed)


# (op, parameters, tile, x transposed): every tile shape with rms_norm's weight, reading x
# along k; layer_norm's weight and bias, and x read through a transposed view, on a few.
TILE_CASES = [("rms_norm_matmul", 1, tile, False) for tile in ALL_TILES]
TILE_CASES += [("layer_norm_matmul", 2, ALL_TILES[k], False) for k in (0, 3, 6)]
TILE_CASES += [("rms_norm_matmul", 1, ALL_TILES[k], True) for k in (0, 6)]
TILE_CASES += [("rms_norm_matmul", 0, ALL_TILES[k], False) for k in (2, 5)]
TILE_CASES += [("layer_norm_matmul", 2, ALL_TILES[4], True)]


@pytest.mark.lavapipe
@pytest.mark.parametrize(
    ("op", "params", "tile", "transposed"),
    TILE_CASES,
    ids=[f"{op}-{t.rows}x{t.cols}{'-xT' if tr else ''}" for op, _, t, tr in TILE_CASES],
)
@pytest.mark.parametrize("k", [37, 40, 260], ids=["k37", "k40-vec4", "k260-vec4-steps"])
def test_every_tile_normalizes_its_rows_on_lavapipe(op, params, tile, transposed, k):
    """Every small-product tile (k split among invocation groups, statistics in the staging
    memory) on rows past a tile and k off the staging depth; with k a multiple of 4, x is
    loaded and its statistics read as vec4 (unless transposed); k = 260 takes several steps
    of every tile's depth, through two stages or one (ONE_STAGE_TILES)."""
    with split_tiles(tile):
        check_case(op, params, ((70, k), (20, k), True), "vulkan-cpu", transposed=transposed)


@pytest.mark.lavapipe
@pytest.mark.parametrize("op", sorted(PARAMS))
def test_large_tiles_with_x_transposed_on_lavapipe(op):
    """128 x 128 tiles reading four rows of x per load (x through a transposed view)."""
    check_case(op, 1, ((32, 130, 20), (20, 130), False), "vulkan-cpu", transposed=True)


def _plan(op: str, params: int | None, x_shape, b_shape, trans_b: bool, options: dict):
    """The plan of `op` (or with params None, the plain matmul) of a product of x, and its
    kernel computing the result."""
    g = Graph()
    x = g.input("x", x_shape)
    b = g.input("b", b_shape)
    if params is None:
        y = g.apply("matmul", [x * 2.0, b], trans_a=False, trans_b=trans_b)
    else:
        p = [g.input(f"p{i}", (x_shape[-1],)) for i in range(params)]
        y = norm_matmul(op, trans_b)(x * 2.0, *p, b)
    out = g.output("y", y)
    program = make_plan(g, [out.id], {})
    program.options = options
    return program, next(k for k in program.kernels if k.node == out.id)


def _workgroup_memory(wgsl: str) -> list[str]:
    return re.findall(r"var<workgroup> .*;", wgsl)


@pytest.mark.parametrize("op", sorted(PARAMS))
@pytest.mark.parametrize(
    ("case", "tile"),
    [
        (((1, 64), (300, 64), True), None),  # GEMV, weights contiguous along k
        (((3, 40), (40, 70), False), None),  # GEMV over columns
        (((1100, 64), (1100, 64), True), (64, 64)),
        (((128, 576), (576, 576), True), "direct"),  # a prefill's projection
        (((512, 64), (64, 1024), False), (32, 64)),
        (((32, 130, 20), (20, 130), False), (128, 128)),  # enough 128 x 128 tiles
    ],
)
def test_a_norm_prologue_changes_no_kernel_choice(op, case, tile):
    """The norm runs in the kernel a plain matmul of the same shapes takes, on the same grid;
    the SIMT tiles lend their staging memory to the statistics (the tiles fill the 16 KiB
    that WebGPU guarantees), so their workgroup memory stays the same too. The direct
    products stage nothing: a layer norm's statistics take memory of their own there."""
    plain_plan, plain_kernel = _plan(op, None, *case, {})
    plain = generate(plain_plan, plain_kernel)
    program, fused_kernel = _plan(op, 1, *case, {})
    fused = generate(program, fused_kernel)
    assert fused.grid == plain.grid
    # An RMSNorm on the split tiles and the direct products scales the outputs
    # (NormPrologue.defer); the others compute their rows' statistics first.
    deferred = op == "rms_norm_matmul" and tile is not None and tile != (128, 128)
    assert ("nm_rstd" in fused.wgsl) != deferred
    assert ("nm_sq0 +=" in fused.wgsl) == deferred
    if tile == "direct":
        (m, _), n = case[0], case[1][0]
        layout = matmul_direct.layout(case[0][1])
        assert fused.grid == (-(-n // layout.cols), -(-m // layout.rows), 1)
        assert "@workgroup_size(64)" in fused.wgsl and "dp_red" in fused.wgsl
        names = {line.split()[1] for line in _workgroup_memory(fused.wgsl)}
        assert {line.split()[1] for line in _workgroup_memory(plain.wgsl)} == {"dp_red:"}
        layer_norm = {"dp_red:", "nm_rstd:", "nm_mean:", "nm_red:"}
        assert names == ({"dp_red:"} if deferred else layer_norm), names
    elif tile is not None:
        (*batch, m, _), b_shape = case[0], case[1]
        n = b_shape[-2] if case[2] else b_shape[-1]
        rows, cols = tile
        assert fused.grid == (-(-n // cols), -(-m // rows), int(np.prod(batch)))
        assert _workgroup_memory(fused.wgsl) == _workgroup_memory(plain.wgsl)
        assert "var<workgroup> nm_" not in fused.wgsl


def test_matrix_units_stage_normalized_rows():
    """With matrix units, the normalized rows are staged through workgroup memory as f16
    (the matrix loads cannot normalize)."""
    options = {
        "matrix_unit": "load_layout",
        "f32_on_units": True,
        "matmul_precision": "high",
    }
    program, kernel = _plan("rms_norm_matmul", 1, (1024, 32), (32, 640), False, options)
    source = generate(program, kernel)
    assert "subgroupMatrixMultiplyAccumulate" in source.wgsl
    assert "nm_rstd" in source.wgsl


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(PARAMS))
@pytest.mark.parametrize("case", [((1100, 72), (900, 72), True), ((2, 640, 64), (64, 512), False)])
def test_norm_matmul_on_matrix_units(op, case):
    """Under matmul_precision="high", normalized rows staged as f16 on the matrix units
    (where the executor found them faster): the error is f16 rounding of the operands."""
    x_shape, b_shape, trans_b = case
    inputs = inputs_for(op, len(PARAMS[op]) - 1, x_shape, b_shape)
    g = Graph()
    tensors = [g.input(name, value.shape) for name, value in inputs.items()]
    g.output("y", norm_matmul(op, trans_b)(*tensors))
    session = build(g, device="gpu", matmul_precision="high")
    program, _ = session._program((g.outputs["y"],), "forward")
    wgsl = "".join(generate(program.plan, k).wgsl for k in program.plan.kernels)
    assert ("subgroupMatrix" in wgsl) == session.executor.f32_on_units
    got = session.run(inputs)["y"]
    want = torch_norm_matmul(op, trans_b)(
        *(torch.tensor(v, dtype=torch.float64) for v in inputs.values())
    ).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 2e-3


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ([(4, 8), (8,), (5, 7)], "rms_norm_matmul: matmul: inner dims differ"),
        ([(4, 8), (7,), (8, 5)], r"rms_norm_matmul: rms_norm: weight must be f32\[8\]"),
        ([(4, 8), (8,), (8,), (8, 5)], "takes x, up to 1 rms_norm parameters"),
    ],
)
def test_errors_name_the_op_and_the_shapes(inputs, message):
    g = Graph()
    tensors = [g.input(f"t{i}", shape) for i, shape in enumerate(inputs)]
    with pytest.raises(ValueError, match=message):
        g.apply("rms_norm_matmul", tensors, eps=EPS)


def test_negative_eps_is_rejected():
    g = Graph()
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        g.apply("layer_norm_matmul", [g.input("x", (2, 3)), g.input("b", (3, 4))], eps=-1.0)


@pytest.mark.lavapipe
def test_norm_matmul_with_an_epilogue_on_lavapipe():
    """The product passes through the residual add that reads it (the matmul's epilogue)."""
    rng = np.random.default_rng(5)
    x, w = normal(rng, 3, 16) + 1.0, normal(rng, 16)
    b, r = normal(rng, 24, 16), normal(rng, 3, 24)
    g = Graph()
    tx, tw, tb, tr = (g.input(n, a.shape) for n, a in zip("xwbr", (x, w, b, r), strict=True))
    g.output("y", tr + g.apply("rms_norm_matmul", [tx, tw, tb], eps=EPS, trans_b=True))
    session = build(g, device="vulkan-cpu")
    graph = session.graph
    kernels = make_plan(graph, [graph.outputs["y"]], {}).kernels
    assert [(graph.nodes[k.core].op, graph.nodes[k.node].op) for k in kernels] == [
        ("rms_norm_matmul", "add")
    ]
    got = session.run({"x": x, "w": w, "b": b, "r": r})["y"]
    t = {n: torch.tensor(a, dtype=torch.float64) for n, a in zip("xwbr", (x, w, b, r), strict=True)}
    x64 = t["x"]
    want = (
        t["r"] + (x64 * torch.rsqrt((x64 * x64).mean(-1, keepdim=True) + EPS) * t["w"]) @ t["b"].T
    )
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-5)
