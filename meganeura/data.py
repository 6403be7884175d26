"""Batches for training: a DataLoader over named arrays, and small bundled datasets."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np


class DataLoader:
    """Batches of `arrays` (all sharing their first dim) as dicts, e.g. {"x": ..., "y": ...}.

    With `shuffle`, each epoch (each `iter()`) visits the samples in a new order drawn from
    `seed` and the epoch number, so two loaders with the same seed give the same batches.
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ):
        if not arrays:
            raise ValueError("DataLoader: no arrays given")
        self.arrays = {name: np.asarray(array) for name, array in arrays.items()}
        lengths = {name: len(array) if array.ndim else 0 for name, array in self.arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"DataLoader: arrays must share their first dim, got lengths {lengths}"
            )
        self.num_samples = next(iter(lengths.values()))
        if self.num_samples == 0:
            raise ValueError("DataLoader: the arrays hold no samples")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"DataLoader: batch_size must be a positive int, got {batch_size!r}")
        if drop_last and batch_size > self.num_samples:
            raise ValueError(
                f"DataLoader: batch_size {batch_size} with drop_last leaves no batch "
                f"of {self.num_samples} samples"
            )
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        full, rest = divmod(self.num_samples, self.batch_size)
        return full if self.drop_last or not rest else full + 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        self.epoch += 1
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield {name: array[index] for name, array in self.arrays.items()}


def load_digits(
    test_fraction: float = 0.2, seed: int = 0
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as (train, test).

    Each split is {"x": float32 [N, 64] in [0, 1], "y": int32 [N]}. The split is stratified
    (each class keeps its proportion) and fixed by `seed`. Needs scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError(
            "load_digits needs scikit-learn, which meganeura uses only for this bundled "
            "dataset: pip install scikit-learn"
        ) from error
    if not 0 < test_fraction < 1:
        raise ValueError(f"load_digits: test_fraction must be in (0, 1), got {test_fraction!r}")
    digits = sklearn_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test[members[: round(test_fraction * len(members))]] = True
    return {"x": x[~test], "y": y[~test]}, {"x": x[test], "y": y[test]}
