"""Layers, data loading, the training loop and the demo, on the NumPy executor."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meganeura import Graph, build, optim, schedules
from meganeura import functional as F
from meganeura.checkpoint import CheckpointError
from meganeura.cli import main
from meganeura.data import DataLoader, load_digits
from meganeura.demo import run_demo
from meganeura.nn import MLP, Linear
from meganeura.plot import plot_history
from meganeura.train import (
    Callback,
    History,
    LambdaCallback,
    NonFiniteLoss,
    SaveCheckpoint,
    Trainer,
    evaluate,
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def classifier(batch: int, sizes=(64, 32, 10), optimizer=None, seed: int = 0):
    graph = Graph()
    x = graph.input("x", (batch, sizes[0]))
    y = graph.input("y", (batch,), "i32")
    logits = graph.output("logits", MLP(graph, "mlp", list(sizes))(x))
    loss = F.cross_entropy(logits, y)
    return build(graph, loss, optimizer or optim.SGD(lr=0.1), device="cpu", seed=seed)


# -- nn ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 3), (2, 4, 3), (3,)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(shape, bias):
    graph = Graph()
    x = graph.input("x", shape)
    layer = Linear(graph, "proj", 3, 7, bias=bias)
    graph.output("y", layer(x))
    session = build(graph, device="cpu")
    params = session.parameters()
    assert sorted(params) == (["proj.bias", "proj.weight"] if bias else ["proj.weight"])
    assert params["proj.weight"].shape == (7, 3)
    reference = torch.nn.Linear(3, 7, bias=bias)
    reference.load_state_dict(
        {name.removeprefix("proj."): torch.from_numpy(v) for name, v in params.items()}
    )
    data = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = session.run({"x": data})["y"]
    np.testing.assert_allclose(
        got, reference(torch.from_numpy(data)).detach().numpy(), rtol=1e-5, atol=1e-6
    )


def test_linear_reads_the_weight_transposed_without_a_copy():
    graph = Graph()
    Linear(graph, "fc", 4, 2)(graph.input("x", (3, 4)))
    matmuls = [node for node in graph.nodes if node.op == "matmul"]
    assert [node.attrs for node in matmuls] == [{"trans_a": False, "trans_b": True}]
    assert not any(node.op == "permute" for node in graph.nodes)


def test_linear_init_follows_torch_defaults():
    graph = Graph()
    Linear(graph, "fc", 256, 512)
    params = build(graph, device="cpu").parameters()
    bound = 1 / np.sqrt(256)
    for name in ("fc.weight", "fc.bias"):
        value = params[name]
        assert np.abs(value).max() <= bound
        # uniform on [-bound, bound]: the standard deviation is bound / sqrt(3)
        assert abs(value.std() - bound / np.sqrt(3)) < 0.1 * bound


def test_linear_rejects_a_wrong_input_dim():
    graph = Graph()
    layer = Linear(graph, "fc", 4, 2)
    with pytest.raises(
        ValueError, match=r"Linear 'fc': expects inputs with last dim 4, got \[3, 5\]"
    ):
        layer(graph.input("x", (3, 5)))


def test_mlp_parameter_names_are_torch_sequential_keys():
    graph = Graph()
    MLP(graph, "", [5, 8, 8, 3])(graph.input("x", (2, 5)))
    torch_model = torch.nn.Sequential(
        torch.nn.Linear(5, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 3),
    )
    expected = {name: tuple(value.shape) for name, value in torch_model.state_dict().items()}
    assert {name: graph.nodes[nid].type.shape for name, nid in graph.parameters.items()} == expected


def test_mlp_names_nest_under_a_prefix():
    graph = Graph()
    MLP(graph, "head", [4, 6, 2], bias=False)
    assert list(graph.parameters) == ["head.0.weight", "head.2.weight"]


# -- data ----------------------------------------------------------------------------------


def numbered(count: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(count * 2, dtype=np.float32).reshape(count, 2), "y": np.arange(count)}


def test_loader_len_and_partial_last_batch():
    loader = DataLoader(numbered(10), batch_size=4, shuffle=False)
    assert len(loader) == 3
    assert [len(batch["y"]) for batch in loader] == [4, 4, 2]
    dropping = DataLoader(numbered(10), batch_size=4, shuffle=False, drop_last=True)
    assert len(dropping) == 2
    assert [batch["y"].tolist() for batch in dropping] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert len(DataLoader(numbered(8), batch_size=4, drop_last=True)) == 2


def test_loader_batches_keep_rows_together():
    for batch in DataLoader(numbered(10), batch_size=3, seed=4):
        np.testing.assert_array_equal(batch["x"][:, 0], batch["y"] * 2)


def test_loader_shuffle_is_seeded_and_changes_each_epoch():
    def epochs(seed):
        loader = DataLoader(numbered(10), batch_size=4, seed=seed)
        return [np.concatenate([batch["y"] for batch in loader]).tolist() for _ in range(3)]

    first = epochs(seed=7)
    assert first == epochs(seed=7)
    assert first != epochs(seed=8)
    assert first[0] != first[1] != first[2]
    assert all(sorted(order) == list(range(10)) for order in first)


def test_loader_errors():
    with pytest.raises(ValueError, match="share their first dim"):
        DataLoader({"x": np.zeros((4, 2)), "y": np.zeros(5)}, batch_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        DataLoader(numbered(4), batch_size=0)
    with pytest.raises(ValueError, match="no arrays"):
        DataLoader({}, batch_size=2)


def test_load_digits_split(digits):
    train, test = digits
    assert train["x"].shape == (1438, 64) and test["x"].shape == (359, 64)
    assert train["x"].dtype == np.float32 and train["y"].dtype == np.int32
    assert train["x"].min() == 0.0 and train["x"].max() == 1.0
    # stratified: every class keeps about 20% of its samples in the test split
    counts_test = np.bincount(test["y"], minlength=10)
    counts_all = counts_test + np.bincount(train["y"], minlength=10)
    assert np.all(np.abs(counts_test - 0.2 * counts_all) <= 1)
    again_train, _ = load_digits()
    np.testing.assert_array_equal(again_train["x"], train["x"])
    other_train, _ = load_digits(seed=1)
    assert not np.array_equal(other_train["x"], train["x"])


def test_load_digits_names_scikit_learn_when_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="scikit-learn"):
        load_digits()


# -- training ------------------------------------------------------------------------------


def test_trainer_loss_decreases_on_digits(digits):
    train, test = digits
    session = classifier(32)
    history = Trainer(session, progress=False).fit(
        DataLoader(train, 32), epochs=3, eval_loader=DataLoader(test, 32, shuffle=False)
    )
    assert history.loss[0] > history.loss[1] > history.loss[2]
    assert len(history.accuracy) == 3 and history.accuracy[-1] > 0.8
    # 1438 samples make 44 batches of 32 and a partial one, which training skips
    assert history.steps == 3 * 44 == session.step_count


def test_trainer_needs_the_loader_to_match_the_graph_batch(digits):
    session = classifier(32)
    with pytest.raises(
        ValueError, match="batch_size is 16 but the graph was built for batches of 32"
    ):
        Trainer(session, progress=False).fit(DataLoader(digits[0], 16))


def test_evaluate_pads_the_last_batch_and_counts_only_real_rows(digits):
    _, test = digits
    session = classifier(32, seed=3)
    params = session.parameters()
    hidden = np.maximum(test["x"] @ params["mlp.0.weight"].T + params["mlp.0.bias"], 0)
    logits = hidden @ params["mlp.2.weight"].T + params["mlp.2.bias"]
    expected = np.mean(logits.argmax(axis=1) == test["y"])
    # 359 rows: batches of 50 split into graph chunks of 32, the last of each padded
    assert evaluate(session, DataLoader(test, 50, shuffle=False)) == pytest.approx(expected)
    assert evaluate(session, DataLoader(test, 32)) == pytest.approx(expected)


def test_evaluate_skips_ignored_labels():
    session = classifier(4, sizes=(2, 3))
    session.set_parameters(
        {"mlp.0.weight": np.eye(3, 2, dtype=np.float32), "mlp.0.bias": np.zeros(3)}
    )
    x = np.array([[1, 0], [0, 1], [1, 0], [0, 1], [1, 0]], np.float32)
    y = np.array([0, 1, 2, -100, -100], np.int32)  # two right, one wrong, two ignored
    assert evaluate(session, DataLoader({"x": x, "y": y}, 5)) == pytest.approx(2 / 3)


@pytest.mark.parametrize(("log_every", "reported"), [(1, 4), (5, 5)])
def test_non_finite_loss_stops_training_naming_the_step(digits, log_every, reported):
    train, _ = digits
    x = train["x"][:320].copy()
    x[3 * 32 + 5, 7] = np.nan  # a sample of the 4th batch
    session = classifier(32)
    trainer = Trainer(session, log_every=log_every, progress=False)
    with pytest.raises(NonFiniteLoss, match=f"loss is nan after step {reported} ") as caught:
        trainer.fit(DataLoader({"x": x, "y": train["y"][:320]}, 32, shuffle=False), epochs=2)
    assert caught.value.step == reported == session.step_count
    if log_every > 1:
        assert "read every 5 steps" in str(caught.value)


def test_trainer_needs_an_optimizer():
    graph = Graph()
    graph.output("y", Linear(graph, "fc", 2, 2)(graph.input("x", (1, 2))))
    with pytest.raises(ValueError, match="without an optimizer"):
        Trainer(build(graph, device="cpu"))


# -- demo ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_cnn_reaches_97_percent_on_held_out_digits(capsys):
    result = run_demo(device="cpu", progress=False)
    assert result.accuracy >= 0.97
    assert result.history.loss[-1] < result.history.loss[0]
    printed = capsys.readouterr().out
    assert "device: cpu (NumPy executor)" in printed
    assert "model: cnn, 6,090 parameters" in printed
    assert f"test accuracy: {result.accuracy:.4f}" in printed


def test_demo_command(capsys):
    assert main(["demo", "--device", "cpu", "--epochs", "1", "--seed", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "device: cpu (NumPy executor)" in printed and "test accuracy:" in printed


# -- callbacks, resuming, plots --------------------------------------------------------------


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def on_train_begin(self, trainer):
        self.calls.append(("begin",))

    def on_step_end(self, trainer, info):
        self.calls.append(("step", info.step, info.epoch, info.batch))

    def on_epoch_end(self, trainer, info):
        self.calls.append(("epoch", info.epoch, info.epochs, info.loss, info.accuracy, info.steps))

    def on_train_end(self, trainer, history):
        self.calls.append(("end", history.steps))


def small_digits(digits, count=96):
    train, test = digits
    return {k: v[:count] for k, v in train.items()}, {k: v[:40] for k, v in test.items()}


def test_callbacks_are_called_at_every_step_and_epoch(digits):
    train, test = small_digits(digits)
    recorder = Recorder()
    losses = []
    session = classifier(32)
    trainer = Trainer(
        session,
        log_every=2,
        progress=False,
        callbacks=[recorder, LambdaCallback(on_step=lambda info: losses.append(info.loss))],
    )
    history = trainer.fit(
        DataLoader(train, 32), epochs=2, eval_loader=DataLoader(test, 32, shuffle=False)
    )
    steps = [c for c in recorder.calls if c[0] == "step"]
    assert steps == [("step", 3 * e + b, e + 1, b) for e in range(2) for b in (1, 2, 3)]
    epochs = [c for c in recorder.calls if c[0] == "epoch"]
    assert [c[1:3] for c in epochs] == [(1, 2), (2, 2)]
    assert [c[3] for c in epochs] == history.loss and [c[4] for c in epochs] == history.accuracy
    assert recorder.calls[0] == ("begin",) and recorder.calls[-1] == ("end", 6)
    assert len(losses) == 6 and all(np.isfinite(losses))
    # the loss read at steps 2, 3 (end of epoch), 4 and 6 (end of epoch)
    assert [step for step, _ in history.step_loss] == [2, 3, 4, 6]
    assert history.epoch_end == [3, 6]


def test_a_callback_can_stop_training(digits):
    train, _ = small_digits(digits)

    class StopAtFour(Callback):
        def on_step_end(self, trainer, info):
            trainer.stop = info.step == 4

    session = classifier(32)
    trainer = Trainer(session, progress=False, callbacks=[StopAtFour()])
    history = trainer.fit(DataLoader(train, 32), epochs=5)
    assert session.step_count == 4 and trainer.epoch == 1 and len(history.loss) == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("vulkan-cpu", marks=pytest.mark.lavapipe)])
def test_trainer_resume_matches_an_uninterrupted_fit(digits, tmp_path, device):
    train, test = small_digits(digits)

    def fresh(seed=0):
        graph = Graph()
        x = graph.input("x", (32, 64))
        y = graph.input("y", (32,), "i32")
        logits = graph.output("logits", MLP(graph, "mlp", [64, 16, 10])(x))
        optimizer = optim.AdamW(lr=schedules.warmup_cosine(1e-2, 2, 12), clip_grad_norm=1.0)
        session = build(graph, F.cross_entropy(logits, y), optimizer, device=device, seed=seed)
        return Trainer(session, progress=False)

    def loaders():
        return DataLoader(train, 32, seed=5), DataLoader(test, 32, shuffle=False)

    straight = fresh()
    straight.fit(*loaders()[:1], epochs=4, eval_loader=loaders()[1])

    path = tmp_path / "trainer.safetensors"
    first = fresh()
    first.callbacks.append(SaveCheckpoint(path))
    first.fit(*loaders()[:1], epochs=2, eval_loader=loaders()[1])
    resumed = fresh(seed=9)
    resumed.resume(path)
    assert resumed.epoch == 2 and resumed.history.loss == first.history.loss
    history = resumed.fit(*loaders()[:1], epochs=4, eval_loader=loaders()[1])
    assert history == straight.history
    want, got = straight.session.parameters(True), resumed.session.parameters(True)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_resume_needs_trainer_state(tmp_path):
    session = classifier(4)
    session.save(tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="holds no trainer state"):
        Trainer(session).resume(tmp_path / "plain.safetensors")


def test_plot_history_writes_a_png(digits, tmp_path):
    train, test = small_digits(digits)
    trainer = Trainer(classifier(32), log_every=1, progress=False)
    history = trainer.fit(
        DataLoader(train, 32), epochs=2, eval_loader=DataLoader(test, 32, shuffle=False)
    )
    path = tmp_path / "loss.png"
    plot_history(history, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'meganeura\[plot\]'"):
        plot_history(History(step_loss=[(1, 1.0)]), tmp_path / "x.png")
    # the command refuses before it trains
    with pytest.raises(SystemExit) as caught:
        main(["train", "digits", "--device", "cpu", "--plot", str(tmp_path / "x.png")])
    assert caught.value.code == 2
    assert "meganeura[plot]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# -- the train command ---------------------------------------------------------------------


def train_json(capsys, *args) -> dict:
    assert main(["train", *args, "--device", "cpu", "--quiet", "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1])


def test_train_command_digits(capsys, tmp_path):
    result = train_json(
        capsys,
        "digits",
        "--epochs",
        "3",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        "--plot",
        str(tmp_path / "curve.png"),
    )
    assert result["epochs"] == 3 and len(result["accuracy_history"]) == 3
    assert result["test_accuracy"] > 0.8 and result["final_loss"] < result["loss_history"][0]
    assert (tmp_path / "curve.png").exists()


def test_train_command_resume_continues_to_the_total_epochs(capsys, tmp_path):
    options = [
        "--optimizer",
        "adamw",
        "--clip-grad-norm",
        "1.0",
        "--batch-size",
        "64",
    ]
    straight = train_json(capsys, "digits", "--epochs", "3", *options)
    path = str(tmp_path / "ckpt.safetensors")
    train_json(capsys, "digits", "--epochs", "2", "--checkpoint", path, *options)
    resumed = train_json(
        capsys, "digits", "--epochs", "3", "--resume", path, "--checkpoint", path, *options
    )
    assert resumed["resumed_at_epoch"] == 2
    for key in ("epochs", "steps", "final_loss", "test_accuracy", "loss_history"):
        assert resumed[key] == straight[key], key


def test_train_command_schedule_spans_the_total_epochs_after_resume(capsys, tmp_path):
    options = ["--schedule", "cosine", "--warmup", "5", "--batch-size", "64"]
    path = str(tmp_path / "ckpt.safetensors")
    train_json(capsys, "digits", "--epochs", "1", "--checkpoint", path, *options)
    resumed = train_json(capsys, "digits", "--epochs", "3", "--resume", path, *options)
    # a cosine over one epoch would have reached lr 0 and frozen the model: it learns on
    assert resumed["epochs"] == 3
    assert resumed["loss_history"][2] < resumed["loss_history"][1] < resumed["loss_history"][0]


def test_train_command_cnn_on_mnist_images(capsys, tmp_path):
    from tests.test_data import write_mnist

    write_mnist(tmp_path, train=120, test=40, rows=8, cols=8)
    result = train_json(
        capsys,
        "mnist",
        "--data",
        str(tmp_path),
        "--model",
        "cnn",
        "--epochs",
        "3",
        "--batch-size",
        "20",
        "--lr",
        "0.01",
    )
    assert result["parameters"] == 16 * 9 + 16 + 32 * 16 * 9 + 32 + 128 * 10 + 10
    assert result["final_loss"] < result["loss_history"][0]


def test_train_command_mnist_from_idx_files(capsys, tmp_path):
    from tests.test_data import write_mnist

    write_mnist(tmp_path, train=200, test=50, compress=True)
    result = train_json(
        capsys,
        "mnist",
        "--data",
        str(tmp_path),
        "--epochs",
        "4",
        "--batch-size",
        "20",
        "--lr",
        "0.01",
    )
    assert result["test_samples"] == 50 and result["test_accuracy"] >= 0.9


def test_train_command_errors(capsys, tmp_path):
    assert main(["train", "mnist", "--device", "cpu", "--quiet"]) == 1
    assert "--data DIR" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nonsense")
    with pytest.raises(SystemExit):
        main(["train", "digits", "--device", "cpu", "--quiet", "--resume", str(bad)])
    assert f"checkpoint {bad} cannot be read" in capsys.readouterr().err
    assert main(["train", "digits", "--device", "cpu", "--quiet", "--warmup", "5"]) == 1
    assert "a warm-up needs a schedule" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "digits", "--lr", "nan"])
    assert "--lr: must be a finite number > 0" in capsys.readouterr().err


def test_training_benchmark_runs(tmp_path):
    """bench/train.py is for the GPU machine; here, a tiny smoke run keeps it working."""
    import subprocess

    out = tmp_path / "bench.json"
    command = [sys.executable, "bench/train.py", "--device", "cpu", "--quick", "--runs", "3"]
    command += ["--warmup", "1", "--no-torch", "--json", str(out)]
    subprocess.run(command, check=True, capture_output=True, cwd=Path(__file__).parent.parent)
    results = json.loads(out.read_text())["results"]
    assert [r["workload"].split()[0] for r in results] == ["MLP", "transformer"]
    assert all(r["step_latency_ms"] > 0 and r["pipelined_step_ms"] > 0 for r in results)
