"""Layers, data loading, the training loop and the demo, on the NumPy executor."""

import sys

import numpy as np
import pytest
import torch

from meganeura import Graph, build, optim
from meganeura import functional as F
from meganeura.cli import main
from meganeura.data import DataLoader, load_digits
from meganeura.demo import run_demo
from meganeura.nn import MLP, Linear
from meganeura.train import NonFiniteLoss, Trainer, evaluate


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


def test_demo_reaches_95_percent_on_held_out_digits(capsys):
    result = run_demo(device="cpu", progress=False)
    assert result.accuracy >= 0.95
    assert result.history.loss[-1] < result.history.loss[0]
    printed = capsys.readouterr().out
    assert "device: cpu (NumPy executor)" in printed
    assert f"test accuracy: {result.accuracy:.4f}" in printed


def test_demo_command(capsys):
    assert main(["demo", "--device", "cpu", "--epochs", "1", "--seed", "2", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "device: cpu (NumPy executor)" in printed and "test accuracy:" in printed
