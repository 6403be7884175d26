"""Training runs in PyTorch that mirror a meganeura training configuration.

A `Run` describes an optimizer setup once (kind, hyperparameters, groups, frozen parameters,
clipping, accumulation); `Run.ours()` builds the meganeura optimizer and `train_torch` trains
a torch module the way a PyTorch user would write it: torch.optim with param groups,
`requires_grad_(False)` for frozen parameters, `clip_grad_norm_`, `(loss / k).backward()`
over k micro-batches, and the learning rate of each group set from the schedule every step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from meganeura import optim

TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


@dataclass
class Run:
    kind: str
    hyper: dict[str, Any]
    # (match, hyperparameter overrides, lr_mult)
    groups: Sequence[tuple[Any, dict[str, Any], float]] = ()
    frozen: Sequence[Any] = ()
    clip: float | None = None
    accumulate: int = 1
    clipped: list[bool] = field(default_factory=list)  # filled by train_torch

    def ours(self) -> optim.Optimizer:
        groups = [optim.Group(match, lr_mult=mult, **over) for match, over, mult in self.groups]
        groups += [optim.Group(match, frozen=True) for match in self.frozen]
        return optim.OPTIMIZERS[self.kind](
            **self.hyper, groups=groups, clip_grad_norm=self.clip, accumulate=self.accumulate
        )


def _lr_at(lr, step: int) -> float:
    return lr(step) if callable(lr) else lr


def train_torch(
    model: torch.nn.Module,
    initial: dict[str, np.ndarray],
    run: Run,
    batches: Sequence[dict[str, np.ndarray]],
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor],
) -> dict[str, np.ndarray]:
    """Train `model` (loaded with `initial`) on `batches`; returns its final state dict."""
    threads = torch.get_num_threads()
    # Tiny models: one thread is ~50x faster than several fighting over two busy cores.
    torch.set_num_threads(1)
    try:
        return _train(model, initial, run, batches, loss_fn)
    finally:
        torch.set_num_threads(threads)


def _train(model, initial, run, batches, loss_fn):
    model.load_state_dict({name: torch.from_numpy(value) for name, value in initial.items()})
    matcher = run.ours()  # only to resolve which group owns each parameter
    owners: dict[str, Any] = {}
    for name, param in model.named_parameters():
        owner = next((g for g in matcher.groups if g.matches(name)), None)
        if owner is not None and owner.frozen:
            param.requires_grad_(False)
        else:
            owners[name] = owner
    specs = []  # (torch group dict, lr spec, lr_mult)
    default = [p for n, p in model.named_parameters() if n in owners and owners[n] is None]
    if default:
        specs.append(({"params": default}, run.hyper["lr"], 1.0))
    for group in matcher.groups:
        members = [p for n, p in model.named_parameters() if n in owners and owners[n] is group]
        if members:
            overrides = {k: v for k, v in group.hyper.items() if k != "lr"}
            specs.append(
                (
                    {"params": members, **overrides},
                    group.hyper.get("lr", run.hyper["lr"]),
                    group.lr_mult,
                )
            )
    defaults = {k: v for k, v in run.hyper.items() if k != "lr"}
    opt = TORCH_OPTIMIZERS[run.kind](
        [spec for spec, _, _ in specs], lr=_lr_at(run.hyper["lr"], 0), **defaults
    )
    trained = [p for p in model.parameters() if p.requires_grad]
    update = 0
    opt.zero_grad()
    for index, batch in enumerate(batches):
        tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
        (loss_fn(model, tensors) / run.accumulate).backward()
        if (index + 1) % run.accumulate:
            continue
        if run.clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(trained, run.clip)
            run.clipped.append(bool(norm > run.clip))
        for group, (_, lr, mult) in zip(opt.param_groups, specs, strict=True):
            group["lr"] = _lr_at(lr, update) * mult
        opt.step()
        opt.zero_grad()
        update += 1
    return {name: value.detach().numpy().copy() for name, value in model.state_dict().items()}


def assert_close_to_torch(
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    initial: dict[str, np.ndarray],
    frozen: Sequence[str] = (),
    rtol: float = 1e-4,
) -> None:
    """Every parameter within `rtol` (relative to its largest value) of torch's; each one
    that is trained must have moved, so that the comparison means something."""
    assert sorted(got) == sorted(want)
    for key, expected in want.items():
        if key in frozen:
            np.testing.assert_array_equal(got[key], initial[key], err_msg=f"{key} is frozen")
            continue
        moved = np.abs(expected - initial[key]).max()
        assert moved > 1e-4, f"{key} barely moved in torch ({moved}); the test is too weak"
        error = np.abs(got[key] - expected).max() / np.abs(expected).max()
        assert error <= rtol, f"{key} differs from torch by {error:.2e} (relative)"
