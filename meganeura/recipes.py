"""Ready-made training runs: the datasets and models behind `meganeura train` and the demo.

`train(TrainConfig(...))` loads a dataset, builds a classifier, trains it with a Trainer
(checkpointing after every epoch and resuming when asked) and returns what it measured.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from meganeura import functional as F
from meganeura import nn, optim, schedules
from meganeura.data import DataLoader, load_digits, load_mnist
from meganeura.graph import Graph, Tensor
from meganeura.session import Session, build
from meganeura.train import Callback, EpochInfo, History, SaveCheckpoint, Trainer, evaluate

DATASETS = ("digits", "mnist")
MODELS = ("mlp", "cnn")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TrainConfig:
    dataset: str = "digits"
    data: str | None = None  # the directory of the IDX files, for mnist
    model: str = "mlp"
    hidden: int = 128
    optimizer: str = "adam"
    lr: float = 3e-3
    weight_decay: float | None = None  # None: the optimizer's default
    schedule: str = "constant"
    warmup: int = 0  # steps of linear warm-up (cosine and linear schedules)
    clip_grad_norm: float | None = None
    epochs: int = 10  # the total, also when resuming
    batch_size: int = 32
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    checkpoint: str | None = None  # saved after every epoch
    resume: str | None = None


@dataclass
class TrainResult:
    device: str
    parameters: int
    epochs: int
    steps: int
    final_loss: float
    test_accuracy: float
    test_samples: int
    seconds: float
    resumed_at_epoch: int | None
    history: History = field(repr=False)

    def summary(self) -> dict:
        """The JSON-able record that `meganeura train --json` prints."""
        return {
            "epochs": self.epochs,
            "steps": self.steps,
            "final_loss": self.final_loss,
            "test_accuracy": self.test_accuracy,
            "test_samples": self.test_samples,
            "loss_history": self.history.loss,
            "accuracy_history": self.history.accuracy,
            "device": self.device,
            "parameters": self.parameters,
            "seconds": round(self.seconds, 3),
            "resumed_at_epoch": self.resumed_at_epoch,
        }


def load_dataset(config: TrainConfig) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    flatten = config.model == "mlp"
    if config.dataset == "digits":
        return load_digits(seed=config.seed, flatten=flatten)
    if config.dataset == "mnist":
        if not config.data:
            raise ValueError("mnist: pass the directory of its IDX files (--data DIR)")
        return load_mnist(config.data, flatten=flatten)
    raise ValueError(f"unknown dataset {config.dataset!r}; valid: {', '.join(DATASETS)}")


def small_cnn(
    graph: Graph,
    name: str,
    in_shape: tuple[int, int, int],
    classes: int,
    channels: tuple[int, int] = (16, 32),
) -> nn.Sequential:
    """Two stages of 3x3 convolution (padding 1), ReLU and 2x2 max-pooling, then a linear
    head: torch.nn.Sequential(Conv2d, ReLU, MaxPool2d, Conv2d, ReLU, MaxPool2d, Flatten,
    Linear), whose indices name the parameters ("0.weight", "3.weight", "7.weight")."""
    c, h, w = in_shape
    if h < 4 or w < 4:
        raise ValueError(f"small_cnn: images of {h}x{w} are too small for two 2x2 poolings")
    return nn.Sequential(
        nn.Conv2d(graph, nn.join(name, "0"), c, channels[0], 3, padding=1),
        F.relu,
        nn.MaxPool2d(2),
        nn.Conv2d(graph, nn.join(name, "3"), channels[0], channels[1], 3, padding=1),
        F.relu,
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(graph, nn.join(name, "7"), channels[1] * (h // 4) * (w // 4), classes),
    )


def classifier(graph: Graph, config: TrainConfig, x: Tensor, classes: int) -> Tensor:
    """The logits of the configured model for inputs `x`."""
    if config.model == "mlp":
        return nn.MLP(graph, "mlp", [x.shape[1], config.hidden, classes])(x)
    if config.model == "cnn":
        if x.ndim != 4:
            raise ValueError(f"the cnn model needs [N, C, H, W] images, got {list(x.shape)}")
        return small_cnn(graph, "cnn", x.shape[1:], classes)(x)
    raise ValueError(f"unknown model {config.model!r}; valid: {', '.join(MODELS)}")


def make_optimizer(config: TrainConfig, total_steps: int) -> optim.Optimizer:
    if config.optimizer not in optim.OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {config.optimizer!r}; valid: {', '.join(optim.OPTIMIZERS)}"
        )
    if config.schedule == "constant":
        if config.warmup:
            raise ValueError("a warm-up needs a schedule to warm up: --schedule cosine or linear")
        lr = config.lr
    elif config.schedule in ("cosine", "linear"):
        make = schedules.warmup_cosine if config.schedule == "cosine" else schedules.warmup_linear
        lr = make(config.lr, config.warmup, total_steps)
    else:
        raise ValueError(f"unknown schedule {config.schedule!r}; valid: {', '.join(SCHEDULES)}")
    options = {"clip_grad_norm": config.clip_grad_norm}
    if config.weight_decay is not None:
        options["weight_decay"] = config.weight_decay
    return optim.OPTIMIZERS[config.optimizer](lr, **options)


def build_session(config: TrainConfig, train_split, total_steps: int) -> Session:
    graph = Graph()
    x = graph.input("x", (config.batch_size, *train_split["x"].shape[1:]))
    y = graph.input("y", (config.batch_size,), "i32")
    classes = int(train_split["y"].max()) + 1
    logits = graph.output("logits", classifier(graph, config, x, classes))
    loss = F.cross_entropy(logits, y)
    optimizer = make_optimizer(config, total_steps)
    return build(graph, loss, optimizer, device=config.device, seed=config.seed, amp=config.amp)


class _EpochReport(Callback):
    def __init__(self, echo: Callable[[str], None], test_samples: int):
        self.echo, self.test_samples = echo, test_samples

    def on_epoch_end(self, trainer, info: EpochInfo):
        line = f"epoch {info.epoch}/{info.epochs}: train loss {info.loss:.4f}"
        if info.accuracy is not None:
            correct = round(info.accuracy * self.test_samples)
            line += f", test accuracy {info.accuracy:.4f} ({correct}/{self.test_samples})"
        self.echo(line)


def train(
    config: TrainConfig, progress: bool = True, echo: Callable[[str], None] | None = None
) -> TrainResult:
    """Run the configured training; `echo` receives the human-readable report lines."""
    if echo is None:

        def echo(line: str) -> None:
            tqdm.write(line, file=sys.stdout)

    train_split, test_split = load_dataset(config)
    steps_per_epoch = len(train_split["y"]) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch size {config.batch_size} exceeds the {len(train_split['y'])} training samples"
        )
    session = build_session(config, train_split, steps_per_epoch * config.epochs)
    count = sum(v.size for v in session.parameters().values())
    tests = len(test_split["y"])
    echo(f"device: {session.device}")
    echo(
        f"data: {config.dataset}, {len(train_split['y'])} train / {tests} test samples, "
        f"inputs {list(train_split['x'].shape[1:])}, {int(train_split['y'].max()) + 1} classes"
    )
    echo(
        f"model: {config.model}, {count:,} parameters; {config.optimizer} lr {config.lr:g} "
        f"({config.schedule}), batch {config.batch_size}, {config.epochs} epochs"
    )
    callbacks: list[Callback] = [_EpochReport(echo, tests)]
    if config.checkpoint:
        callbacks.append(SaveCheckpoint(config.checkpoint))
    trainer = Trainer(session, progress=progress, callbacks=callbacks)
    resumed_at = None
    if config.resume:
        # The schedule spans this run's total epochs, which may differ from the saved run's.
        trainer.resume(config.resume, restore_schedules=False)
        resumed_at = trainer.epoch
        echo(f"resumed from {config.resume} after epoch {trainer.epoch}")
    start = time.perf_counter()
    loader = DataLoader(train_split, config.batch_size, seed=config.seed)
    test_loader = DataLoader(test_split, config.batch_size, shuffle=False)
    history = trainer.fit(loader, config.epochs, eval_loader=test_loader)
    if history.accuracy:
        accuracy = history.accuracy[-1]
    else:
        accuracy = evaluate(session, test_loader)
    seconds = time.perf_counter() - start
    correct = round(accuracy * tests)
    final_loss = history.loss[-1] if history.loss else float("nan")
    echo(
        f"test accuracy: {accuracy:.4f} ({correct}/{tests}), final train loss "
        f"{final_loss:.4f}, {seconds:.1f} s"
    )
    return TrainResult(
        session.device,
        count,
        trainer.epoch,
        history.steps,
        final_loss,
        accuracy,
        tests,
        seconds,
        resumed_at,
        history,
    )
