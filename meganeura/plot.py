"""Loss curves as PNG files. Needs matplotlib: `pip install 'meganeura[plot]'`."""

from __future__ import annotations

import os

from meganeura.train import History


def require_matplotlib():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "plotting the loss curve needs matplotlib, which meganeura keeps optional: "
            "pip install 'meganeura[plot]' (or pip install matplotlib)"
        ) from error
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_history(history: History, path: str | os.PathLike, title: str = "") -> None:
    """Write the losses read during training (and the eval accuracy per epoch, if any) to
    a PNG at `path`."""
    plt = require_matplotlib()
    if not history.step_loss:
        raise ValueError("plot_history: the history holds no loss; train first")
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    steps, losses = zip(*history.step_loss, strict=True)
    axis.plot(steps, losses, color="tab:blue", linewidth=1, label="train loss (read)")
    if history.loss:
        axis.plot(
            history.epoch_end, history.loss, "o-", color="navy", label="train loss (epoch mean)"
        )
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_yscale("log" if min(losses) > 0 else "linear")
    handles, labels = axis.get_legend_handles_labels()
    if history.accuracy:
        twin = axis.twinx()
        twin.plot(
            history.epoch_end, history.accuracy, "s--", color="tab:green", label="eval accuracy"
        )
        twin.set_ylabel("accuracy")
        twin.set_ylim(0, 1)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    axis.legend(
        handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, frameon=False
    )
    if title:
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(os.fspath(path), format="png")
    plt.close(figure)
