"""Checkpoints: exact resume, atomic writes, mismatch reports and damaged files."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import given, settings
from hypothesis import strategies as st

from meganeura import optim, schedules
from meganeura.checkpoint import CheckpointError
from tests.test_optim import DEVICES, batches, mlp_session

OPTIMIZERS = {
    "sgd_accumulate": lambda: optim.SGD(
        lr=schedules.step_decay(0.05, 2, 0.7), momentum=0.9, nesterov=True, accumulate=3
    ),
    "adamw_clip": lambda: optim.AdamW(
        lr=schedules.warmup_cosine(1e-2, 2, 10),
        clip_grad_norm=0.5,
        groups=[optim.Group("*.bias", weight_decay=0.0, lr_mult=2.0)],
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_resume_continues_bit_identically(tmp_path, device, kind):
    data = batches(10)
    straight = mlp_session(OPTIMIZERS[kind](), device)
    for batch in data:
        straight.step(batch)

    first = mlp_session(OPTIMIZERS[kind](), device)
    for batch in data[:5]:  # mid-way through an accumulation window for k=3
        first.step(batch)
    path = tmp_path / "run.safetensors"
    first.save(path, extra={"note": "half-way"})
    del first

    resumed = mlp_session(OPTIMIZERS[kind](), device, seed=123)  # other initial values
    result = resumed.load(path)
    assert result.extra == {"note": "half-way"} and not result.missing and not result.unexpected
    assert resumed.step_count == 5
    for batch in data[5:]:
        resumed.step(batch)
    assert (resumed.step_count, resumed.update_count) == (
        straight.step_count,
        straight.update_count,
    )
    want = straight.parameters(include_state=True)
    got = resumed.parameters(include_state=True)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_saved_schedule_is_restored(tmp_path):
    session = mlp_session(optim.Adam(lr=schedules.warmup_cosine(0.1, 5, 100)), "cpu")
    session.save(tmp_path / "a.safetensors")
    schedule = schedules.warmup_cosine(0.3, 1, 10)
    other = mlp_session(optim.Adam(lr=schedule), "cpu")
    other.load(tmp_path / "a.safetensors")
    assert (schedule.lr, schedule.warmup_steps, schedule.total_steps) == (0.1, 5, 100)


def test_loading_into_another_graph_names_every_mismatch(tmp_path):
    path = tmp_path / "sgd.safetensors"
    mlp_session(optim.SGD(lr=0.1, momentum=0.9), "cpu").save(path)
    adam = mlp_session(optim.Adam(lr=0.1), "cpu")
    with pytest.raises(CheckpointError) as caught:
        adam.load(path)
    message = str(caught.value)
    assert str(path) in message
    assert "missing from the checkpoint: " in message and "optim.exp_avg.0.weight" in message
    assert "not in the graph: " in message and "optim.momentum.2.bias" in message

    result = adam.load(path, strict=False)  # loads the model, reports the rest
    assert "optim.exp_avg_sq.2.bias" in result.missing
    assert "optim.momentum.0.weight" in result.unexpected
    saved, _ = safetensors.numpy.load_file(path), None
    np.testing.assert_array_equal(adam.parameters()["0.weight"], saved["0.weight"])


def test_wrong_shapes_are_refused_even_when_not_strict(tmp_path):
    from meganeura import Graph, build
    from meganeura import functional as F
    from meganeura.nn import MLP

    path = tmp_path / "a.safetensors"
    mlp_session(optim.SGD(lr=0.1), "cpu").save(path)
    graph = Graph()
    x = graph.input("x", (2, 8))
    logits = MLP(graph, "", [8, 12, 4])(x)
    narrower = build(graph, F.cross_entropy(logits, graph.input("y", (2,), "i32")), device="cpu")
    with pytest.raises(CheckpointError) as caught:
        narrower.load(path, strict=False)
    assert (
        "wrong shape: 0.weight (checkpoint [16, 8], graph [12, 8]), 0.bias (checkpoint [16], "
        "graph [12]), 2.weight (checkpoint [4, 16], graph [4, 12])" in str(caught.value)
    )


def save_one(tmp_path, name="good.safetensors"):
    session = mlp_session(optim.Adam(lr=0.1), "cpu")
    session.step(batches(1)[0])
    path = tmp_path / name
    session.save(path)
    return session, path


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],
        lambda data: data[:5],
        lambda data: b"",
        lambda data: b"\xff" * 64,
        lambda data: data[:-1],
        lambda data: data[:-4] + bytes(b ^ 0x55 for b in data[-4:]),  # tensor bytes changed
        lambda data: data[:8] + b"x" + data[9:],  # broken header JSON
    ],
    ids=["half", "five_bytes", "empty", "garbage", "one_byte_short", "flipped_data", "header"],
)
def test_damaged_checkpoint_raises_naming_the_file(tmp_path, damage):
    session, path = save_one(tmp_path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(damage(path.read_bytes()))
    before = session.parameters(include_state=True)
    with pytest.raises(CheckpointError, match=str(bad)):
        session.load(bad)
    after = session.parameters(include_state=True)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing was half-loaded


def test_plain_safetensors_file_is_not_a_checkpoint(tmp_path):
    session, _ = save_one(tmp_path)
    path = tmp_path / "weights.safetensors"
    safetensors.numpy.save_file(session.parameters(), path)
    with pytest.raises(CheckpointError, match="is not a meganeura checkpoint"):
        session.load(path)


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    session, path = save_one(tmp_path)
    good = path.read_bytes()
    session.step(batches(2)[1])

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        session.save(path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == [path.name]  # the temporary file was removed


def test_killed_mid_save_leaves_the_previous_checkpoint(tmp_path):
    _, path = save_one(tmp_path)
    good = path.read_bytes()
    # A process killed (SIGKILL, no cleanup) after writing its temporary file.
    script = textwrap.dedent(
        f"""
        import os, signal
        import numpy as np
        from meganeura import checkpoint
        os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.save({str(path)!r}, {{"w": np.ones((256, 256), np.float32)}}, {{}})
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()
    assert path.read_bytes() == good
    session = mlp_session(optim.Adam(lr=0.1), "cpu")
    session.load(path)  # still a valid checkpoint


@settings(max_examples=12, deadline=None)
@given(
    steps=st.integers(1, 7),
    split=st.integers(0, 7),
    every=st.integers(1, 3),
    kind=st.sampled_from(["sgd", "adam", "adamw"]),
)
def test_resume_at_any_step_is_exact(tmp_path_factory, steps, split, every, kind):
    split = min(split, steps)
    make = {
        "sgd": lambda: optim.SGD(lr=0.05, momentum=0.9, accumulate=every),
        "adam": lambda: optim.Adam(lr=schedules.step_decay(1e-2, 2, 0.5), accumulate=every),
        "adamw": lambda: optim.AdamW(lr=1e-2, clip_grad_norm=0.3, accumulate=every),
    }[kind]
    data = batches(steps)
    straight = mlp_session(make(), "cpu")
    for batch in data:
        straight.step(batch)
    first = mlp_session(make(), "cpu")
    for batch in data[:split]:
        first.step(batch)
    path = tmp_path_factory.mktemp("resume") / "c.safetensors"
    first.save(path)
    resumed = mlp_session(make(), "cpu", seed=1)
    resumed.load(path)
    for batch in data[split:]:
        resumed.step(batch)
    want, got = straight.parameters(True), resumed.parameters(True)
    assert all(np.array_equal(want[k], got[k]) for k in want)
