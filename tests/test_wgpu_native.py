"""A smaller set of checks through wgpu-native (the suite's kernels otherwise run on Dawn)."""

import numpy as np
import pytest

import meganeura as mn
import meganeura.functional as F
from meganeura.backends.webgpu.device import list_adapters
from meganeura.nn import MLP

pytestmark = pytest.mark.lavapipe


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setenv("MEGANEURA_WEBGPU", "wgpu-native")
    adapters = list_adapters("wgpu-native")
    if not any(a.adapter_type == "CPU" and a.backend == "Vulkan" for a in adapters):
        pytest.skip("wgpu-native sees no CPU Vulkan adapter (lavapipe)")


def _mlp_graph(batch=8):
    g = mn.Graph()
    x = g.input("x", (batch, 20))
    y = g.input("y", (batch,), "i32")
    logits = g.output("logits", MLP(g, "", [20, 33, 7])(x))
    return g, F.cross_entropy(logits, y)


def test_adapter_is_vulkan_not_opengl(native):
    session = mn.build(mn.Graph(), device="vulkan-cpu")
    assert "Vulkan" in session.device and "wgpu-native" in session.device


@pytest.mark.parametrize(
    "optimizer", [lambda: mn.optim.SGD(0.1, momentum=0.9), lambda: mn.optim.AdamW(0.01)]
)
def test_training_matches_numpy_executor(native, optimizer):
    rng = np.random.default_rng(1)
    batches = [
        {
            "x": rng.standard_normal((8, 20), dtype=np.float32),
            "y": rng.integers(0, 7, 8, dtype=np.int32),
        }
        for _ in range(5)
    ]
    results = []
    for device in ("cpu", "vulkan-cpu"):
        g, loss = _mlp_graph()
        session = mn.build(g, loss=loss, optimizer=optimizer(), device=device, seed=3)
        losses = []
        for batch in batches:
            session.step(batch)
            losses.append(session.loss)
        results.append((losses, session.parameters()))
    (cpu_losses, cpu_params), (gpu_losses, gpu_params) = results
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-5, atol=1e-6)
    for name, value in cpu_params.items():
        np.testing.assert_allclose(gpu_params[name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_forward_ops_match_numpy_executor(native):
    rng = np.random.default_rng(2)
    g = mn.Graph()
    a = g.input("a", (3, 5, 7))
    b = g.input("b", (5, 1))
    h = (a * b).gelu() - a.exp().sum(-1, keepdims=True).log()
    g.output("softmax", h.softmax(1))
    g.output("max", h.max((0, 2)))
    g.output("mm", h @ a.transpose())
    feeds = {
        "a": rng.standard_normal((3, 5, 7), dtype=np.float32),
        "b": rng.standard_normal((5, 1), dtype=np.float32),
    }
    want = mn.build(g, device="cpu").run(feeds)
    got = mn.build(g, device="vulkan-cpu").run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
