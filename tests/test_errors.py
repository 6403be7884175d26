"""Errors speak to the user: the op, the tensors and the shapes at graph-build time; the input's
name and what was expected when a session is fed; the valid choices for a bad device name."""

from __future__ import annotations

import re

import numpy as np
import pytest

import meganeura as mn
from meganeura import functional as mf
from tests.harness import DEVICES


def raises(error, *fragments):
    """pytest.raises for an error whose message holds every fragment, in order."""
    return pytest.raises(error, match=".*".join(re.escape(f) for f in fragments))


# -- graph building ---------------------------------------------------------------------------


def test_matmul_inner_dims_mismatch_names_both_tensors():
    graph = mn.Graph()
    x = graph.input("x", (32, 784))
    w1 = graph.parameter("w1", (128, 10))
    with raises(ValueError, "matmul", "inner dims", "[32, 784]", "[128, 10]", "'x'", "'w1'"):
        x @ w1


def test_matmul_transposed_operands_mismatch():
    graph = mn.Graph()
    a, b = graph.input("a", (2, 5, 7)), graph.input("b", (7, 3))
    with raises(ValueError, "matmul", "inner dims", "(7 != 3)", "'a' f32[2, 5, 7]", "'b'"):
        graph.apply("matmul", [a, b], trans_b=True)


def test_matmul_batch_dims_mismatch():
    graph = mn.Graph()
    a, b = graph.input("a", (2, 5, 7)), graph.input("b", (3, 7, 4))
    with raises(ValueError, "matmul", "batch dims", "[2]", "[3]", "'a'", "'b'"):
        a @ b


def test_matmul_rejects_integer_operands():
    graph = mn.Graph()
    a, b = graph.input("a", (2, 3), "i32"), graph.input("b", (3, 4), "i32")
    with raises(TypeError, "matmul", "f32", "i32[2, 3]"):
        a @ b


def test_broadcast_mismatch_names_the_op_and_shapes():
    graph = mn.Graph()
    a, b = graph.input("a", (2, 3)), graph.input("b", (4,))
    with raises(ValueError, "mul", "[2, 3]", "[4]", "cannot be broadcast", "'a'", "'b'"):
        a * b


def test_broadcast_mismatch_of_an_intermediate_tensor_names_its_op():
    graph = mn.Graph()
    a, b = graph.input("a", (2, 3)), graph.input("b", (5,))
    with raises(ValueError, "add", "cannot be broadcast", "(exp) f32[2, 3]", "'b' f32[5]"):
        a.exp() + b


def test_where_broadcast_mismatch():
    graph = mn.Graph()
    cond, a = graph.input("cond", (3,), "bool"), graph.input("a", (4,))
    with raises(ValueError, "where", "[3]", "[4]", "'cond'", "'a'"):
        mf.where(cond, a, 0.0)


def test_broadcast_to_incompatible_shape():
    graph = mn.Graph()
    x = graph.input("x", (3, 2))
    with raises(ValueError, "broadcast_to", "f32[3, 2]", "[3, 4]", "'x'"):
        x.broadcast_to((3, 4))


def test_bad_reshape_names_the_element_counts():
    graph = mn.Graph()
    x = graph.input("x", (2, 3))
    with raises(ValueError, "reshape", "f32[2, 3]", "6 elements", "[4, 2]", "8 elements", "'x'"):
        x.reshape(4, 2)


@pytest.mark.parametrize("shape", [(-1, -1), (4, -1)], ids=["two -1", "-1 does not divide"])
def test_bad_reshape_with_minus_one(shape):
    graph = mn.Graph()
    x = graph.input("x", (2, 3))
    with raises(ValueError, "reshape", str(list(shape)), "'x'"):
        x.reshape(shape)


@pytest.mark.parametrize(
    "op,call",
    [
        ("sum", lambda x: x.sum(axis=2)),
        ("mean", lambda x: x.mean(axis=(0, -3))),
        ("max", lambda x: x.max(axis=5, keepdims=True)),
        ("softmax", lambda x: x.softmax(2)),
        ("log_softmax", lambda x: x.log_softmax(-3)),
        ("transpose", lambda x: x.transpose(0, 2)),
    ],
)
def test_bad_axis_names_the_op_and_the_valid_range(op, call):
    graph = mn.Graph()
    x = graph.input("x", (4, 5))
    with raises(ValueError, f"{op}: axis", "out of range for 2 dims", "-2..1"):
        call(x)


def test_bad_permutation():
    graph = mn.Graph()
    x = graph.input("x", (2, 3, 4))
    with raises(ValueError, "permute", "[0, 0, 1]", "not a permutation", "'x' f32[2, 3, 4]"):
        x.permute(0, 0, 1)


def test_dtype_mismatch_suggests_astype():
    graph = mn.Graph()
    x, i = graph.input("x", (3,)), graph.input("i", (3,), "i32")
    with raises(TypeError, "add", "f32[3]", "i32[3]", ".astype()", "'x'", "'i'"):
        x + i


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda x: x.astype("f64"), ("cast", "'f64'", "f32, f16, i32, u32, bool")),
        (lambda x: x.exp(), ("exp", "dtype i32", "f32, f16")),
        (lambda x: mf.where(x, x, x), ("where", "condition must be bool", "i32[3]")),
        (lambda x: x.sum().astype("bool").sum(), ("sum", "bool", ".astype('f32')")),
    ],
    ids=["cast", "exp", "where", "sum"],
)
def test_dtype_errors_name_the_op(call, message):
    graph = mn.Graph()
    with raises((TypeError, ValueError), *message):
        call(graph.input("i", (3,), "i32"))


def test_cross_entropy_labels_must_match_the_logits_rows():
    graph = mn.Graph()
    logits, labels = graph.input("logits", (4, 5)), graph.input("labels", (5,), "i32")
    with raises(ValueError, "cross_entropy", "[4, 5]", "[4]", "got [5]", "'labels' i32[5]"):
        mf.cross_entropy(logits, labels)


def test_cross_entropy_labels_must_be_integers():
    graph = mn.Graph()
    logits, labels = graph.input("logits", (4, 5)), graph.input("labels", (4,))
    with raises(TypeError, "cross_entropy", "labels", "i32", "f32[4]"):
        mf.cross_entropy(logits, labels)


def test_cross_entropy_rejects_an_unknown_reduction():
    graph = mn.Graph()
    logits, labels = graph.input("logits", (4, 5)), graph.input("labels", (4,), "i32")
    with raises(ValueError, "cross_entropy", "'mean', 'sum', 'none'", "'avg'"):
        mf.cross_entropy(logits, labels, reduction="avg")


def test_mse_loss_shape_mismatch():
    graph = mn.Graph()
    a, b = graph.input("a", (3, 4)), graph.input("b", (4,))
    with raises(ValueError, "mse_loss", "[3, 4]", "[4]"):
        mf.mse_loss(a, b)


def test_gelu_rejects_an_unknown_approximation():
    graph = mn.Graph()
    with raises(ValueError, "gelu", "'none'", "'tanh'", "'erf'"):
        mf.gelu(graph.input("x", (3,)), "erf")


def test_tensors_of_two_graphs_do_not_mix():
    a = mn.Graph().input("a", (3,))
    b = mn.Graph().input("b", (3,))
    with raises(ValueError, "add", "another graph"):
        a + b


def test_input_names_and_shapes_are_checked():
    graph = mn.Graph()
    graph.input("x", (3,))
    with raises(ValueError, "'x'", "already used"):
        graph.parameter("x", (3,))
    with raises(ValueError, "'y'", "[3, 0]", "positive"):
        graph.input("y", (3, 0))
    with raises(ValueError, "z: unknown dtype 'f64'", "f32, f16, i32, u32, bool"):
        graph.input("z", (3,), "f64")


# -- feeding a session ------------------------------------------------------------------------


@pytest.fixture(params=DEVICES)
def session(request):
    graph = mn.Graph()
    x = graph.input("x", (2, 3))
    labels = graph.input("labels", (2,), "i32")
    graph.input("unused", (4,))
    graph.output("loss", mf.cross_entropy(x, labels))
    graph.output("y", x.exp())
    return mn.build(graph, device=request.param)


def good_feeds():
    return {"x": np.zeros((2, 3), np.float32), "labels": np.array([0, 2], np.int32)}


def test_feeding_the_wrong_shape_names_the_input(session):
    with raises(ValueError, "input 'x'", "expected shape [2, 3]", "got [3, 2]"):
        session.run({**good_feeds(), "x": np.zeros((3, 2), np.float32)})


@pytest.mark.parametrize(
    "value",
    [np.array([0.5, 1.0]), np.array([True, False]), np.array([0, 2**40])],
    ids=["floats", "bools", "out of range"],
)
def test_feeding_the_wrong_dtype_names_the_input(session, value):
    with raises(TypeError, "input 'labels'", "expected dtype i32", f"got {value.dtype}"):
        session.run({**good_feeds(), "labels": value})


def test_feeding_convertible_values_works(session):
    values = session.run({"x": [[0.0, 1.0, 2.0], [3, 4, 5]], "labels": np.array([1, 0])})
    assert values["y"].dtype == np.float32 and values["y"].shape == (2, 3)


def test_feeding_an_unknown_input_lists_the_inputs(session):
    with raises(KeyError, "unknown input 'z'", "'labels'", "'unused'", "'x'"):
        session.run({**good_feeds(), "z": np.zeros(3)})


def test_missing_input_names_it(session):
    with raises(KeyError, "missing input 'labels'", "'x'"):
        session.run({"x": np.zeros((2, 3), np.float32)})


def test_inputs_that_no_requested_output_needs_may_be_left_out(session):
    values = session.run({"x": np.ones((2, 3), np.float32)}, outputs=["y"])
    np.testing.assert_allclose(values["y"], np.e, rtol=1e-6)


def test_a_runner_checks_and_converts_inputs_as_run_does(session):
    run = session.runner(["loss", "y"])
    np.testing.assert_allclose(run(good_feeds())["y"], session.run(good_feeds())["y"])
    converted = run({"x": [[0.0, 1.0, 2.0], [3, 4, 5]], "labels": np.array([1, 0])})
    assert converted["y"].dtype == np.float32
    np.testing.assert_allclose(converted["y"], np.exp(np.arange(6.0).reshape(2, 3)), rtol=1e-6)
    with raises(ValueError, "input 'x'", "expected shape [2, 3]", "got [3, 2]"):
        run({**good_feeds(), "x": np.zeros((3, 2), np.float32)})
    with raises(TypeError, "input 'labels'", "expected dtype i32", "got float64"):
        run({**good_feeds(), "labels": np.array([0.5, 1.0])})
    with raises(KeyError, "unknown input 'z'", "'labels'", "'unused'", "'x'"):
        run({**good_feeds(), "z": np.zeros(3)})
    with raises(KeyError, "missing input 'labels'", "'x'"):
        run({"x": np.zeros((2, 3), np.float32), "unused": np.zeros(4, np.float32)})
    with pytest.raises(IndexError, match=r"input 'labels': value 3 at \[1\]"):
        run({**good_feeds(), "labels": np.array([0, 3], np.int32)})
    with raises(KeyError, "'z'", "'loss'", "'y'"):
        session.runner(["z"])


def test_asking_for_an_unknown_output_lists_the_outputs(session):
    with raises(KeyError, "'z'", "'loss'", "'y'"):
        session.run(good_feeds(), outputs=["z"])


def test_unknown_device_lists_the_valid_devices():
    graph = mn.Graph()
    graph.output("y", graph.input("x", (3,)).exp())
    with raises(Exception, "unknown device 'cuda'", "auto, gpu, vulkan-cpu, cpu"):
        mn.build(graph, device="cuda")


def test_float_scalar_with_int_tensor_is_an_error_not_a_truncation():
    g = mn.Graph()
    x = g.input("x", (3,), "i32")
    with pytest.raises(TypeError, match=r"i32 tensor .* float value 1\.5.*astype"):
        x * 1.5
    assert (x * 2.0).dtype == "i32"  # a whole number is exact in i32


@pytest.mark.parametrize("device", DEVICES)
def test_fed_indices_out_of_range_are_named_before_anything_runs(device):
    # GPU kernels do not raise, so the session checks indices on the host: token ids read by
    # an embedding (here through a reshape), labels read by cross-entropy (ignore_index is
    # allowed), before the step runs and changes anything.
    g = mn.Graph()
    ids = g.input("ids", (2, 3), "i32")
    labels = g.input("labels", (2, 3), "i32")
    table = g.parameter("table", (10, 4), init="normal")
    h = mf.embedding(table, ids.reshape(3, 2)).reshape(2, 3, 4)
    logits = h @ g.parameter("w", (4, 5), init="normal")
    loss = mf.cross_entropy(logits, labels, ignore_index=-100)
    session = mn.build(g, loss, mn.optim.SGD(0.1), device=device)
    good = {"ids": np.array([[1, 2, 3], [4, 5, 9]], np.int32), "labels": np.full((2, 3), -100)}
    good["labels"][0, 0] = 4
    session.step(good)
    before = session.parameters()
    bad_ids = dict(good, ids=np.array([[1, 2, 3], [4, 10, 9]], np.int32))
    with pytest.raises(IndexError, match=r"input 'ids': value 10 at \[1, 1\].*valid: 0\.\.9\)"):
        session.step(bad_ids)
    bad_labels = dict(good, labels=np.array([[0, -1, 1], [1, 2, 3]], np.int32))
    with pytest.raises(IndexError, match=r"input 'labels': value -1 .*valid: 0\.\.4 or -100\)"):
        session.step(bad_labels)
    assert session.step_count == 1
    assert all(np.array_equal(session.parameters()[k], v) for k, v in before.items())
