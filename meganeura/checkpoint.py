"""Checkpoint files: named tensors and JSON training state in one safetensors file.

Writing is atomic: the file is written under a temporary name in the same directory,
flushed to disk (fsync) and renamed over the target, so a crash mid-save leaves the previous
checkpoint as it was. The metadata holds a SHA-256 digest of the tensors, so a file damaged
after it was written is refused instead of silently loading wrong weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import safetensors.numpy

FORMAT = "meganeura-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is damaged, or does not fit the graph."""


def _digest(tensors: Mapping[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        sha.update(f"{name}:{array.dtype.str}:{list(array.shape)};".encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], state: Mapping) -> None:
    """Write `tensors` and the JSON-able `state` to `path`, atomically."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    arrays = {name: np.ascontiguousarray(value) for name, value in tensors.items()}
    metadata = {"format": FORMAT, "sha256": _digest(arrays), "state": json.dumps(state)}
    data = safetensors.numpy.save(arrays, metadata=metadata)
    fd, temporary = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    # The rename is durable only once the directory entry is on disk too.
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def _header_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise ValueError(f"the file has {len(data)} bytes, less than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length > len(data):
        raise ValueError(f"the header claims {length} bytes but the file has {len(data) - 8}")
    header = json.loads(data[8 : 8 + length])
    return header.get("__metadata__") or {}


def load(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The tensors and state saved by `save`; CheckpointError names the file if it is bad."""
    path = os.fspath(path)
    with open(path, "rb") as file:
        data = file.read()
    try:
        metadata = _header_metadata(data)
        tensors = safetensors.numpy.load(data)
    except Exception as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read (truncated or corrupt?): {error}"
        ) from error
    if metadata.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} is not a meganeura checkpoint (format "
            f"{metadata.get('format')!r}, expected {FORMAT!r})"
        )
    if _digest(tensors) != metadata.get("sha256"):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its tensors do not match the digest saved with them"
        )
    try:
        state = json.loads(metadata["state"])
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} has no readable state: {error}") from error
    return tensors, state
