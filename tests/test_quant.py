"""GGUF-quantized weights on the device: dequantize (inlined) and quantized_matmul, against
the gguf package's own dequantization."""

import gguf
import numpy as np
import pytest

from meganeura import Graph, build
from meganeura import functional as F
from meganeura.autodiff import grad
from meganeura.backends.wgsl.kernels import generate
from meganeura.io.gguf import QuantizedWeight
from meganeura.lower.rewrite import QUANTIZED_ROWS
from meganeura.ops.quant import dequantize, pack_words, quantized_matmul, quantized_parameter
from tests.harness import direct_products

DEVICES = ["cpu", pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe)]
QTYPES = ["Q8_0", "Q4_0", "Q4_1"]


def quantized(rows: int, cols: int, qtype: str, seed: int = 0) -> QuantizedWeight:
    w = np.random.default_rng(seed).normal(0, 1, (rows, cols)).astype(np.float32)
    blocks = gguf.quantize(w, gguf.GGMLQuantizationType[qtype])
    return QuantizedWeight(qtype, (rows, cols), blocks)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize(
    ("x_shape", "rows", "cols"),
    # Workgroups take 2, 4 or 8 weight rows (2100 rows: 8; 1100: 4; fewer: 2); Q4_1 rows of
    # more than 2048 values are read in a loop, shorter ones in straight-line code.
    [
        ((2, 2080), 5, 2080),
        ((1, 64), 13, 64),
        ((3, 5, 96), 9, 96),
        ((19, 32), 1, 32),  # more than QUANTIZED_ROWS: dense, on the dequantized weight
        ((12, 64), 5, 64),  # two tiles of rows in the quantized kernel
        ((32,), 40, 32),
        ((1, 64), 2100, 64),
        ((2, 32), 1100, 32),
    ],
)
def test_quantized_matmul_matches_dequantized_weights(device, qtype, x_shape, rows, cols):
    weight = quantized(rows, cols, qtype)
    graph = Graph()
    x = graph.input("x", x_shape)
    w = quantized_parameter(graph, "w", weight)
    graph.output("y", quantized_matmul(x, w))
    graph.output("dx", grad((quantized_matmul(x, w) * x.sum()).sum(), [x])[0])
    session = build(graph, device=device)
    data = np.random.default_rng(1).normal(size=x_shape).astype(np.float32)
    got = session.run({"x": data})
    dense = weight.dequantize()
    np.testing.assert_allclose(got["y"], data @ dense.T, rtol=1e-5, atol=1e-4)
    # dx = sum(x) * (column sums of W) + sum(x W^T): two large terms cancelling to a small
    # one, so the float32 error scales with the terms (in float64 here).
    x64, w64 = data.astype(np.float64), dense.astype(np.float64)
    terms = np.abs(x64.sum()) * np.abs(w64.sum(0)).max() + np.abs((x64 @ w64.T).sum())
    dx = np.ones((*x_shape[:-1], rows)) * x64.sum() @ w64 + (x64 @ w64.T).sum()
    np.testing.assert_allclose(got["dx"], dx, rtol=1e-4, atol=max(1e-3, 1e-5 * terms))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_matmul_reads_strided_rows(device, qtype):
    weight = quantized(10, 64, qtype, seed=2)
    graph = Graph()
    x = graph.input("x", (2, 64, 3))
    w = quantized_parameter(graph, "w", weight)
    graph.output("y", quantized_matmul(x.permute(0, 2, 1), w))  # rows read with stride
    session = build(graph, device=device)
    data = np.random.default_rng(3).normal(size=(2, 64, 3)).astype(np.float32)
    got = session.run({"x": data})["y"]
    np.testing.assert_allclose(
        got, data.transpose(0, 2, 1) @ weight.dequantize().T, rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_embedding_of_a_quantized_table_decodes_only_its_rows(device, qtype):
    weight = quantized(50, 64, qtype, seed=4)
    graph = Graph()
    ids = graph.input("ids", (2, 3), "i32")
    table = quantized_parameter(graph, "table", weight)
    graph.output("rows", F.embedding(dequantize(table), ids) * 2.0)
    session = build(graph, device=device)
    chosen = np.array([[0, 49, 7], [7, 1, 30]], np.int32)
    got = session.run({"ids": chosen})["rows"]
    np.testing.assert_allclose(got, weight.dequantize()[chosen] * 2.0, rtol=1e-6, atol=1e-6)


def test_bad_quantized_arguments_are_named():
    graph = Graph()
    raw = graph.parameter("w", (10,), dtype="u32", trainable=False)
    with pytest.raises(ValueError, match=r"needs u32\[40\] raw words"):
        graph.apply("dequantize", [raw], qtype="Q4_1", shape=(4, 64))
    with pytest.raises(ValueError, match="qtype 'Q5_K' is not one of"):
        graph.apply("dequantize", [raw], qtype="Q5_K", shape=(4, 64))
    with pytest.raises(ValueError, match="multiple of 32 columns"):
        graph.apply("dequantize", [raw], qtype="Q8_0", shape=(1, 20))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_siblings_share_one_product_and_keep_their_names(device, qtype):
    # Projections of one input whose weight rows are whole u32 words (every Q4_1 row; Q8_0 and
    # Q4_0 rows of an even block count) are stored side by side and computed by one product.
    cols = 64 if qtype != "Q4_1" else 96
    shapes = {"q": 7, "k": 5, "v": 12}
    weights = {
        n: quantized(rows, cols, qtype, seed=s) for s, (n, rows) in enumerate(shapes.items())
    }
    graph = Graph()
    x = graph.input("x", (3, cols))
    params = {n: quantized_parameter(graph, n, w) for n, w in weights.items()}
    for n, p in params.items():
        graph.output(n, quantized_matmul(x, p) * 2.0)
    data = np.random.default_rng(5).normal(size=(3, cols)).astype(np.float32)
    session = build(graph, device=device)
    got = session.run({"x": data})
    assert session.optimize_report.fusions.get("concat_matmul") == 2
    stored = session.parameters()
    for n, w in weights.items():
        np.testing.assert_allclose(got[n], 2 * data @ w.dequantize().T, rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(stored[n], pack_words(w.blocks))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_matmul_runs_its_residual_and_activation_in_its_store(device, qtype):
    weight = quantized(9, 64, qtype, seed=6)
    graph = Graph()
    x = graph.input("x", (2, 64))
    r = graph.input("r", (2, 9))
    w = quantized_parameter(graph, "w", weight)
    graph.output("y", F.silu(quantized_matmul(x, w) + r))
    rng = np.random.default_rng(7)
    data = {n: rng.normal(size=s).astype(np.float32) for n, s in (("x", (2, 64)), ("r", (2, 9)))}
    session = build(graph, device=device)
    got = session.run(data)["y"]
    z = data["x"] @ weight.dequantize().T + data["r"]
    np.testing.assert_allclose(got, z / (1 + np.exp(-z)), rtol=1e-5, atol=1e-5)
    if device != "cpu":
        assert session.kernel_count == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_rms_norm_runs_inside_the_quantized_matmul_that_reads_it(device, qtype, weighted):
    # Inference: the norm's output has no other reader, so the optimizer moves the norm into
    # the quantized product, which normalizes rows of x as it reads them; the gradients (of
    # the unfused ops) agree with the graph as written.
    weight = quantized(11, 64, qtype, seed=8)
    rng = np.random.default_rng(9)
    x_data = rng.normal(size=(3, 2, 64)).astype(np.float32)
    g_data = rng.normal(1.0, 0.2, size=(64,)).astype(np.float32)

    def graph():
        g = Graph()
        x = g.input("x", x_data.shape)
        gamma = g.input("g", (64,)) if weighted else None
        w = quantized_parameter(g, "w", weight)
        y = g.output("y", quantized_matmul(F.rms_norm(x, gamma, eps=1e-5), w))
        g.output("dx", grad((y * y).sum(), [x])[0])
        return g

    feeds = {"x": x_data, **({"g": g_data} if weighted else {})}
    fused = build(graph(), device=device)
    got = fused.run(feeds, outputs=["y"])["y"]
    assert fused.optimize_report.fusions.get("rms_norm_quantized_matmul", 0) >= 1
    if device != "cpu":
        assert fused.kernel_count == 1
    x64 = x_data.astype(np.float64)
    h = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5) * (g_data if weighted else 1)
    np.testing.assert_allclose(got, h @ weight.dequantize().T, rtol=1e-4, atol=1e-4)
    plain = build(graph(), device=device, optimize=False).run(feeds)
    both = fused.run(feeds)
    np.testing.assert_allclose(both["dx"], plain["dx"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_residual_of_its_own_input(device):
    # y = x W^T + x: the store reads x element by element, so x is not bound as vec4 there.
    weight = quantized(64, 64, "Q4_1", seed=10)
    graph = Graph()
    x = graph.input("x", (3, 64))
    w = quantized_parameter(graph, "w", weight)
    graph.output("y", quantized_matmul(x, w) + x)
    data = np.random.default_rng(11).normal(size=(3, 64)).astype(np.float32)
    got = build(graph, device=device).run({"x": data})["y"]
    np.testing.assert_allclose(got, data @ weight.dequantize().T + data, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", [QUANTIZED_ROWS, QUANTIZED_ROWS + 1])
def test_products_of_many_rows_run_dense_on_the_dequantized_weight(device, rows):
    # A prompt's rows: the optimizer still stores the siblings together and moves the norm
    # into their product, which then runs dense on the dequantized weight (one transient).
    weights = {n: quantized(r, 64, "Q4_1", seed=s) for s, (n, r) in enumerate((("a", 9), ("b", 6)))}
    graph = Graph()
    x = graph.input("x", (rows, 64))
    params = {n: quantized_parameter(graph, n, w) for n, w in weights.items()}
    h = F.rms_norm(x, None, eps=1e-5)
    for n, p in params.items():
        graph.output(n, quantized_matmul(h, p) + 1.0)
    data = np.random.default_rng(12).normal(size=(rows, 64)).astype(np.float32)
    session = build(graph, device=device)
    got = session.run({"x": data})
    products = [n.op for n in session.graph.nodes if "matmul" in n.op]
    dense = rows > QUANTIZED_ROWS
    assert products == ["rms_norm_matmul" if dense else "rms_norm_quantized_matmul"]
    assert any(n.op == "dequantize" for n in session.graph.nodes) == dense
    x64 = data.astype(np.float64)
    norm = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5)
    for n, w in weights.items():
        np.testing.assert_allclose(got[n], norm @ w.dequantize().T + 1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", [*DEVICES, pytest.param("gpu", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize(
    ("rows", "out", "cols", "norm"),
    [
        (40, 48, 64, False),  # split tiles
        (20, 33, 96, True),  # split tiles, partial ones, the norm in the product
        (1024, 512, 64, False),  # 128 x 128 tiles
    ],
)
def test_dense_q4_1_products_decode_as_they_stage(device, qtype, rows, out, cols, norm):
    """A dense product of many rows with a Q4_1 weight decodes the weight's blocks four weights
    at a time as its tiles stage them: one launch, no f32 weight. Other qtypes are widened by
    a `dequantize` launch first. Both against the gguf package's own dequantization."""
    w = quantized(out, cols, qtype, seed=3)
    graph = Graph()
    x = graph.input("x", (rows, cols))
    scale = graph.input("scale", (cols,))
    h = F.rms_norm(x, scale, eps=1e-5) if norm else x
    weight = dequantize(quantized_parameter(graph, "w", w))
    graph.output("y", graph.apply("matmul", [h, weight], trans_b=True) + 1.0)
    rng = np.random.default_rng(13)
    data = rng.normal(size=(rows, cols)).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    session = build(graph, device=device)
    got = session.run({"x": data, "scale": gamma})["y"]
    x64 = data.astype(np.float64)
    if norm:
        x64 = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5) * gamma
    want = x64 @ w.dequantize().astype(np.float64).T + 1
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if device != "cpu":
        program = session._last
        assert len(program.dispatches) == (1 if qtype == "Q4_1" else 2)
        decoded = any("mn_decoded" in generate(program.plan, k).wgsl for k in program.plan.kernels)
        assert decoded == (qtype == "Q4_1")
        # The direct products take the small ones' widened weights, not a Q4_1 weight (their
        # lanes would each decode every weight vec4 they read).
        assert direct_products(session) == (rows < 1024 and qtype != "Q4_1")


@pytest.mark.gpu
def test_decoded_q4_1_products_on_matrix_units():
    """Under "high", a product large enough for the matrix units reads its Q4_1 weight as it
    stages it there too (one launch; x and the decoded weights rounded to f16)."""
    rows, out, cols = 1024, 1024, 256
    w = quantized(out, cols, "Q4_1", seed=4)
    graph = Graph()
    x = graph.input("x", (rows, cols))
    weight = dequantize(quantized_parameter(graph, "w", w))
    graph.output("y", graph.apply("matmul", [x, weight], trans_b=True))
    data = np.random.default_rng(14).normal(size=(rows, cols)).astype(np.float32)
    session = build(graph, device="gpu", matmul_precision="high")
    got = session.run({"x": data})["y"]
    program = session._last
    wgsl = [generate(program.plan, k).wgsl for k in program.plan.kernels]
    units = any("subgroupMatrix" in text for text in wgsl)
    assert units == bool(session.executor.f32_on_units)
    assert len(program.dispatches) == 1
    dense = w.dequantize()
    if units:
        data, dense = data.astype(np.float16), dense.astype(np.float16)
    want = data.astype(np.float64) @ dense.astype(np.float64).T
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_a_decoded_weight_is_read_at_its_offset_in_a_larger_buffer(device):
    """A Q4_1 weight stored after another in one buffer (as siblings are stored together) is
    decoded from its own words: the decode starts at the view's offset."""
    first, second = quantized(8, 64, "Q4_1", seed=5), quantized(24, 64, "Q4_1", seed=6)
    words = [pack_words(w.blocks) for w in (first, second)]
    graph = Graph()
    x = graph.input("x", (40, 64))
    raw = graph.input("raw", (sum(w.size for w in words),), "u32")
    part = raw[words[0].size :]
    weight = graph.apply("dequantize", [part], qtype="Q4_1", shape=(24, 64))
    graph.output("y", graph.apply("matmul", [x, weight], trans_b=True))
    data = np.random.default_rng(14).normal(size=(40, 64)).astype(np.float32)
    session = build(graph, device=device)
    got = session.run({"x": data, "raw": np.concatenate(words)})["y"]
    want = data.astype(np.float64) @ second.dequantize().astype(np.float64).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if device != "cpu":
        assert len(session._last.dispatches) == 1


@pytest.mark.lavapipe
@pytest.mark.parametrize("sums", [False, True])
@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0"])
def test_quantized_products_sum_with_and_without_subgroup_operations(monkeypatch, sums, qtype):
    # Devices whose start-up check passes sum the lanes (and an RMSNorm's squares) through
    # subgroup operations; the others through a tree in workgroup memory. Both, here.
    from meganeura.backends.wgsl.kernels import generate

    gpu = build(Graph(), device="vulkan-cpu").executor.gpu
    monkeypatch.setitem(gpu.checks, "subgroup_sums", sums)
    rng = np.random.default_rng(12)
    x_data = rng.normal(size=(2, 96)).astype(np.float32)
    g_data = rng.normal(1.0, 0.2, size=(96,)).astype(np.float32)
    weights = {
        n: quantized(r, 96, qtype, seed=s) for s, (n, r) in enumerate((("a", 24), ("b", 2100)))
    }
    graph = Graph()
    x, gamma = graph.input("x", x_data.shape), graph.input("g", (96,))
    for name, weight in weights.items():
        w = quantized_parameter(graph, name, weight)
        graph.output(f"plain_{name}", quantized_matmul(x, w))
        graph.output(f"normed_{name}", quantized_matmul(F.rms_norm(x, gamma, eps=1e-5), w))
    session = build(graph, device="vulkan-cpu")
    assert session.executor.subgroup_sums is sums
    got = session.run({"x": x_data, "g": g_data})
    program = session._last
    wgsl = "".join(generate(program.plan, k).wgsl for k in program.plan.kernels)
    assert ("subgroupAdd" in wgsl) is sums
    x64 = x_data.astype(np.float64)
    h = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-5) * g_data
    for name, weight in weights.items():
        dense = weight.dequantize().astype(np.float64)
        np.testing.assert_allclose(got[f"plain_{name}"], x64 @ dense.T, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(got[f"normed_{name}"], h @ dense.T, rtol=1e-4, atol=1e-4)


def test_subgroup_sums_need_the_subgroups_feature():
    from types import SimpleNamespace

    from meganeura.backends.webgpu.subgroups import probe_subgroup_sums

    executor = SimpleNamespace(gpu=SimpleNamespace(has_subgroups=False))
    assert probe_subgroup_sums(executor) is False
