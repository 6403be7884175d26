"""Mixed precision: the f16 rewrite, dynamic loss scaling and its skipped steps."""

import numpy as np
import pytest

from meganeura import Graph, build, optim
from meganeura import functional as F
from meganeura.amp import LossScaler, MixedPrecisionError, to_mixed_precision
from meganeura.backends.webgpu.device import GPUDevice
from meganeura.data import DataLoader, load_digits
from meganeura.nn import MLP
from meganeura.train import NonFiniteLoss, Trainer
from tests.test_optim import DEVICES, batches, mlp_session


def mlp_graph(batch=6, sizes=(8, 16, 4)):
    graph = Graph()
    x = graph.input("x", (batch, sizes[0]))
    y = graph.input("y", (batch,), "i32")
    logits = graph.output("logits", MLP(graph, "", list(sizes))(x))
    return graph, F.cross_entropy(logits, y)


def test_rewrite_runs_products_and_activations_in_f16_and_keeps_f32_masters():
    graph, loss = mlp_graph()
    mixed, ids = to_mixed_precision(graph)
    ops = {(n.op, n.type.dtype) for n in mixed.nodes}
    assert ("matmul", "f16") in ops and ("matmul", "f32") not in ops
    assert ("relu", "f16") in ops and ("add", "f16") in ops
    assert {mixed.nodes[nid].type.dtype for nid in mixed.parameters.values()} == {"f32"}
    assert mixed.nodes[ids[loss.id]].type.dtype == "f32"
    assert mixed.nodes[mixed.outputs["logits"]].type.dtype == "f32"
    # cross-entropy reads its logits in f32
    ce = next(n for n in mixed.nodes if n.op == "cross_entropy_rows")
    assert mixed.nodes[ce.inputs[0]].type.dtype == "f32"


@pytest.mark.parametrize("device", DEVICES)
def test_forward_is_close_to_f32(device):
    graph, loss = mlp_graph()
    full = build(graph, loss, device=device, seed=3)
    half = build(graph, loss, device=device, seed=3, amp=True)
    for name, value in full.parameters().items():
        np.testing.assert_array_equal(half.parameters()[name], value)
    data = batches(1)[0]
    want = full.run(data)["logits"]
    got = half.run(data)["logits"]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)
    assert half.loss == pytest.approx(full.loss, rel=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_training_learns_digits(device):
    train, test = load_digits()
    graph, loss = mlp_graph(32, (64, 64, 10))
    session = build(graph, loss, optim.Adam(lr=3e-3), device=device, amp=True)
    history = Trainer(session, progress=False).fit(
        DataLoader(train, 32), 3, DataLoader(test, 32, shuffle=False)
    )
    assert history.loss[2] < history.loss[0] and history.accuracy[-1] > 0.88
    assert session.loss_scale == 2.0**16  # no overflow: the scale stayed


OPTIMIZERS = {
    "sgd_momentum": lambda: optim.SGD(lr=0.05, momentum=0.9),
    "adam_clip": lambda: optim.Adam(lr=1e-2, clip_grad_norm=1.0),
    "adamw_accumulate": lambda: optim.AdamW(lr=1e-2, accumulate=2),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_overflowing_steps_are_skipped_like_grad_scaler(device, kind):
    every = OPTIMIZERS[kind]().accumulate
    data = batches(16 * every)
    # 2**24 makes f16 gradients overflow: those steps must change nothing but the scale.
    skipping = mlp_session(OPTIMIZERS[kind](), device, amp=LossScaler(init_scale=2.0**24))
    before = skipping.parameters(include_state=True)
    scales, skipped = [], 0
    for index, batch in enumerate(data):
        skipping.step(batch)
        if (index + 1) % every:
            continue
        scales.append(skipping.loss_scale)
        after = skipping.parameters(include_state=True)
        unchanged = all(
            np.array_equal(after[k], before[k])
            for k in after
            if not k.startswith(("amp.", "optim.grad_sum."))
        )
        if unchanged:
            assert skipped == len(scales) - 1, "skips come first, while the scale is too high"
            skipped += 1
        before = after
    assert 0 < skipped < 12, skipped
    assert scales[:skipped] == [2.0 ** (24 - n) for n in range(1, skipped + 1)]

    # A run that starts at the scale the skips ended at, on the batches after them, is the
    # same run: the skipped steps left no trace (Adam's bias correction and SGD's first
    # momentum step count only applied steps).
    fresh = mlp_session(OPTIMIZERS[kind](), device, amp=LossScaler(init_scale=scales[skipped - 1]))
    for batch in data[skipped * every :]:
        fresh.step(batch)
    want, got = skipping.parameters(include_state=True), fresh.parameters(include_state=True)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert got["optim.applied_steps"] == 16 - skipped


def test_scale_grows_after_growth_interval_good_steps():
    scaler = LossScaler(init_scale=4.0, growth_factor=3.0, growth_interval=3)
    session = mlp_session(optim.SGD(lr=0.01), "cpu", amp=scaler)
    scales = []
    for batch in batches(7):
        session.step(batch)
        scales.append(session.loss_scale)
    assert scales == [4.0, 4.0, 12.0, 12.0, 12.0, 36.0, 36.0]


@pytest.mark.parametrize(
    "options",
    [
        {"init_scale": 0.0},
        {"growth_factor": 1.0},
        {"backoff_factor": 1.0},
        {"growth_interval": 0},
        {"init_scale": float("inf")},
    ],
)
def test_loss_scaler_rejects_bad_settings(options):
    with pytest.raises(ValueError, match="LossScaler"):
        LossScaler(**options)


@pytest.mark.lavapipe
def test_adapter_without_shader_f16_is_refused(monkeypatch):
    monkeypatch.setattr(GPUDevice, "has_f16", property(lambda self: False))
    graph, loss = mlp_graph()
    with pytest.raises(MixedPrecisionError, match="does not offer the WebGPU feature 'shader-f16'"):
        build(graph, loss, optim.SGD(lr=0.1), device="vulkan-cpu", amp=True)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_transformer_follows_f32(device):
    from tests.models import GPTConfig, gpt_batches, gpt_training_graph

    config = GPTConfig()
    graph, loss = gpt_training_graph(config, 3)
    mixed, _ = to_mixed_precision(graph)
    mask_add = next(
        n
        for n in mixed.nodes
        if n.op == "add" and mixed.nodes[n.inputs[1]].type.shape == (config.context,) * 2
    )
    assert mask_add.type.dtype == "f32"  # the -1e9 mask would be -inf in f16
    data = gpt_batches(config, 3, 1) * 15
    losses = {}
    for amp in (False, True):
        session = build(
            graph, loss, optim.AdamW(lr=1e-2, clip_grad_norm=1.0), device=device, amp=amp
        )
        first = None
        for batch in data:
            session.step(batch)
            first = session.loss if first is None else first
        losses[amp] = (first, session.loss)
    assert losses[True][1] < 0.5 * losses[True][0]
    assert losses[True][0] == pytest.approx(losses[False][0], rel=1e-2)
    assert losses[True][1] == pytest.approx(losses[False][1], rel=0.1, abs=0.02)


def test_trainer_skips_a_non_finite_loss_under_loss_scaling():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    x[3 * 6 + 2, 1] = np.nan  # a sample of the 4th batch
    data = {"x": x, "y": rng.integers(0, 4, 60).astype(np.int32)}
    session = mlp_session(optim.Adam(lr=1e-2), "cpu", amp=True)
    history = Trainer(session, log_every=1, progress=False).fit(
        DataLoader(data, 6, shuffle=False), epochs=2
    )
    assert session.step_count == 20 and history.steps == 20
    # the 4th batch of each epoch was skipped
    assert [step for step, _ in history.step_loss] == [s for s in range(1, 21) if s not in (4, 14)]
    assert session.loss_scale == 2.0**14  # halved for each
    assert session.parameters(include_state=True)["optim.applied_steps"] == 18


def test_trainer_stops_when_the_loss_stays_non_finite_under_loss_scaling():
    data = {"x": np.full((24, 8), np.nan, np.float32), "y": np.zeros(24, np.int32)}
    session = mlp_session(optim.Adam(lr=1e-2), "cpu", amp=True)
    trainer = Trainer(session, log_every=1, progress=False, nonfinite_patience=3)
    with pytest.raises(NonFiniteLoss, match="non-finite at 3 reads in a row; loss scaling"):
        trainer.fit(DataLoader(data, 6, shuffle=False), epochs=1)
    assert session.step_count == 3


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_precision_cnn_follows_f32_with_f16_convolutions(device):
    from meganeura.recipes import small_cnn

    train, _ = load_digits(flatten=False)
    graph = Graph()
    x = graph.input("x", (32, 1, 8, 8))
    y = graph.input("y", (32,), "i32")
    logits = graph.output("logits", small_cnn(graph, "cnn", (1, 8, 8), 10)(x))
    loss = F.cross_entropy(logits, y)
    subset = {k: v[:320] for k, v in train.items()}
    histories = {}
    for amp in (False, True):
        session = build(graph, loss, optim.Adam(lr=5e-3), device=device, amp=amp)
        if amp:
            ops = {(n.op, n.type.dtype) for n in session.graph.nodes}
            assert {("conv2d", "f16"), ("max_pool2d", "f16"), ("relu", "f16")} <= ops
        histories[amp] = Trainer(session, progress=False).fit(DataLoader(subset, 32), 3).loss
    assert histories[True][-1] < 0.7 * histories[True][0]
    np.testing.assert_allclose(histories[True], histories[False], rtol=0.03)
