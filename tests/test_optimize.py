"""The e-graph optimizer: each rewrite on its own, random graphs, training, repeated blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meganeura import Graph, build, grad, optim
from meganeura import functional as F
from meganeura.nn import MLP
from meganeura.optimize import optimize
from tests.optimize_check import assert_same_values, check_optimized, op_counts

SQRT_2_OVER_PI = math.sqrt(2 / math.pi)

# -- decomposed patterns ---------------------------------------------------------------------


def negate(x):
    return -x


def softmax_decomposed(x, axis=-1):
    e = (x - x.max(axis, keepdims=True)).exp()
    return e / e.sum(axis, keepdims=True)


def softmax_unshifted(x, axis=-1):
    e = x.exp()
    return e / e.sum(axis, keepdims=True)


def log_softmax_decomposed(x, axis=-1):
    shifted = x - x.max(axis, keepdims=True)
    return shifted - shifted.exp().sum(axis, keepdims=True).log()


def log_softmax_logsumexp(x, axis=-1):
    m = x.max(axis, keepdims=True)
    return x - (m + (x - m).exp().sum(axis, keepdims=True).log())


def gelu_tanh_hf(x):
    return 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x**3.0)).tanh())


def gelu_tanh_onnx(x):
    inner = (x + x * x * x * 0.044715) * SQRT_2_OVER_PI
    return x * 0.5 * (inner.tanh() + 1.0)


def gelu_tanh_halved(x):
    return (x * (1.0 + ((x + 0.044715 * (x * (x * x))) * SQRT_2_OVER_PI).tanh())) / 2.0


def sigmoid_decomposed(x):
    return 1.0 / (1.0 + (-x).exp())


def erf(x):
    return x.graph.apply("erf", [x])


def gelu_erf_torch(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_erf_onnx(x):
    return x * (erf(x * (1 / math.sqrt(2.0))) + 1.0) * 0.5


def rms_norm_hf(x, weight=None):
    normed = x * ((x**2.0).mean(-1, keepdims=True) + 1e-5).rsqrt()
    return normed if weight is None else weight * normed


def rms_norm_onnx(x, weight=None):
    normed = x / ((x * x).mean(-1, keepdims=True) + 1e-6).sqrt()
    return normed if weight is None else normed * weight


def layer_norm_decomposed(x, weight=None, bias=None):
    d = x - x.mean(-1, keepdims=True)
    out = d / ((d**2.0).mean(-1, keepdims=True) + 1e-5).sqrt()
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def rotate_half(x):
    from meganeura.ops.views import concat, slice_axis

    n = x.shape[-1]
    if n < 2:
        return x
    return concat([-slice_axis(x, -1, n // 2, n), slice_axis(x, -1, 0, n // 2)], -1)


def last_dim_parameter(x, name):
    return x.graph.parameter(name, (x.shape[-1],), init="normal")


PATTERNS = [
    ("silu", lambda x: x * x.sigmoid(), "silu"),
    ("silu-reversed", lambda x: x.sigmoid() * x, "silu"),
    ("silu-quotient", lambda x: x / ((-x).exp() + 1.0), "silu"),
    ("swiglu", lambda x: (x * x.sigmoid()) * x.tanh(), "swiglu"),
    ("gelu-erf-torch", gelu_erf_torch, "gelu"),
    ("gelu-erf-onnx", gelu_erf_onnx, "gelu"),
    ("rms-norm", rms_norm_hf, "rms_norm"),
    ("rms-norm-onnx", rms_norm_onnx, "rms_norm"),
    ("rms-norm-weight", lambda x: rms_norm_hf(x, last_dim_parameter(x, "w")), "rms_norm"),
    (
        "rms-norm-onnx-weight",
        lambda x: rms_norm_onnx(x, last_dim_parameter(x, "w")),
        "rms_norm",
    ),
    ("layer-norm", layer_norm_decomposed, "layer_norm"),
    (
        "layer-norm-affine",
        lambda x: layer_norm_decomposed(x, last_dim_parameter(x, "w"), last_dim_parameter(x, "b")),
        "layer_norm",
    ),
    ("softmax", softmax_decomposed, "softmax"),
    ("softmax-unshifted", softmax_unshifted, "softmax"),
    ("softmax-axis0", lambda x: softmax_decomposed(x, 0), "softmax"),
    ("log-softmax", log_softmax_decomposed, "log_softmax"),
    ("log-softmax-logsumexp", log_softmax_logsumexp, "log_softmax"),
    ("log-of-softmax", lambda x: x.softmax(-1).log(), "log_softmax"),
    ("gelu-tanh-hf", gelu_tanh_hf, "gelu_tanh"),
    ("gelu-tanh-onnx", gelu_tanh_onnx, "gelu_tanh"),
    ("gelu-tanh-halved", gelu_tanh_halved, "gelu_tanh"),
    ("sigmoid", sigmoid_decomposed, "sigmoid"),
]


@pytest.mark.parametrize("shape", [(3, 5), (2, 1, 7), (1,)])
@pytest.mark.parametrize(("name", "build_fn", "op"), PATTERNS, ids=[p[0] for p in PATTERNS])
def test_decomposed_pattern_becomes_one_op(name, build_fn, op, shape):
    g = Graph()
    x = g.input("x", shape)
    g.output("y", build_fn(x * 1.5))
    result = check_optimized(g)
    counts = op_counts(result.graph)
    assert counts[op] == 1, (name, counts)
    assert result.report.kernels_after <= result.report.kernels_before
    # Only the recognized op and the scaling remain (and the tanh swiglu multiplies by).
    sources = counts["input"] + counts["constant"] + counts["parameter"]
    assert sum(counts.values()) - sources <= 2 + (op == "swiglu"), counts


@pytest.mark.parametrize(("shape", "theta"), [((2, 3, 5, 8), 10000.0), ((1, 1, 4, 2), 1e5)])
def test_rotary_embedding_with_constant_tables_becomes_rope(shape, theta):
    from tests.llama_graphs import rope_tables

    t, d = shape[2:]
    g = Graph()
    x = g.input("x", shape)
    cos, sin = rope_tables(g, d, theta, t)
    g.output("y", (x * cos + rotate_half(x) * sin) * 2.0)
    g.output("z", sin * rotate_half(x) + cos * x)
    result = check_optimized(g)
    counts = op_counts(result.graph)
    assert counts["rope"] == 1 and counts["concat"] == 0, counts


def test_tables_that_are_not_rotations_stay_as_they_are():
    g = Graph()
    x = g.input("x", (1, 2, 3, 4))
    cos = g.constant(np.random.default_rng(0).random((3, 4)).astype(np.float32))
    g.output("y", x * cos + rotate_half(x) * cos)
    result = check_optimized(g)
    assert op_counts(result.graph)["rope"] == 0


def test_weight_of_another_length_is_not_a_norm_weight():
    g = Graph()
    x = g.input("x", (3, 1))
    w = g.parameter("w", (4,), init="normal")
    g.output("y", rms_norm_hf(x, w))
    result = check_optimized(g)
    norm = next(n for n in result.graph.nodes if n.op == "rms_norm")
    assert len(norm.inputs) == 1


def test_rms_norm_over_another_axis_is_not_recognized():
    g = Graph()
    x = g.input("x", (3, 5))
    g.output("y", x * ((x * x).mean(0, keepdims=True) + 1e-5).rsqrt())
    result = check_optimized(g)
    assert op_counts(result.graph)["rms_norm"] == 0


# -- norms into the matmul that reads them -----------------------------------------------------

NORM_SPELLINGS = [
    ("rms-norm", lambda x, w, b: F.rms_norm(x, w, 1e-5), "rms_norm_matmul"),
    ("rms-norm-hf", lambda x, w, b: rms_norm_hf(x, w), "rms_norm_matmul"),
    ("rms-norm-unweighted", lambda x, w, b: rms_norm_onnx(x), "rms_norm_matmul"),
    ("layer-norm", lambda x, w, b: F.layer_norm(x, w, b), "layer_norm_matmul"),
    ("layer-norm-decomposed", lambda x, w, b: layer_norm_decomposed(x, w, b), "layer_norm_matmul"),
    ("layer-norm-plain", lambda x, w, b: layer_norm_decomposed(x), "layer_norm_matmul"),
]


def norm_inputs(g: Graph, shape):
    x = g.input("x", shape)
    w, b = (g.parameter(n, (shape[-1],), init="normal") for n in ("nw", "nb"))
    return x, w, b


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8), (1, 8)])
@pytest.mark.parametrize(
    ("name", "norm", "fused"), NORM_SPELLINGS, ids=[n for n, _, _ in NORM_SPELLINGS]
)
def test_norm_read_by_a_matmul_alone_runs_in_it(name, norm, fused, shape, trans_b):
    g = Graph()
    x, w, b = norm_inputs(g, shape)
    weight = g.input("weight", (6, shape[-1]) if trans_b else (shape[-1], 6))
    g.output("y", g.apply("matmul", [norm(x, w, b), weight], trans_b=trans_b))
    result = check_optimized(g)
    counts = op_counts(result.graph)
    assert counts[fused] == 1 and counts["matmul"] == 0, counts
    assert result.report.kernels_after == 1
    assert result.report.fusions[fused] == 1


def test_norm_whose_output_is_read_elsewhere_keeps_its_kernel():
    """Fusing would compute the norm twice and save no launch: the cost model says no."""
    g = Graph()
    x, w, _ = norm_inputs(g, (4, 8))
    h = g.output("h", F.rms_norm(x, w, 1e-5))
    g.output("y", h @ g.input("weight", (8, 6)))
    result = check_optimized(g)
    counts = op_counts(result.graph)
    assert counts["rms_norm"] == 1 and counts["rms_norm_matmul"] == 0, counts


def test_norm_read_by_two_matmuls_runs_in_both():
    """Each matmul reads the rows once more for their statistics: cheaper than a launch and
    a round trip of the normalized rows."""
    g = Graph()
    x, w, _ = norm_inputs(g, (4, 8))
    h = F.rms_norm(x, w, 1e-5)
    g.output("y", h @ g.input("w1", (8, 6)))
    g.output("z", h @ g.input("w2", (8, 5)))
    result = check_optimized(g)
    counts = op_counts(result.graph)
    assert counts["rms_norm_matmul"] == 2 and counts["rms_norm"] == 0, counts
    assert result.report.kernels_after == 2


def test_norm_before_the_last_position_reaches_the_logits_matmul():
    """A language model's logits of every position and of the last one: the norm moves
    inside the row slice and the reshape, and both matmuls normalize their rows."""
    g = Graph()
    x, w, _ = norm_inputs(g, (2, 5, 8))
    head = g.input("head", (11, 8))
    hidden = F.rms_norm(x * 2.0, w, 1e-5)
    g.output("logits", g.apply("matmul", [hidden, head], trans_b=True))
    g.output("last", g.apply("matmul", [hidden[:, -1, :], head], trans_b=True))
    result = check_optimized(g)
    counts = op_counts(result.graph)
    assert counts["rms_norm_matmul"] == 2 and counts["rms_norm"] == 0, counts


@pytest.mark.parametrize(
    "cut",
    [
        lambda h: h[:, :4],  # a slice of the normalized axis
        lambda h: h.reshape(4, 4),  # a reshape that regroups the rows
    ],
    ids=["slice", "reshape"],
)
def test_norm_does_not_move_through_views_that_cut_its_rows(cut):
    g = Graph()
    x, w, _ = norm_inputs(g, (2, 8))
    hidden = cut(F.rms_norm(x, w, 1e-5))
    g.output("y", hidden @ g.input("weight", (4, 3)))
    result = check_optimized(g)
    assert op_counts(result.graph)["rms_norm_matmul"] == 0


def test_training_keeps_the_norms_its_weight_gradients_read():
    """Before autodiff the backward pass does not exist; after it, the weight gradient of the
    matmul reads the normalized rows, so the norm keeps its kernel and nothing is fused."""
    g = Graph()
    x, w, _ = norm_inputs(g, (6, 8))
    labels = g.input("labels", (6,), "i32")
    proj = g.parameter("proj", (5, 8), init="normal")
    logits = g.output("logits", g.apply("matmul", [F.rms_norm(x, w, 1e-5), proj], trans_b=True))
    loss = F.cross_entropy(logits, labels)
    forward = optimize(g, [loss.id], before_autodiff=True)
    assert op_counts(forward.graph, [forward.ids[loss.id]])["rms_norm_matmul"] == 0
    session = build(g, loss, optim.SGD(lr=0.1), device="cpu")
    assert op_counts(session.graph)["rms_norm_matmul"] == 0
    assert "rms_norm_matmul" not in session.optimize_report.fusions
    plain = build(g, loss, optim.SGD(lr=0.1), device="cpu", optimize=False)
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((6, 8)).astype(np.float32),
        "labels": rng.integers(0, 5, 6).astype(np.int32),
    }
    np.testing.assert_allclose(steps(session, feeds), steps(plain, feeds), rtol=1e-5)


@pytest.mark.parametrize("shape", [(4, 7), (2, 3, 5), (1, 3)])
def test_log_softmax_and_label_gather_become_cross_entropy(shape):
    g = Graph()
    logits = g.input("logits", shape)
    labels = g.input("labels", shape[:-1], "i32")
    picked = g.apply(
        "gather", [log_softmax_decomposed(logits * 2.0), labels.reshape(*shape[:-1], 1)], axis=-1
    )
    g.output("loss", -(picked.mean()))
    result = check_optimized(g, ints={"labels": shape[-1]})
    counts = op_counts(result.graph)
    assert counts["cross_entropy_rows"] == 1 and counts["log_softmax"] == 0, counts
    assert result.report.kernels_after == 2


def test_pattern_with_an_extra_reader_of_an_inner_value_stays_correct():
    g = Graph()
    x = g.input("x", (4, 6))
    e = (x - x.max(-1, keepdims=True)).exp()
    g.output("p", e / e.sum(-1, keepdims=True))
    g.output("e", e * 2.0)
    check_optimized(g)


def test_softmax_shifted_by_another_axis_max_keeps_the_shift():
    """exp(x - max over axis 0) normalized over axis 1 is softmax(x - m), not softmax(x)."""
    g = Graph()
    x = g.input("x", (4, 6))
    e = (x - x.max(0, keepdims=True)).exp()
    g.output("y", e / e.sum(-1, keepdims=True))
    result = check_optimized(g)
    new = result.graph
    softmax = next(n for n in new.nodes if n.op == "softmax")
    assert new.nodes[softmax.inputs[0]].op == "sub"


@pytest.mark.parametrize(
    ("name", "fn", "gone"),
    [
        ("double-negation", lambda x: negate(negate(x)), "neg"),
        ("times-one", lambda x: (x * 1.0) / 1.0 + 0.0 - 0.0, "mul"),
        ("permute-inverse", lambda x: x.permute(2, 0, 1).permute(1, 2, 0), "permute"),
        ("reshape-chain", lambda x: x.reshape(6, 4).reshape(2, 12).reshape(2, 3, 4), "reshape"),
        ("broadcast-identity", lambda x: x.broadcast_to((2, 3, 4)), "broadcast_to"),
        ("cast-identity", lambda x: x.astype("f32"), "cast"),
        ("power-one", lambda x: x**1.0, "pow"),
    ],
)
def test_algebra_removes_the_op(name, fn, gone):
    g = Graph()
    x = g.input("x", (2, 3, 4))
    g.output("y", fn(x).exp())
    result = check_optimized(g)
    assert op_counts(result.graph)[gone] == 0, (name, op_counts(result.graph))


def test_scalar_factors_fold_into_one():
    g = Graph()
    x = g.input("x", (3, 4))
    g.output("y", negate(negate(((2.0 * x) * 3.0) / 4.0 * 0.5)))
    result = check_optimized(g)
    counts = op_counts(result.graph)
    assert counts["mul"] == 1 and counts["div"] == 0 and counts["neg"] == 0, counts


def test_identity_that_would_change_the_shape_is_not_applied():
    g = Graph()
    x = g.input("x", (3,))
    one = g.constant(np.ones((2, 1), np.float32))
    g.output("y", x * one)
    result = check_optimized(g)
    assert result.graph.nodes[result.graph.outputs["y"]].type.shape == (2, 3)


@pytest.mark.parametrize(("ta", "tb"), [(False, True), (True, False), (True, True)])
def test_matmul_reads_a_permuted_operand_transposed(ta, tb):
    g = Graph()
    a = g.input("a", (2, 4, 3))
    b = g.input("b", (2, 3, 5))
    ap = a.transpose(-1, -2) if ta else a.transpose(-1, -2).transpose(-1, -2)
    bp = b.transpose(-1, -2) if tb else b
    lhs = ap.transpose(-1, -2) if ta else ap
    rhs = bp.transpose(-1, -2) if tb else bp
    g.output("y", lhs @ rhs)
    result = check_optimized(g)
    assert op_counts(result.graph)["permute"] == 0


def test_scaled_matmul_moves_the_scalar_out():
    g = Graph()
    q = g.input("q", (2, 3, 4))
    k = g.input("k", (2, 5, 4))
    g.output("s", ((q * 0.5) @ k.transpose(-1, -2)).exp())
    result = check_optimized(g)
    assert result.report.kernels_after == 1  # the scaling and exp run as the epilogue
    matmul = next(n for n in result.graph.nodes if n.op == "matmul")
    assert result.graph.nodes[matmul.inputs[0]].op == "input"


def test_constant_subgraphs_are_folded():
    g = Graph()
    x = g.input("x", (3, 3))
    table = g.constant(np.arange(9, dtype=np.float32).reshape(3, 3))
    g.output("y", x + (table.exp() * 2.0 - 1.0))
    result = check_optimized(g)
    assert op_counts(result.graph)["exp"] == 0
    assert result.report.kernels_after == 1


def test_equal_subexpressions_are_computed_once():
    g = Graph()
    x = g.input("x", (4, 5))
    a = x.softmax(-1) @ x.transpose(-1, -2)
    b = x.softmax(-1) @ x.transpose(-1, -2)
    g.output("y", a + b)
    result = check_optimized(g)
    counts = op_counts(result.graph)
    assert counts["softmax"] == 1 and counts["matmul"] == 1


def test_ops_whose_attributes_cannot_be_encoded_stay_as_they_are():
    """pad with -inf (repr gives no literal) is kept outside the e-graph; around it the
    softmax is still recognized and every value is kept."""
    g = Graph()
    x = g.input("x", (3, 4))
    padded = g.apply("pad", [x * 2.0], lo=(0, 1), hi=(0, 0), value=-np.inf)
    g.output("y", softmax_decomposed(padded))
    g.output("z", -(-padded).exp())
    result = check_optimized(g)
    counts = op_counts(result.graph)
    assert counts["pad"] == 1 and counts["softmax"] == 1, counts


def test_infinities_and_divisions_by_zero_keep_their_values():
    g = Graph()
    x = g.input("x", (2, 3))
    g.output("a", (x / 0.0) * 0.0 + x / 0.0)
    g.output("b", (x + np.inf) * 2.0 - np.inf)
    g.output("c", F.maximum(x, g.constant(np.float32(-np.inf))) / (g.constant(0.0) / 0.0))
    check_optimized(g)


def test_outputs_inputs_and_parameters_keep_their_names():
    g = Graph()
    x = g.input("x", (2, 3))
    unused = g.input("unused", (7,))
    w = g.parameter("w", (3, 3), init="normal")
    g.parameter("spare", (2,))
    g.output("y", x @ w)
    g.output("x_again", x)
    result = check_optimized(g)
    new = result.graph
    assert list(new.inputs) == ["x", "unused"] and list(new.parameters) == ["w", "spare"]
    assert new.nodes[new.inputs["unused"]].type == unused.type
    assert new.outputs["x_again"] == new.inputs["x"]


# -- random graphs -----------------------------------------------------------------------------

UNARY = {
    "neg": lambda x: -x,
    "tanh": lambda x: x.tanh(),
    "sigmoid": lambda x: x.sigmoid(),
    "relu": lambda x: x.relu(),
    "exp-tanh": lambda x: x.tanh().exp(),
    "log1p-abs": lambda x: (x.abs() + 1.0).log(),
    "rsqrt": lambda x: (x * x + 1.0).rsqrt(),
    "square": lambda x: x**2.0,
    "cube": lambda x: x**3.0 * 0.1,
    "double-neg": lambda x: negate(negate(x)),
    "softmax": lambda x: softmax_decomposed(x),
    "log-softmax": lambda x: log_softmax_decomposed(x),
    "gelu-tanh": gelu_tanh_hf,
    "gelu-tanh-onnx": gelu_tanh_onnx,
    "sigmoid-decomposed": sigmoid_decomposed,
    "silu-decomposed": lambda x: x * x.sigmoid(),
    "mean-center": lambda x: x - x.mean(-1, keepdims=True),
    "max-axis0": lambda x: x - x.max(0, keepdims=True),
    "sum-scale": lambda x: x * x.sum(-1, keepdims=True).tanh(),
    "permute-back": lambda x: x.transpose(0, -1).exp().transpose(0, -1) if x.ndim > 1 else x,
    "reshape-flat": lambda x: (x.reshape(-1) * 0.5).reshape(x.shape),
    "times-one-plus-zero": lambda x: x * 1.0 + 0.0,
    "scalar-chain": lambda x: (x * 2.0) * 0.25 / 0.5,
    "broadcast-scalar": lambda x: x * x.graph.constant(np.float32(3.0)).broadcast_to(x.shape),
    "rms-norm": rms_norm_hf,
    "rms-norm-onnx": rms_norm_onnx,
    "layer-norm": layer_norm_decomposed,
    "gelu-erf": gelu_erf_torch,
    "swiglu": lambda x: (x * x.sigmoid()) * x.tanh(),
    "rotate-half": lambda x: rotate_half(x) * 0.5 + x,
}
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / (b.abs() + 1.0),
    "maximum": lambda a, b: F.maximum(a, b),
    "matmul-t": lambda a, b: (a @ b.transpose(-1, -2)) @ b * 0.1 if a.ndim >= 2 else a * b,
    "norm-matmul": lambda a, b: (
        layer_norm_decomposed(a) @ b.transpose(-1, -2) @ b * 0.1 if a.ndim >= 2 else a * b
    ),
}


@st.composite
def random_graphs(draw, gradients: bool = True):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    g = Graph()
    values = [g.input("x", shape), g.parameter("w", shape, init="normal")]
    for _ in range(draw(st.integers(2, 10))):
        if draw(st.booleans()):
            fn = UNARY[draw(st.sampled_from(sorted(UNARY)))]
            values.append(fn(values[draw(st.integers(0, len(values) - 1))]))
        else:
            fn = BINARY[draw(st.sampled_from(sorted(BINARY)))]
            a = values[draw(st.integers(0, len(values) - 1))]
            b = values[draw(st.integers(0, len(values) - 1))]
            values.append(fn(a, b))
    out = values[-1]
    g.output("out", out)
    g.output("other", values[draw(st.integers(0, len(values) - 1))])
    if not gradients:
        return g
    upstream = g.input("upstream", out.shape)
    loss = (out * upstream).sum()
    gw, gx = grad(loss, [values[1], values[0]])
    g.output("grad_w", gw)
    g.output("grad_x", gx)
    return g


@settings(max_examples=60, deadline=None)
@given(random_graphs(), st.integers(0, 2**32 - 1))
def test_random_graphs_keep_outputs_and_gradients(graph, seed):
    check_optimized(graph, seed=seed)


@settings(max_examples=60, deadline=None)
@given(random_graphs(gradients=False), st.integers(0, 2**32 - 1))
def test_random_inference_graphs_keep_outputs(graph, seed):
    """Without a backward pass, norms move into the matmuls that read them."""
    check_optimized(graph, seed=seed)


# -- sessions: training with and without the optimizer -----------------------------------------


def decomposed_block(g: Graph, x, name: str, dim: int, hidden: int):
    """A pre-norm residual block written with primitives only."""
    w1 = g.parameter(f"{name}.w1", (hidden, dim), init="normal")
    w2 = g.parameter(f"{name}.w2", (dim, hidden), init="normal")
    scale = g.parameter(f"{name}.scale", (dim,), init="ones")
    h = x - x.mean(-1, keepdims=True)
    h = h * (h * h).mean(-1, keepdims=True).__add__(1e-5).rsqrt() * scale
    u = g.apply("matmul", [h, w1], trans_b=True) * 0.2
    u = gelu_tanh_hf(u)
    scores = softmax_decomposed(u @ u.transpose(-1, -2) * (1.0 / math.sqrt(hidden)))
    u = scores @ u
    return x + g.apply("matmul", [u, w2], trans_b=True) * 0.2


def block_model(layers: int, batch: int = 2, tokens: int = 5, dim: int = 8, hidden: int = 12):
    g = Graph()
    x = g.input("x", (batch, tokens, dim))
    labels = g.input("labels", (batch, tokens), "i32")
    h = x
    for i in range(layers):
        h = decomposed_block(g, h, f"layers.{i}", dim, hidden)
    head = g.parameter("head", (7, dim), init="normal")
    logits = g.output("logits", g.apply("matmul", [h, head], trans_b=True))
    return g, F.cross_entropy(logits, labels)


def steps(session, feeds, n=3):
    losses = []
    for _ in range(n):
        session.step(feeds)
        losses.append(session.loss)
    return losses


@pytest.mark.parametrize(
    "optimizer",
    [optim.SGD(lr=0.1), optim.SGD(lr=0.05, momentum=0.9), optim.AdamW(lr=1e-2)],
    ids=["sgd", "momentum", "adamw"],
)
def test_training_with_the_optimizer_matches_training_without(optimizer):
    g, loss = block_model(layers=3)
    rng = np.random.default_rng(0)
    feeds = {
        "x": rng.standard_normal((2, 5, 8)).astype(np.float32),
        "labels": rng.integers(0, 7, (2, 5)).astype(np.int32),
    }
    plain = build(g, loss, optimizer, device="cpu", seed=3, optimize=False)
    fused = build(g, loss, optimizer, device="cpu", seed=3)
    np.testing.assert_allclose(steps(fused, feeds), steps(plain, feeds), rtol=1e-4)
    assert_same_values(plain.parameters(), fused.parameters(), rtol=1e-4, atol=1e-5)
    assert_same_values(plain.run(feeds), fused.run(feeds), rtol=1e-4, atol=1e-5)
    report = fused.optimize_report
    assert report.kernels_after < report.kernels_before
    assert report.fusions.get("softmax", 0) >= 3 and report.fusions.get("gelu_tanh", 0) >= 3


def test_mlp_session_report():
    g = Graph()
    x = g.input("x", (4, 6))
    y = g.input("y", (4,), "i32")
    logits = g.output("logits", MLP(g, "mlp", [6, 5, 3])(x))
    session = build(g, F.cross_entropy(logits, y), optim.Adam(lr=1e-3), device="cpu")
    report = session.optimize_report.as_dict()
    for key in ("optimize_seconds", "kernels_before", "kernels_after", "fusions", "enodes"):
        assert key in report
    assert report["kernels_after"] <= report["kernels_before"]
    assert set(report["seconds"]) >= {"forward.saturate", "train.saturate", "train.extract"}


def test_optimize_false_leaves_the_graph_alone():
    g = Graph()
    x = g.input("x", (3, 4))
    g.output("y", softmax_decomposed(x))
    session = build(g, device="cpu", optimize=False)
    assert session.optimize_report is None
    assert op_counts(session.graph)["softmax"] == 0


# -- horizontal fusion: one matmul for projections of one input -------------------------------


def attention_projections(g: Graph, x, dim: int, kv: int, bias: bool = False):
    from meganeura.nn import Linear

    q = Linear(g, "attn.q_proj", dim, dim, bias=bias)(x)
    k = Linear(g, "attn.k_proj", dim, kv, bias=bias)(x)
    v = Linear(g, "attn.v_proj", dim, kv, bias=bias)(x)
    scores = (q @ k.transpose(-1, -2)).softmax(-1)
    return g.output("y", (scores @ v).sum(-1, keepdims=True) * q)


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8), (1, 8)])
def test_projections_of_one_input_share_one_matmul(shape):
    g = Graph()
    x = g.input("x", shape)
    attention_projections(g, x, 8, 8)
    result = check_optimized(g)
    new = result.graph
    assert op_counts(new)["matmul"] == 3  # q/k/v in one, and the two attention products
    assert result.report.fusions["concat_matmul"] == 2
    storage = new.parameter_views["attn.q_proj.weight"].storage
    assert storage == "attn.[q_proj.weight,k_proj.weight,v_proj.weight]"
    assert new.nodes[new.parameters[storage]].type.shape == (24, 8)
    assert "attn.q_proj.weight" not in new.parameters


@pytest.mark.parametrize("spelling", ["transpose-node", "k-by-n"])
def test_projections_spelt_without_trans_b_share_one_matmul(spelling):
    g = Graph()
    x = g.input("x", (2, 5, 6))
    outs = []
    for name, n in (("gate", 7), ("up", 7), ("extra", 3)):
        if spelling == "transpose-node":
            w = g.parameter(f"mlp.{name}", (n, 6), init="normal")
            outs.append(x @ w.transpose(0, 1))
        else:
            w = g.parameter(f"mlp.{name}", (6, n), init="normal")
            outs.append(x @ w)
    g.output("y", (outs[0] * outs[0].sigmoid()) * outs[1])
    g.output("z", outs[2])
    result = check_optimized(g)
    assert op_counts(result.graph)["matmul"] == 1
    assert result.graph.parameter_views["mlp.up"].axis == (0 if spelling == "transpose-node" else 1)


def test_weights_multiplied_by_several_inputs_share_one_matmul_per_input():
    """Two computations of one model (prefill and decode) read the same projections."""
    g = Graph()
    weights = {n: g.parameter(f"p.{n}", (4, 6), init="normal") for n in ("q", "k", "v")}
    lone = g.parameter("p.lone", (4, 6), init="normal")
    for name, rows in (("a", 5), ("b", 1)):
        x = g.input(f"x.{name}", (rows, 6))
        q, k, v = (g.apply("matmul", [x, w], trans_b=True) for w in weights.values())
        g.output(f"y.{name}", (q * k).sigmoid() * v)
    g.output("lone", g.apply("matmul", [g.input("x.c", (2, 6)), lone], trans_b=True))
    result = check_optimized(g)
    assert op_counts(result.graph)["matmul"] == 3
    assert result.report.fusions["concat_matmul"] == 4
    assert sorted(result.graph.parameter_views) == ["p.k", "p.q", "p.v"]


def test_weights_multiplied_by_different_inputs_stay_apart():
    g = Graph()
    q = g.parameter("q", (4, 6), init="normal")
    k = g.parameter("k", (4, 6), init="normal")
    x, z = g.input("x", (5, 6)), g.input("z", (5, 6))
    mm = lambda a, w: g.apply("matmul", [a, w], trans_b=True)  # noqa: E731
    g.output("y", mm(x, q) + mm(x, k) + mm(z, q))
    result = check_optimized(g)
    assert not result.graph.parameter_views


def test_weights_read_elsewhere_are_not_concatenated():
    g = Graph()
    x = g.input("x", (3, 4))
    a = g.parameter("a", (5, 4), init="normal")
    b = g.parameter("b", (5, 4), init="normal")
    y = g.apply("matmul", [x, a], trans_b=True) + g.apply("matmul", [x, b], trans_b=True)
    g.output("y", y + a.sum(-1))
    result = check_optimized(g)
    assert not result.graph.parameter_views


def training_feeds(rng):
    return {
        "x": rng.standard_normal((2, 3, 8)).astype(np.float32),
        "labels": rng.integers(0, 8, (2, 3)).astype(np.int32),
    }


def projection_model():
    g = Graph()
    x = g.input("x", (2, 3, 8))
    labels = g.input("labels", (2, 3), "i32")
    y = attention_projections(g, x, 8, 8, bias=True)
    up = MLP(g, "mlp", [8, 16, 8])
    return g, F.cross_entropy(up(y), labels)


@pytest.mark.parametrize(
    "optimizer",
    [optim.SGD(lr=0.1, momentum=0.9), optim.AdamW(lr=1e-2)],
    ids=["momentum", "adamw"],
)
def test_training_concatenated_weights_by_their_names(optimizer):
    g, loss = projection_model()
    feeds = training_feeds(np.random.default_rng(1))
    plain = build(g, loss, optimizer, device="cpu", seed=5, optimize=False)
    fused = build(g, loss, optimizer, device="cpu", seed=5)
    assert fused.graph.parameter_views, "the projections should share a weight"
    assert plain.parameters().keys() == fused.parameters().keys()
    assert_same_values(plain.parameters(), fused.parameters(), rtol=0, atol=0)
    np.testing.assert_allclose(steps(fused, feeds), steps(plain, feeds), rtol=1e-5)
    assert_same_values(
        plain.parameters(include_state=True), fused.parameters(include_state=True), 1e-5, 1e-6
    )
    # Loading by name writes into the shared weight.
    new_k = np.full((8, 8), 0.25, np.float32)
    for session in (plain, fused):
        session.set_parameters({"attn.k_proj.weight": new_k})
        np.testing.assert_array_equal(session.parameters()["attn.k_proj.weight"], new_k)
    assert_same_values(plain.run(feeds), fused.run(feeds), rtol=1e-5, atol=1e-6)
    with pytest.raises(KeyError):
        fused.set_parameters({fused.graph.parameter_views["attn.k_proj.weight"].storage: new_k})


@pytest.mark.parametrize(
    "optimizer",
    [
        # q and v in one group (stored together), k in another (kept apart)
        optim.AdamW(
            lr=1e-2,
            groups=[optim.Group(["attn.q_proj", "attn.v_proj"], weight_decay=0.5, lr_mult=2.0)],
        ),
        optim.SGD(lr=0.1, groups=[optim.Group("attn.k_proj", frozen=True)]),
        optim.Adam(lr=1e-2, clip_grad_norm=0.5, accumulate=2),
    ],
    ids=["groups", "frozen", "clip-accumulate"],
)
def test_concatenated_weights_follow_optimizer_groups(optimizer, tmp_path):
    g, loss = projection_model()
    rng = np.random.default_rng(2)
    plain = build(g, loss, optimizer, device="cpu", seed=5, optimize=False)
    fused = build(g, loss, optimizer, device="cpu", seed=5)
    views = fused.graph.parameter_views
    groups = {}
    for name in ("attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight"):
        groups.setdefault(optimizer.group_of(name), []).append(name in views)
    for members in groups.values():  # stored together exactly when in one group
        assert all(members) == (len(members) > 1) and len(set(members)) == 1
    for _ in range(4):
        feeds = training_feeds(rng)
        plain.step(feeds)
        fused.step(feeds)
        np.testing.assert_allclose(fused.loss, plain.loss, rtol=1e-5)
    assert_same_values(
        plain.parameters(include_state=True), fused.parameters(include_state=True), 1e-5, 1e-6
    )
    # A checkpoint of the fused session names the weights as written, and loads into both.
    fused.save(tmp_path / "fused.safetensors")
    fresh = build(g, loss, optimizer, device="cpu", seed=9, optimize=False)
    fresh.load(tmp_path / "fused.safetensors")
    assert_same_values(fresh.parameters(include_state=True), fused.parameters(True), 0, 0)
    again = build(g, loss, optimizer, device="cpu", seed=9)
    again.load(tmp_path / "fused.safetensors")
    assert_same_values(again.parameters(include_state=True), fused.parameters(True), 0, 0)
    assert_same_values(fused.weight_norms(), plain.weight_norms(), 1e-5, 1e-6)
    feeds = training_feeds(rng)
    assert_same_values(fused.grad_norms(feeds), plain.grad_norms(feeds), 1e-4, 1e-6)


# -- repeated blocks -----------------------------------------------------------------------------


def test_repeated_blocks_are_optimized_once_and_replayed():
    g, loss = block_model(layers=6)
    result = check_optimized(g, [loss.id])
    report = result.report
    assert report.blocks and max(b["copies"] for b in report.blocks) >= 5
    assert op_counts(result.graph, [result.ids[loss.id]])["softmax"] == 6
    assert report.fusions["softmax"] == 6 and report.fusions["gelu_tanh"] == 6
    flat = optimize(g, [loss.id], blocks=False, count=True).report
    assert flat.kernels_after == report.kernels_after
    assert flat.eclasses > report.eclasses


def test_repeated_blocks_of_a_training_graph():
    g, loss = block_model(layers=5)
    params = [g.tensor(n) for n in g.parameters]
    grads = grad(loss, params)
    for name, gr in zip(g.parameters, grads, strict=True):
        g.output(f"grad:{name}", gr)
    result = check_optimized(g, [loss.id], ints={"labels": 7})
    flat = optimize(g, [loss.id], blocks=False, count=True)
    assert len(result.report.blocks) >= 2
    # A copy's outputs are decided without seeing its readers in the next copy, which can
    # cost a kernel where the cut passes; at most two here, in 250.
    assert result.report.kernels_after <= flat.report.kernels_after + 2
