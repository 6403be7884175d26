"""Kernel selection and memory planning: what gets fused, what shares memory, what is in place."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meganeura as mn
import meganeura.functional as F
from meganeura.autodiff import grad
from meganeura.lower.plan import plan, reshape_strides
from meganeura.nn import MLP
from meganeura.session import _copy_graph


def _training_graph(optimizer):
    g = mn.Graph()
    x = g.input("x", (16, 128))
    y = g.input("y", (16,), "i32")
    logits = g.output("logits", MLP(g, "", [128, 64, 64, 10])(x))
    loss = F.cross_entropy(logits, y)
    g = _copy_graph(g)
    params = {n: mn.Tensor(g, i) for n, i in g.parameters.items()}
    grads = grad(mn.Tensor(g, loss.id), list(params.values()))
    optimizer.attach(g, params, dict(zip(params, grads, strict=True)))
    return g, [*g.outputs.values(), loss.id]


@pytest.mark.parametrize(
    "optimizer", [mn.optim.SGD(0.1), mn.optim.SGD(0.1, momentum=0.9), mn.optim.AdamW(1e-3)]
)
def test_parameter_updates_are_written_in_place(optimizer):
    g, roots = _training_graph(optimizer)
    p = plan(g, roots, g.updates)
    assert p.copies == []
    for target, value in g.updates.items():
        assert p.buffer_of[value] == p.buffer_of[target]


def test_mlp_training_step_kernel_count():
    # Forward: 3 matmuls with their bias (+ relu) in the store; cross-entropy rows, its sum,
    # the label count and the mean (4). Backward: CE grad, 3 bias-grad sums, 2 matmuls with
    # the relu mask in the store, 3 weight-gradient matmuls with the SGD update in the store;
    # 3 bias updates.
    g, roots = _training_graph(mn.optim.SGD(0.1))
    kernels = plan(g, roots, g.updates).kernels
    assert len(kernels) == 19
    assert sum(k.core is not None for k in kernels) == 8


def test_elementwise_dag_is_one_kernel():
    g = mn.Graph()
    a, b = g.input("a", (7, 9)), g.input("b", (9,))
    out = ((a * b + 1.0).exp() / (a - b).abs().sqrt() + a.tanh() * 3.0).sigmoid()
    p = plan(g, [out.id], {})
    assert [k.kind for k in p.kernels] == ["pointwise"]
    assert sorted(p.kernels[0].reads) == sorted([a.id, b.id])


def test_reduction_absorbs_its_elementwise_prologue_and_views():
    g = mn.Graph()
    a = g.input("a", (5, 6, 7))
    out = (a.permute(2, 0, 1) * 2.0).exp().sum((1, 2))
    p = plan(g, [out.id], {})
    assert [k.kind for k in p.kernels] == ["reduce"]


def test_transient_buffers_are_reused():
    g = mn.Graph()
    h = g.input("x", (64, 64))
    ws = [g.parameter(f"w{i}", (64, 64)) for i in range(8)]
    for w in ws:
        h = (h @ w).relu() @ w  # matmul outputs are materialized, each read once
    p = plan(g, [h.id], {})
    transient = [b for b in p.buffers if b.kind == "transient"]
    assert len(transient) <= 2
    assert p.transient_bytes <= 2 * 64 * 64 * 4


def test_planned_programs_match_the_numpy_executor_on_lavapipe():
    pytest.importorskip("wgpudawn")
    from meganeura.backends.webgpu.device import list_adapters

    if not any(a.adapter_type == "CPU" and a.backend == "Vulkan" for a in list_adapters()):
        pytest.skip("no CPU Vulkan adapter (lavapipe)")
    g = mn.Graph()
    h = g.input("x", (33, 20))
    ws = [g.parameter(f"w{i}", (20, 20), init="normal") for i in range(4)]
    for w in ws:
        h = (h @ w).tanh() @ w * 0.1
    g.output("h", h)
    x = np.random.default_rng(0).standard_normal((33, 20)).astype(np.float32)
    want = mn.build(g, device="cpu", seed=1).run({"x": x})["h"]
    got = mn.build(g, device="vulkan-cpu", seed=1).run({"x": x})["h"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_reshape_of_a_strided_view_reads_the_right_elements(data):
    """reshape_strides, where it finds strides, addresses exactly NumPy's reshape."""
    shape = tuple(data.draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    base = np.arange(int(np.prod([2 * d for d in shape])) * 2).reshape((*[2 * d for d in shape], 2))
    starts = [data.draw(st.integers(0, d)) for d in shape]
    view = base[(*(slice(a, a + d) for a, d in zip(starts, shape, strict=True)), 1)]
    view = view.transpose(data.draw(st.permutations(range(len(shape)))))
    sizes = [d for d in view.shape]
    split = data.draw(st.sampled_from(["flat", "merge", "unsqueeze", "same"]))
    new_shape = {
        "flat": (view.size,),
        "merge": (sizes[0] * sizes[1], *sizes[2:]) if len(sizes) > 1 else (view.size,),
        "unsqueeze": (*sizes[:-1], 1, sizes[-1]),
        "same": tuple(sizes),
    }[split]
    strides = tuple(s // base.itemsize for s in view.strides)
    got = reshape_strides(view.shape, strides, new_shape)
    if got is None:
        return
    offset = (
        view.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    ) // base.itemsize
    index = np.full(new_shape, offset)
    for d, stride in enumerate(got):
        index = (
            index
            + np.arange(new_shape[d]).reshape([-1 if e == d else 1 for e in range(len(new_shape))])
            * stride
        )
    np.testing.assert_array_equal(base.reshape(-1)[index], view.reshape(new_shape))


def test_session_reports_the_kernels_of_its_last_program():
    pytest.importorskip("wgpudawn")
    from meganeura.backends.webgpu.device import list_adapters

    if not any(a.adapter_type == "CPU" and a.backend == "Vulkan" for a in list_adapters()):
        pytest.skip("no CPU Vulkan adapter (lavapipe)")
    g = mn.Graph()
    x = g.input("x", (4, 3))
    g.output("y", (x @ g.parameter("w", (3, 5))).relu().sum())
    assert mn.build(g, device="cpu").kernel_count is None
    session = mn.build(g, device="vulkan-cpu")
    session.run({"x": np.ones((4, 3), np.float32)})
    assert session.kernel_count == len(session._last.plan.kernels) >= 1


def test_adamw_moments_are_side_outputs_of_the_parameter_update():
    # Per parameter, AdamW's first and second moments and the new parameter are one kernel
    # (the moments stored as side outputs), every update in place, when the device binds
    # enough buffers per kernel (a GPU's 16 or more; WebGPU's default of 8 leaves 7 reads).
    g, roots = _training_graph(mn.optim.AdamW(1e-3))
    assert all(k.also == [] for k in plan(g, roots, g.updates, max_reads=7).kernels)
    p = plan(g, roots, g.updates, max_reads=15)
    assert p.copies == []
    params = [i for i in g.parameters.values() if not g.parameter_specs[g.nodes[i].name].state]
    for pid in params:
        (kernel,) = [k for k in p.kernels if k.node == g.updates[pid]]
        assert len(kernel.also) == 2
        for side in kernel.also:
            target = next(t for t, v in g.updates.items() if v == side)
            assert p.buffer_of[side] == p.buffer_of[target]


def test_a_value_read_before_the_kernel_that_needs_it_is_not_a_side_output():
    g = mn.Graph()
    x = g.input("x", (5, 6))
    a = (x * 2.0).exp()  # read by the reduction first, then by the last pointwise kernel
    s = g.output("s", a.sum(axis=1, keepdims=True))
    out = g.output("out", a * x + s)
    p = plan(g, [s.id, out.id], {})
    assert all(k.also == [] for k in p.kernels)
    # ...but when only later pointwise kernels read it, the first of them stores it.
    g = mn.Graph()
    x = g.input("x", (5, 6))
    a = (x * 2.0).exp()
    b = g.output("b", a + 1.0)
    c = g.output("c", a * b)
    p = plan(g, [b.id, c.id], {})
    assert len(p.kernels) == 1 and sorted(p.kernels[0].also) == sorted([a.id, b.id])


@pytest.mark.lavapipe
@settings(max_examples=25, deadline=None)
@given(st.data())
def test_side_outputs_match_the_numpy_executor(data):
    # Chains of same-shape pointwise values, each stored (a root or read by several kernels),
    # optionally broadcast against a row vector, and a training step with AdamW.
    rows, cols = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 40))
    g = mn.Graph()
    x = g.input("x", (rows, cols))
    r = g.input("r", (1, cols))
    values = [x]
    for n in range(data.draw(st.integers(2, 5))):
        left = values[data.draw(st.integers(0, len(values) - 1))]
        right = values[data.draw(st.integers(0, len(values) - 1))]
        v = (left * 0.5 + right.tanh()) if data.draw(st.booleans()) else (left - r).sigmoid()
        values.append(g.output(f"v{n}", v))
    feeds = {
        "x": np.random.default_rng(0).normal(size=(rows, cols)).astype(np.float32),
        "r": np.random.default_rng(1).normal(size=(1, cols)).astype(np.float32),
    }
    want = mn.build(g, device="cpu", optimize=False).run(feeds)
    got = mn.build(g, device="vulkan-cpu", optimize=False).run(feeds)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.lavapipe
@pytest.mark.parametrize("size", [1, 7, 1029, 4 * 256 + 3])
def test_pointwise_kernels_of_several_elements_per_invocation(monkeypatch, size):
    # Large pointwise kernels give each invocation four elements (here forced on small ones):
    # values loaded before any store, the last round clamped and guarded, side outputs and
    # AdamW's in-place updates included.
    from meganeura.backends.wgsl import kernels

    monkeypatch.setattr(kernels, "POINTWISE_MANY", 1)
    g = mn.Graph()
    x = g.input("x", (size,))
    y = g.input("y", (size,))
    w = g.parameter("w", (size,), init="normal")
    a = g.output("a", (x * 0.5 + y.tanh()).exp())
    g.output("b", (a * y - w).sigmoid())
    loss = ((x * w - y) ** 2).sum()
    rng = np.random.default_rng(size)
    feeds = {n: rng.normal(size=(size,)).astype(np.float32) for n in ("x", "y")}
    sessions = [
        mn.build(g, loss, mn.optim.AdamW(1e-2), device=d, seed=3, optimize=False)
        for d in ("cpu", "vulkan-cpu")
    ]
    for session in sessions:
        session.step(feeds)
        session.step(feeds)
    want, got = (s.run(feeds, outputs=["a", "b"]) for s in sessions)
    for name in ("a", "b"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        sessions[1].parameters()["w"], sessions[0].parameters()["w"], rtol=1e-5, atol=1e-6
    )
