"""The IDX (MNIST) reader, MNIST loading, and a loader that never waits for the device."""

import gzip
import struct

import numpy as np
import pytest

from meganeura import optim
from meganeura.backends.numpy.executor import NumpyProgram
from meganeura.backends.webgpu.runtime import WebGPUProgram
from meganeura.data import DataLoader, load_digits, load_mnist, read_idx
from tests.test_optim import DEVICES, mlp_session

IDX_CODES = {
    "uint8": 0x08,
    "int8": 0x09,
    "int16": 0x0B,
    "int32": 0x0C,
    "float32": 0x0D,
    "float64": 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, IDX_CODES[array.dtype.name], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array: np.ndarray, compress: bool = False):
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.mark.parametrize("dtype", sorted(IDX_CODES))
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (1, 1)])
def test_read_idx_round_trip(tmp_path, dtype, compress, shape):
    rng = np.random.default_rng(0)
    array = (rng.normal(size=shape) * 50).astype(dtype)
    path = write_idx(tmp_path / "a.idx", array, compress)
    got = read_idx(path)
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an IDX file"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01x", "not an IDX file"),
        (b"\x01\x02\x08\x01", "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated IDX header"),
        (idx_bytes(np.zeros((4, 3), np.uint8))[:-1], r"says \[4, 3\] of uint8 \(12 bytes\)"),
        (idx_bytes(np.zeros((4,), np.int32)) + b"\x00", "holds 17 bytes of data"),
        (gzip.compress(idx_bytes(np.zeros(4, np.uint8)))[:-6], "damaged gzip data"),
    ],
    ids=["empty", "bad_type", "bad_magic", "short_header", "short_data", "long_data", "gzip"],
)
def test_read_idx_errors_name_the_file(tmp_path, data, message):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as caught:
        read_idx(path)
    assert str(path) in str(caught.value)


def write_mnist(directory, train: int = 60, test: int = 20, compress=False, rows=6, cols=5):
    """A tiny MNIST-layout dataset: class k lights pixel k (plus noise)."""
    rng = np.random.default_rng(0)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = rng.integers(0, 60, (count, rows, cols)).astype(np.uint8)
        images.reshape(count, -1)[np.arange(count), labels] = 255
        suffix = ".gz" if compress else ""
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return directory


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist(tmp_path, compress):
    train, test = load_mnist(write_mnist(tmp_path, compress=compress))
    assert train["x"].shape == (60, 30) and test["x"].shape == (20, 30)
    assert train["x"].dtype == np.float32 and train["y"].dtype == np.int32
    assert train["x"].max() == 1.0 and train["x"].min() >= 0.0
    np.testing.assert_array_equal(train["x"][np.arange(60), train["y"]], 1.0)
    images, _ = load_mnist(tmp_path, flatten=False)
    assert images["x"].shape == (60, 1, 6, 5)


def test_load_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no train-images-idx3-ubyte .*t10k-labels"):
        load_mnist(tmp_path)
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match=r"holds 20 images but .*t10k-labels-idx1-ubyte 19 labels"):
        load_mnist(tmp_path)


def test_load_digits_as_images():
    flat, _ = load_digits()
    images, _ = load_digits(flatten=False)
    assert images["x"].shape == (1438, 1, 8, 8)
    np.testing.assert_array_equal(images["x"].reshape(1438, 64), flat["x"])


def test_loader_epoch_can_be_replayed():
    loader = DataLoader({"y": np.arange(20)}, batch_size=5, seed=3)
    orders = [np.concatenate([b["y"] for b in loader]) for _ in range(3)]
    loader.epoch = 1
    np.testing.assert_array_equal(np.concatenate([b["y"] for b in loader]), orders[1])


@pytest.mark.parametrize("device", DEVICES)
def test_training_steps_never_wait_for_the_device(device, monkeypatch):
    """Steps fed from a DataLoader queue their uploads and kernels; only reading waits."""
    session = mlp_session(optim.Adam(lr=1e-2), device)
    waits = []

    def counting(cls, name):
        original = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            waits.append(name)
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    executor = session.executor
    counting(type(executor), "get_value")
    counting(NumpyProgram, "read")
    counting(WebGPUProgram, "read")
    if device != "cpu":
        queue, buffer = executor.device.queue, executor.buffer(16)
        for cls, name in (
            (type(queue), "read_buffer"),
            (type(queue), "on_submitted_work_done_sync"),
            (type(buffer), "map_async"),
            (type(buffer), "map_sync"),
        ):
            counting(cls, name)
    rng = np.random.default_rng(0)
    data = {"x": rng.normal(size=(60, 8)).astype(np.float32), "y": rng.integers(0, 4, 60)}
    for batch in DataLoader(data, 6, drop_last=True):
        session.step(batch)
    assert session.step_count == 10 and waits == []
    assert np.isfinite(session.loss)  # reading is what waits
    assert waits[0] == "read"
