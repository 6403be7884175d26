"""Safetensors files: read (single files and sharded indexes) and write (atomically).

The format is an 8-byte little-endian header length, a JSON header naming each tensor's dtype,
shape and byte range, then the data. It is parsed here rather than through the `safetensors`
package because NumPy has no bfloat16, which that package's NumPy reader refuses; BF16 widens to
f32 exactly (its bits are the top half of an f32). Every float tensor is returned as f32.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# Dtypes we read, as NumPy dtypes of their stored bits (BF16 is widened after reading).
_STORED = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER = 100 << 20  # the format's own limit on the JSON header


class WeightFileError(ValueError):
    """A weight file that is missing, corrupt or holds something we cannot read."""


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def read_header(path: str | Path) -> tuple[dict, int]:
    """(tensor entries by name, byte offset of the data section) of a safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"{path}: no such safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WeightFileError(f"{path}: not a safetensors file (only {size} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(MAX_HEADER, size - 8):
            raise WeightFileError(
                f"{path}: corrupt safetensors file: header length {length} does not fit in a "
                f"{size}-byte file"
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise WeightFileError(f"{path}: corrupt safetensors header: {error}") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path}: corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + length
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightFileError(f"{path}: corrupt safetensors entry {name!r}: {entry}") from None
        if dtype not in _STORED:
            raise WeightFileError(
                f"{path}: tensor {name!r} has dtype {dtype}; supported: {', '.join(_STORED)}"
            )
        count = int(np.prod(shape, dtype=np.int64))
        if end - begin != count * _STORED[dtype].itemsize or not 0 <= begin <= end:
            raise WeightFileError(
                f"{path}: corrupt safetensors entry for {name!r}: {dtype}{shape} needs "
                f"{count * _STORED[dtype].itemsize} bytes, the header gives [{begin}, {end})"
            )
        if data_start + end > size:
            raise WeightFileError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                f"{data_start + end}, the file has {size}"
            )
    return header, data_start


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one file by name; floats as f32, integers as stored."""
    path = Path(path)
    header, data_start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        stored = _STORED[entry["dtype"]]
        raw = data[data_start + begin : data_start + end].view(stored).reshape(entry["shape"])
        if entry["dtype"] == "BF16":
            out[name] = bf16_to_f32(raw)
        elif entry["dtype"] in FLOAT_DTYPES:
            out[name] = raw.astype(np.float32)
        else:
            out[name] = np.array(raw)
    return out


INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def load_checkpoint(directory: str | Path) -> dict[str, np.ndarray]:
    """The weights of a Hugging Face model directory: `model.safetensors`, or the shards its
    `model.safetensors.index.json` lists."""
    directory = Path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise WeightFileError(f"{index}: corrupt shard index ({error!r})") from None
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            tensors = load_safetensors(directory / shard)
            for name, value in tensors.items():
                if weight_map.get(name) == shard:
                    out[name] = value
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise WeightFileError(
                f"{index}: tensor {missing[0]!r} is listed in shard {weight_map[missing[0]]} "
                f"but that file does not hold it"
            )
        return out
    single = directory / SINGLE_NAME
    if single.is_file():
        return load_safetensors(single)
    found = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(found) == 1:
        return load_safetensors(directory / found[0])
    raise WeightFileError(
        f"{directory}: no weights found; expected {SINGLE_NAME} or {INDEX_NAME} "
        f"(safetensors files there: {found or 'none'})"
    )


_DTYPE_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.int32): "I32"}


def save_safetensors(
    path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` to `path` atomically: a temporary file in the same directory is written,
    flushed to disk and renamed over `path`, so a crash never leaves a half-written file."""
    path = Path(path)
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        if array.dtype not in _DTYPE_NAMES:
            raise ValueError(
                f"save_safetensors: tensor {name!r} is {array.dtype}; "
                f"supported: {', '.join(str(d) for d in _DTYPE_NAMES)}"
            )
        header[name] = {
            "dtype": _DTYPE_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data aligned to 8 bytes, as the reference writer does
    atomic_write(path, [struct.pack("<Q", len(blob)), blob, *arrays])


def atomic_write(path: Path, chunks) -> None:
    """Write `chunks` (bytes or arrays) to `path` through a synced temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk.tobytes() if isinstance(chunk, np.ndarray) else chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
