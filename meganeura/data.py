"""Batches for training: a DataLoader over named arrays, an IDX (MNIST) reader, and the
small digits dataset that scikit-learn bundles."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Iterator, Mapping

import numpy as np


class DataLoader:
    """Batches of `arrays` (all sharing their first dim) as dicts, e.g. {"x": ..., "y": ...}.

    With `shuffle`, each epoch (each `iter()`) visits the samples in a new order drawn from
    `seed` and the epoch number, so two loaders with the same seed give the same batches
    (set `epoch` to replay an epoch's order, as resuming does).

    A batch is made on the host while the device runs the previous step: `Session.step`
    returns without waiting and the upload is queued behind it, so nothing here waits for
    the device.
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
    test_fraction: float = 0.2, seed: int = 0, flatten: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as (train, test).

    Each split is {"x": float32 [N, 64] in [0, 1] ([N, 1, 8, 8] images with
    `flatten=False`), "y": int32 [N]}. The split is stratified (each class keeps its
    proportion) and fixed by `seed`. Needs scikit-learn.
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
    if not flatten:
        x = x.reshape(-1, 1, 8, 8)
    return {"x": x[~test], "y": y[~test]}, {"x": x[test], "y": y[test]}


# IDX type codes (the third byte of the magic number) and their big-endian NumPy dtypes.
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array in an IDX file (the format of MNIST), plain or gzip-compressed.

    Compression is recognised by content, not by the file name. A file that is not IDX,
    or is shorter or longer than its header says, raises ValueError naming it.
    """
    path = os.fspath(path)
    with open(path, "rb") as file:
        data = file.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(f"{path}: damaged gzip data: {error}") from error
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in IDX_TYPES:
        raise ValueError(
            f"{path}: not an IDX file (its first bytes are {data[:4].hex() or 'missing'}; "
            "IDX starts with 00 00, a type code and the number of dims)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dims need {header} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_TYPES[data[2]])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX header says {list(shape)} of {dtype.name} ({expected} bytes), "
            f"but the file holds {len(data) - header} bytes of data"
        )
    array = np.frombuffer(data, dtype, count=math.prod(shape), offset=header)
    return array.reshape(shape).astype(dtype.newbyteorder("="))


MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find(directory: str, stem: str) -> str:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(
        f"MNIST: {directory} has no {stem} (or {stem}.gz); it needs the four IDX files "
        f"{', '.join(f for pair in MNIST_FILES.values() for f in pair)}"
    )


def load_mnist(
    directory: str | os.PathLike, flatten: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """MNIST (or any dataset in its layout) from the IDX files in `directory`, as
    (train, test): {"x": float32 [N, rows * cols] in [0, 1] ([N, 1, rows, cols] with
    `flatten=False`), "y": int32 [N]}. The files may be gzip-compressed."""
    directory = os.fspath(directory)
    splits = []
    for images_stem, labels_stem in MNIST_FILES.values():
        images_path, labels_path = _find(directory, images_stem), _find(directory, labels_stem)
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1:
            raise ValueError(
                f"MNIST: {images_path} must hold [N, rows, cols] images and {labels_path} "
                f"[N] labels, got {list(images.shape)} and {list(labels.shape)}"
            )
        if len(images) != len(labels):
            raise ValueError(
                f"MNIST: {images_path} holds {len(images)} images but {labels_path} "
                f"{len(labels)} labels"
            )
        x = images.astype(np.float32) / (255.0 if images.dtype == np.uint8 else 1.0)
        x = x.reshape(len(x), -1) if flatten else x[:, None]
        splits.append({"x": x, "y": labels.astype(np.int32)})
    return splits[0], splits[1]
