"""`meganeura demo`: train a small CNN on the digits dataset and report held-out accuracy.

Everything is real: random (PyTorch-default) initialization, Adam with a cosine schedule on
the training split, accuracy on a test split the model never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from meganeura.recipes import TrainConfig, train
from meganeura.train import History

EPOCHS = 15


@dataclass
class DemoResult:
    device: str
    accuracy: float
    seconds: float
    history: History


def demo_config(device: str = "auto", epochs: int = EPOCHS, seed: int = 0) -> TrainConfig:
    """The demo's run: conv 16 -> conv 32 -> linear (recipes.small_cnn), Adam, cosine."""
    return TrainConfig(
        dataset="digits",
        model="cnn",
        optimizer="adam",
        lr=5e-3,
        schedule="cosine",
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
