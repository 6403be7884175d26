"""Row writes stored by the product that computes the rows (lower/row_writes.py): a KV cache
write of rotated keys and plain values handed to the q/k/v product's kernel on a WebGPU
device, against NumPy references; writes whose rows the product's tiles cannot hold
together keep a write_rows kernel of their own and the same values."""

import contextlib

import numpy as np
import pytest

from meganeura import Graph, build
from meganeura.lower.row_writes import row_write
from meganeura.ops.rope import rope, rope_frequencies, rope_reference
from meganeura.ops.views import flip, stack
from tests.harness import direct_products, split_tiles

B, T, K, HQ, HKV, D, CAP = 2, 24, 40, 3, 2, 16, 64
ROWS = {
    "rope": lambda k, v, p: stack([rope(k, p), v]),
    "plain": lambda k, v, p: stack([k, v]),
    "interleaved": lambda k, v, p: stack([rope(k, p, interleaved=True), v]),
    "flipped": lambda k, v, p: stack([flip(k, 3), v]),
}


def kv_graph(kind: str, D: int = D) -> Graph:
    """x [B, T, K] through one product with w [(HQ + 2 HKV) D, K]: its q columns rotated
    into output `q`, its k and v columns written by ROWS[kind] into a state cache
    [2, B, HKV, CAP, D] at `position`, whose new value's sum is output `total`."""

    def heads(t, count):  # [B, T, count * D] -> [B, count, T, D]
        return t.reshape(B, T, count, D).permute(0, 2, 1, 3)

    g = Graph()
    x = g.input("x", (B, T, K))
    positions = g.input("positions", (B, T), "i32")
    position = g.input("position", (1,), "i32")
    w = g.parameter("w", ((HQ + 2 * HKV) * D, K))
    y = g.apply("matmul", [x, w], trans_b=True)
    q = heads(y[:, :, : HQ * D], HQ)
    k = heads(y[:, :, HQ * D : (HQ + HKV) * D], HKV)
    v = heads(y[:, :, (HQ + HKV) * D :], HKV)
    cache = g.parameter("cache", (2, B, HKV, CAP, D), state=True)
    written = g.apply("write_rows", [cache, ROWS[kind](k, v, positions), position], axis=3)
    g.write_back(cache, written)
    g.output("q", rope(q, positions))
    g.output("total", written.sum())
    return g


def reference_rows(kind, y, positions, D):
    freq = rope_frequencies(D)
    k = y[..., HQ * D : (HQ + HKV) * D].reshape(B, T, HKV, D).transpose(0, 2, 1, 3)
    v = y[..., (HQ + HKV) * D :].reshape(B, T, HKV, D).transpose(0, 2, 1, 3)
    if kind == "rope":
        k = rope_reference(k, positions, freq, False)
    elif kind == "interleaved":
        k = rope_reference(k, positions, freq, True)
    elif kind == "flipped":
        k = k[..., ::-1]
    return np.stack([k, v])


def row_write_kernels(session):
    """(kernels storing a row write, write_rows kernels) of the session's last program."""
    kernels = session._last.plan.kernels
    stored = [k for k in kernels if k.writes]
    return stored, [k for k in kernels if session.graph.nodes[k.node].op == "write_rows"]


@pytest.mark.parametrize(
    "device",
    [
        pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe),
        pytest.param("gpu", marks=pytest.mark.gpu),
    ],
)
@pytest.mark.parametrize(
    "kind, D",
    # Head dims 16 and 8: RoPE partners 8 columns apart, which tiles of 16 columns hold in
    # their two halves, or 4 apart, several pairs' blocks to a half.
    [*((kind, D) for kind in ROWS), ("rope", 8)],
)
@pytest.mark.parametrize("kernel", ["direct", "split-tiles"])
def test_the_product_stores_the_cache_rows_where_its_tiles_hold_them(kind, D, device, kernel):
    """On the direct products (what such a q/k/v product takes) and on the split tiles."""
    with split_tiles() if kernel == "split-tiles" else contextlib.nullcontext():
        sessions = check_cache_rows(kind, D, device)
        assert (direct_products(sessions[0]) == 1) == (kernel == "direct")


def check_cache_rows(kind, D, device):
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.3, ((HQ + 2 * HKV) * D, K)).astype(np.float32)
    sessions = [build(kv_graph(kind, D), device=d) for d in (device, "cpu")]
    for s in sessions:
        s.set_parameters({"w": w})
    cache = np.zeros((2, B, HKV, CAP, D), np.float32)
    freq = rope_frequencies(D)
    for position in (0, 24, 60):  # the last clamps to CAP - T
        x = rng.normal(size=(B, T, K)).astype(np.float32)
        positions = (position + np.arange(T) + 3 * np.arange(B)[:, None]).astype(np.int32)
        feeds = {"x": x, "positions": positions, "position": np.array([position], np.int32)}
        y = x @ w.T
        start = min(position, CAP - T)
        cache[:, :, :, start : start + T] = reference_rows(kind, y, positions, D)
        q = rope_reference(y[..., : HQ * D].reshape(B, T, HQ, D).transpose(0, 2, 1, 3),
                           positions, freq, False)  # fmt: skip
        for s in sessions:
            got = s.run(feeds, ["q", "total"])
            np.testing.assert_allclose(got["q"], q, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(got["total"], cache.sum(), rtol=1e-4, atol=1e-3)
            state = s.parameters(include_state=True)["cache"]
            np.testing.assert_allclose(state, cache, rtol=1e-4, atol=1e-4)
    stored, kernels = row_write_kernels(sessions[0])
    if kind in ("rope", "plain"):
        assert len(stored) == 1 and not kernels
        assert stored[0].writes[0].pair == (D // 2 if kind == "rope" else 0)
    else:  # RoPE pairs 1 column apart (not a multiple of 4), a flip: a kernel of its own
        assert not stored and len(kernels) == 1
    return sessions


def analysed(kind):
    g = kv_graph(kind)
    (written,) = [n.id for n in g.nodes if n.op == "write_rows"]
    (product,) = [n.id for n in g.nodes if n.op == "matmul"]
    sources = {n.id for n in g.nodes if n.op in ("input", "parameter", "constant")}
    return row_write(g, written, product, sources | {product})


def test_the_analysis_finds_each_rows_element_and_its_rope_partner():
    found = analysed("rope")
    N = (HQ + 2 * HKV) * D
    assert found is not None and found.pair == D // 2 and found.tokens == T
    # rows [2, B, HKV, T, D]: column HQ * D + s * HKV * D + h * D + d of row (b, t) holds
    # rows[s, b, h, t, d]; the q columns hold none
    rows = np.arange(2 * B * HKV * T * D).reshape(2, B, HKV, T, D)
    for b, t, c in ((0, 0, 0), (1, 5, HQ * D + 17), (1, T - 1, N - 1), (0, 3, HQ * D + D)):
        if c < HQ * D:
            assert found.columns[c] == -1
            continue
        s, rest = divmod(c - HQ * D, HKV * D)
        h, d = divmod(rest, D)
        at = found.columns[c] + b * found.sequence_stride + t * found.row_stride
        assert at == rows[s, b, h, t, d]
    assert analysed("plain").pair == 0
    assert analysed("interleaved") is None  # partners 1 column apart
    assert analysed("flipped") is None  # flip is not among the index views
