"""`meganeura demo`: train an MLP on the digits dataset and report held-out accuracy.

Everything is real: random (PyTorch-default) initialization, Adam on the training split,
accuracy on a test split the model never saw.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from meganeura import functional as F
from meganeura import nn, optim
from meganeura.data import DataLoader, load_digits
from meganeura.graph import Graph
from meganeura.session import build
from meganeura.train import History, Trainer, evaluate

EPOCHS = 30


@dataclass
class DemoResult:
    device: str
    accuracy: float
    seconds: float
    history: History


def run_demo(
    device: str = "auto",
    epochs: int = EPOCHS,
    seed: int = 0,
    batch_size: int = 32,
    hidden: int = 128,
    lr: float = 3e-3,
    progress: bool = True,
) -> DemoResult:
    train, test = load_digits(seed=seed)
    features, classes = train["x"].shape[1], int(train["y"].max()) + 1

    graph = Graph()
    x = graph.input("x", (batch_size, features))
    y = graph.input("y", (batch_size,), "i32")
    model = nn.MLP(graph, "mlp", [features, hidden, classes])
    logits = graph.output("logits", model(x))
    loss = F.cross_entropy(logits, y)
    session = build(graph, loss, optim.Adam(lr=lr), device=device, seed=seed)

    count = sum(value.size for value in session.parameters().values())
    print(f"device: {session.device}")
    print(
        f"data: digits, {len(train['y'])} train / {len(test['y'])} test samples, "
        f"{features} features, {classes} classes"
    )
    print(
        f"model: MLP {features} -> {hidden} -> {classes} (ReLU), {count:,} parameters; "
        f"Adam lr {lr:g}, batch {batch_size}, {epochs} epochs"
    )
    start = time.perf_counter()
    trainer = Trainer(session, progress=progress)
    history = trainer.fit(DataLoader(train, batch_size, seed=seed), epochs)
    accuracy = evaluate(session, DataLoader(test, batch_size, shuffle=False))
    seconds = time.perf_counter() - start
    correct = round(accuracy * len(test["y"]))
    print(
        f"test accuracy: {accuracy:.4f} ({correct}/{len(test['y'])}), "
        f"final train loss {history.loss[-1]:.4f}, {seconds:.1f} s"
    )
    return DemoResult(session.device, accuracy, seconds, history)
