"""Inspection: per-parameter norms on the device, and the debug mode that names the first
kernel producing an inf or NaN."""

import numpy as np
import pytest
import torch

from meganeura import Graph, build, optim
from meganeura.debug import NonFiniteError
from tests.test_optim import DEVICES, batches, mlp_loss, mlp_session, torch_mlp


@pytest.mark.parametrize("device", DEVICES)
def test_grad_and_weight_norms_match_torch(device):
    session = mlp_session(optim.SGD(lr=0.1, groups=[optim.Group("0.bias", frozen=True)]), device)
    params = session.parameters()
    data = batches(1)[0]
    model = torch_mlp()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
    mlp_loss(model, {k: torch.from_numpy(v) for k, v in data.items()}).backward()
    grads = session.grad_norms(data)
    assert sorted(grads) == ["0.weight", "2.bias", "2.weight"]  # the frozen one has none
    for name, value in model.named_parameters():
        if name in grads:
            assert grads[name] == pytest.approx(value.grad.norm().item(), rel=1e-5)
    weights = session.weight_norms()
    assert sorted(weights) == sorted(params)
    for name, value in params.items():
        assert weights[name] == pytest.approx(np.linalg.norm(value), rel=1e-5)
    # nothing was updated
    assert all(np.array_equal(session.parameters()[k], v) for k, v in params.items())


def log_graph():
    """y = log(x @ w - 3): NaN where x @ w < 3."""
    graph = Graph()
    x = graph.input("x", (4, 3))
    w = graph.parameter("w", (3, 5), init="ones")
    h = x @ w
    z = (h - 3.0).log()
    graph.output("y", z * 2.0)
    return graph, z


@pytest.mark.parametrize("device", DEVICES)
def test_check_finite_names_the_first_kernel_with_nan(device):
    graph, z = log_graph()
    session = build(graph, device=device, check_finite=True)
    good = np.full((4, 3), 2.0, np.float32)
    session.run({"x": good})  # finite: runs as usual
    bad = good.copy()
    bad[2] = 0.5
    with pytest.raises(NonFiniteError) as caught:
        session.run({"x": bad})
    message = str(caught.value)
    assert "nan at index [2, 0] (5 of 20 values are inf or nan)" in message
    if device == "cpu":
        assert caught.value.node == z.id and f"%{z.id} = log" in message
    else:
        # the matmul (its epilogue), the subtraction and the log all run in the kernel that
        # writes the output
        assert caught.value.kernel == f"mul%{graph.outputs['y']}"
        fused = f"%2 = matmul f32[4, 5]; %{z.id - 1} = sub f32[4, 5]; %{z.id} = log f32[4, 5]"
        assert f"fused: {fused}" in message
        assert "read (all finite): %0 = input 'x' f32[4, 3]; %1 = parameter 'w'" in message


@pytest.mark.parametrize("device", DEVICES)
def test_check_finite_finds_a_nan_born_in_the_backward_pass(device):
    graph = Graph()
    w = graph.parameter("w", (3,), init="ones")
    x = graph.input("x", (3,))
    loss = ((w - x) * (w - x)).sqrt().sum()  # sqrt'(0) = inf where w == x
    session = build(graph, loss, optim.SGD(lr=0.1), device=device, check_finite=True)
    session.step({"x": np.array([0.0, 2.0, 3.0], np.float32)})
    with pytest.raises(NonFiniteError, match="inf or nan") as caught:
        session.step({"x": np.array([0.9, 0.9, 0.9], np.float32)})  # w became 0.9 at [0]
    failing = session.graph.nodes[caught.value.node]
    assert caught.value.node > loss.id  # born after the loss: in the backward pass or update
    # The kernel is the gradient's, or the update's with the gradient (sqrt's VJP divides by
    # sqrt(0)) computed inside it.
    assert failing.op in ("div", "mul") or " = div " in str(caught.value)


def test_check_finite_names_a_bad_input():
    graph, _ = log_graph()
    session = build(graph, device="cpu", check_finite=True)
    bad = np.full((4, 3), 5.0, np.float32)
    bad[1, 2] = np.inf
    with pytest.raises(
        NonFiniteError, match=r"input 'x' \(f32\[4, 3\]\) holds inf at index \[1, 2\]"
    ):
        session.run({"x": bad})


def test_debug_nan_environment_variable(monkeypatch):
    graph, _ = log_graph()
    monkeypatch.setenv("MEGANEURA_DEBUG_NAN", "1")
    assert build(graph, device="cpu").check_finite
    monkeypatch.setenv("MEGANEURA_DEBUG_NAN", "0")
    session = build(graph, device="cpu")
    assert not session.check_finite
    y = session.run({"x": np.zeros((4, 3), np.float32)})["y"]  # no check: NaN comes out
    assert np.isnan(y).all()


@pytest.mark.lavapipe
def test_profile_times_every_kernel_of_the_forward_program():
    session = build(log_graph()[0], device="vulkan-cpu")
    data = {"x": np.full((4, 3), 2.0, np.float32)}
    before = session.parameters()
    kernels = session.profile(data, ["y"])
    session.run(data)
    assert len(kernels) == session.kernel_count
    for label, grid, micros in kernels:
        assert "matmul" in label or "log" in label
        assert len(grid) == 3 and all(g >= 1 for g in grid)
        assert micros >= 0.0
    assert all(np.array_equal(session.parameters()[k], v) for k, v in before.items())
    with pytest.raises(KeyError, match="no output named 'z'"):
        session.profile(data, ["z"])


@pytest.mark.lavapipe
def test_device_time_runs_the_forward_program_several_times_in_one_pass():
    session = build(log_graph()[0], device="vulkan-cpu")
    data = {"x": np.full((4, 3), 2.0, np.float32)}
    before = session.parameters()
    micros = session.device_time(data, ["y"], repeats=3)
    assert micros > 0.0
    assert all(np.array_equal(session.parameters()[k], v) for k, v in before.items())
    want = session.run(data)["y"]  # the program still computes the same values
    assert np.array_equal(session.run(data)["y"], want)
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        session.device_time(data, ["y"], repeats=0)
    with pytest.raises(RuntimeError, match="NumPy executor has no kernels"):
        build(log_graph()[0], device="cpu").device_time(data)


def test_profile_needs_a_webgpu_device():
    with pytest.raises(RuntimeError, match="NumPy executor has no kernels"):
        build(log_graph()[0], device="cpu").profile({"x": np.ones((4, 3), np.float32)})
