"""Training loops over a Session: `Trainer.fit` for epochs of steps, `evaluate` for accuracy.

The session's graph has a fixed batch dimension (the first dim of its inputs). Training
skips a last batch that is smaller than that, as `drop_last` would; evaluation pads such a
batch to the graph's batch size and keeps only the real rows of the result.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from meganeura.checkpoint import CheckpointError
from meganeura.data import DataLoader
from meganeura.graph import Graph
from meganeura.session import Session


@dataclass
class History:
    """What `Trainer.fit` measured: the mean of the losses read in each epoch, the eval
    accuracy after each epoch (empty without an eval loader), and every loss read, with the
    step count it was read at."""

    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    steps: int = 0
    step_loss: list[tuple[int, float]] = field(default_factory=list)
    epoch_end: list[int] = field(default_factory=list)  # step count at the end of each epoch


class NonFiniteLoss(FloatingPointError):
    """The loss became inf or nan; `step` is the step count when it was read."""

    def __init__(self, message: str, step: int, history: History):
        super().__init__(message)
        self.step = step
        self.history = history


@dataclass
class StepInfo:
    """Passed to `Callback.on_step_end`; valid during the call only."""

    trainer: Trainer
    step: int  # steps taken so far (session.step_count)
    epoch: int  # the epoch being trained, from 1
    batch: int  # the batch within the epoch, from 1

    @property
    def loss(self) -> float:
        """This step's loss. Reading it waits for the device."""
        return self.trainer.session.loss


@dataclass
class EpochInfo:
    """Passed to `Callback.on_epoch_end`."""

    epoch: int  # epochs completed, this one included
    epochs: int  # the total that fit() trains to
    loss: float  # mean of the losses read in this epoch
    accuracy: float | None  # on the eval loader, if fit() has one
    steps: int


class Callback:
    """Hooks that `Trainer.fit` calls; override the ones you need. Setting
    `trainer.stop = True` ends training after the current step."""

    def on_train_begin(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, info: StepInfo) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, info: EpochInfo) -> None:
        pass

    def on_train_end(self, trainer: Trainer, history: History) -> None:
        pass


class LambdaCallback(Callback):
    """A callback from plain functions: `on_step(info)` and `on_epoch(info)`."""

    def __init__(
        self,
        on_step: Callable[[StepInfo], None] | None = None,
        on_epoch: Callable[[EpochInfo], None] | None = None,
    ):
        self.on_step, self.on_epoch = on_step, on_epoch

    def on_step_end(self, trainer, info):
        if self.on_step is not None:
            self.on_step(info)

    def on_epoch_end(self, trainer, info):
        if self.on_epoch is not None:
            self.on_epoch(info)


class SaveCheckpoint(Callback):
    """Saves the trainer (session, optimizer state, epoch and history) to `path` after
    every epoch, atomically, so that `Trainer.resume(path)` continues from there."""

    def __init__(self, path: str | os.PathLike):
        self.path = path

    def on_epoch_end(self, trainer, info):
        trainer.save(self.path)


def graph_batch_size(graph: Graph, names: Iterable[str], what: str) -> int:
    """The first dim that the graph inputs `names` share: the batch size the graph was built for."""
    sizes = {}
    for name in names:
        shape = graph.nodes[graph.inputs[name]].type.shape
        if not shape:
            raise ValueError(f"{what}: input {name!r} is a scalar, so it has no batch dim")
        sizes[name] = shape[0]
    if not sizes:
        raise ValueError(f"{what}: none of the batch's arrays is an input of the graph")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{what}: the graph's inputs disagree on the batch dim: {sizes}")
    return next(iter(sizes.values()))


def _needed_inputs(graph: Graph, output: str) -> list[str]:
    if output not in graph.outputs:
        raise KeyError(f"no output named {output!r}; outputs are {sorted(graph.outputs)}")
    live = set(graph.live_nodes([graph.outputs[output]]))
    return [name for name, nid in graph.inputs.items() if nid in live]


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    if len(array) == rows:
        return array
    return np.concatenate([array, np.zeros((rows - len(array), *array.shape[1:]), array.dtype)])


def evaluate(
    session: Session,
    loader: Iterable[Mapping[str, np.ndarray]],
    logits: str = "logits",
    labels: str = "y",
    ignore_index: int = -100,
) -> float:
    """Accuracy of argmax(`logits` output, last axis) against the loader's `labels` array.

    Runs the forward pass only, in chunks of the graph's batch size (the last one padded);
    labels equal to `ignore_index` are not counted.
    """
    graph = session.graph
    needed = _needed_inputs(graph, logits)
    size = graph_batch_size(graph, needed, "evaluate")
    correct = counted = 0
    for batch in loader:
        if labels not in batch:
            raise KeyError(f"evaluate: the batch has no labels {labels!r}; it has {sorted(batch)}")
        missing = sorted(set(needed) - set(batch))
        if missing:
            raise KeyError(
                f"evaluate: output {logits!r} needs input {missing[0]!r}, not in the batch"
            )
        truth = np.asarray(batch[labels])
        for start in range(0, len(truth), size):
            rows = len(truth[start : start + size])
            feeds = {name: _pad_rows(batch[name][start : start + size], size) for name in needed}
            predicted = session.run(feeds, outputs=[logits])[logits][:rows].argmax(axis=-1)
            valid = truth[start : start + rows] != ignore_index
            correct += int(((predicted == truth[start : start + rows]) & valid).sum())
            counted += int(valid.sum())
    if counted == 0:
        raise ValueError("evaluate: the loader gave no labels to score")
    return correct / counted


class Trainer:
    """Trains a session built with a loss and an optimizer, one `Session.step` per batch.

    The loss is read (which waits for the device) only every `log_every` steps and at the
    end of each epoch, so the steps in between are queued without synchronising. `fit`
    trains up to a total number of epochs: after `resume`, it continues from the epoch the
    checkpoint was saved at, with the same batches an uninterrupted run would have seen.

    A non-finite loss stops training (`NonFiniteLoss`), except under loss scaling
    (`build(..., amp=True)`), where such a step was skipped on the device: training goes on
    unless the loss stays non-finite for `nonfinite_patience` reads in a row.
    """

    TRAINER_STATE = "trainer"

    def __init__(
        self,
        session: Session,
        log_every: int = 10,
        progress: bool = True,
        logits: str = "logits",
        labels: str = "y",
        callbacks: Sequence[Callback] = (),
        nonfinite_patience: int = 5,
    ):
        if session.optimizer is None:
            raise ValueError(
                "Trainer: the session was built without an optimizer; pass one to build()"
            )
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every <= 0:
            raise ValueError(f"Trainer: log_every must be a positive int, got {log_every!r}")
        if isinstance(nonfinite_patience, bool) or not (
            isinstance(nonfinite_patience, int) and nonfinite_patience >= 1
        ):
            raise ValueError(
                f"Trainer: nonfinite_patience must be an int >= 1, got {nonfinite_patience!r}"
            )
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"Trainer: callbacks must be Callback objects, got {callback!r}")
        self.session = session
        self.log_every = log_every
        self.progress = progress
        self.logits, self.labels = logits, labels
        self.callbacks = list(callbacks)
        self.nonfinite_patience = nonfinite_patience
        self._nonfinite_reads = 0
        self.epoch = 0  # epochs completed
        self.history = History()
        self.stop = False

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "history": dataclasses.asdict(self.history)}

    def save(self, path: str | os.PathLike) -> None:
        """Save the session with this trainer's epoch and history (see Session.save)."""
        self.session.save(path, extra={self.TRAINER_STATE: self.state_dict()})

    def resume(self, path: str | os.PathLike, restore_schedules: bool = True) -> None:
        """Load a checkpoint written by `save`: the session's state, the epoch, the history
        (see Session.load for `restore_schedules`)."""
        result = self.session.load(path, restore_schedules=restore_schedules)
        state = result.extra.get(self.TRAINER_STATE)
        if state is None:
            raise CheckpointError(
                f"checkpoint {os.fspath(path)} holds no trainer state (it was saved by "
                "Session.save, not Trainer.save); load it with Session.load"
            )
        self.epoch = int(state["epoch"])
        history = state["history"]
        self.history = History(
            loss=list(history["loss"]),
            accuracy=list(history["accuracy"]),
            steps=int(history["steps"]),
            step_loss=[(int(step), float(loss)) for step, loss in history["step_loss"]],
            epoch_end=[int(step) for step in history["epoch_end"]],
        )

    # -- training -----------------------------------------------------------------------------
    def fit(
        self, loader: DataLoader, epochs: int = 1, eval_loader: DataLoader | None = None
    ) -> History:
        """Train until `epochs` epochs are complete (counting those done before a resume);
        evaluate on `eval_loader` after each."""
        graph = self.session.graph
        fed = [name for name in loader.arrays if name in graph.inputs]
        size = graph_batch_size(graph, fed, "fit")
        if loader.batch_size != size:
            example = graph.nodes[graph.inputs[fed[0]]]
            raise ValueError(
                f"fit: the loader's batch_size is {loader.batch_size} but the graph was built "
                f"for batches of {size} (input {fed[0]!r} is {example.type}); make them equal"
            )
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
            raise ValueError(f"fit: epochs must be a positive int, got {epochs!r}")
        steps_per_epoch = loader.num_samples // size
        if steps_per_epoch == 0:
            raise ValueError(
                f"fit: the loader holds {loader.num_samples} samples, "
                f"fewer than one batch of {size}"
            )
        history = self.history
        self.stop = False
        for callback in self.callbacks:
            callback.on_train_begin(self)
        remaining = max(0, epochs - self.epoch) * steps_per_epoch
        bar = tqdm(total=remaining, disable=not self.progress, unit="step")
        with bar:
            while self.epoch < epochs and not self.stop:
                epoch = self.epoch + 1
                bar.set_description(f"epoch {epoch}/{epochs}")
                loader.epoch = self.epoch  # the shuffle of an epoch depends on its number only
                losses = []
                for index, batch in enumerate(loader):
                    if len(next(iter(batch.values()))) < size:
                        continue  # a last partial batch cannot be fed to a fixed-batch graph
                    self.session.step(batch)
                    history.steps += 1
                    bar.update()
                    if history.steps % self.log_every == 0 or index == steps_per_epoch - 1:
                        loss = self.session.loss
                        if self._check_finite(loss, epoch, index, history):
                            losses.append(loss)
                            history.step_loss.append((self.session.step_count, loss))
                        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                    info = StepInfo(self, self.session.step_count, epoch, index + 1)
                    for callback in self.callbacks:
                        callback.on_step_end(self, info)
                    if self.stop:
                        break
                if self.stop and index < steps_per_epoch - 1:
                    break  # an unfinished epoch is not counted
                history.loss.append(float(np.mean(losses)) if losses else math.nan)
                history.epoch_end.append(self.session.step_count)
                accuracy = None
                if eval_loader is not None:
                    accuracy = evaluate(self.session, eval_loader, self.logits, self.labels)
                    history.accuracy.append(accuracy)
                    bar.set_postfix(loss=f"{history.loss[-1]:.4f}", accuracy=f"{accuracy:.4f}")
                self.epoch = epoch
                info = EpochInfo(epoch, epochs, history.loss[-1], accuracy, history.steps)
                for callback in self.callbacks:
                    callback.on_epoch_end(self, info)
        for callback in self.callbacks:
            callback.on_train_end(self, history)
        return history

    def _check_finite(self, loss: float, epoch: int, index: int, history: History) -> bool:
        """True if `loss` is finite; False for a step that loss scaling skipped; raises
        NonFiniteLoss otherwise."""
        if math.isfinite(loss):
            self._nonfinite_reads = 0
            return True
        self._nonfinite_reads += 1
        scaling = self.session.loss_scaling
        if scaling and self._nonfinite_reads < self.nonfinite_patience:
            return False
        step = self.session.step_count
        where = f"after step {step} (epoch {epoch}, batch {index + 1})"
        if scaling:
            where += (
                f", non-finite at {self._nonfinite_reads} reads in a row; loss scaling skipped "
                "those steps, but a loss that stays non-finite is not an overflow it can fix"
            )
        elif self.log_every > 1:
            where += (
                f"; the loss is read every {self.log_every} steps, so it may have turned "
                "non-finite a few steps earlier"
            )
        raise NonFiniteLoss(
            f"training stopped: the loss is {loss} {where}. "
            "Check the inputs for inf/nan, or lower the learning rate "
            "(MEGANEURA_DEBUG_NAN=1 names the first kernel that produces one).",
            step,
            history,
        )
