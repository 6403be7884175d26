"""`meganeura demo`: train a classifier on the digits dataset and report held-out accuracy.

Everything is real: random (PyTorch-default) initialization, Adam on the training split,
accuracy on a test split the model never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from meganeura.recipes import TrainConfig, train
from meganeura.train import History

EPOCHS = 30


@dataclass
class DemoResult:
    device: str
    accuracy: float
    seconds: float
    history: History


def demo_config(device: str = "auto", epochs: int = EPOCHS, seed: int = 0) -> TrainConfig:
    """The demo's run: an MLP 64 -> 128 -> 10 trained with Adam."""
    return TrainConfig(
        dataset="digits",
        model="mlp",
        hidden=128,
        optimizer="adam",
        lr=3e-3,
        epochs=epochs,
        batch_size=32,
        seed=seed,
        device=device,
    )


def run_demo(
    device: str = "auto", epochs: int = EPOCHS, seed: int = 0, progress: bool = True
) -> DemoResult:
    result = train(demo_config(device, epochs, seed), progress=progress)
    return DemoResult(result.device, result.test_accuracy, result.seconds, result.history)
