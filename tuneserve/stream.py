"""Tensor-at-a-time safetensors reading and writing, for the memory-bounded merge.

The safetensors library writes a file from a dict holding every tensor of it (and serializes it into one
buffer first), and `safe_open` maps the whole file: a 5 GB shard would be in memory two or three times
over. The format is simple (8-byte little-endian header length, a JSON header of dtype/shape/byte
offsets, then the raw little-endian bytes), so these helpers read one tensor's bytes with a plain file
read and write a file whose header is known in advance, one tensor at a time. Peak memory is then about
the largest tensor being merged, whatever the shard size. Files are checked against the library in
tests/test_merge.py.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
CODES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # offsets within the data section
    end: int


def read_header(path: Path) -> tuple[list[Entry], dict[str, str], int]:
    """(entries in file order, metadata, byte offset of the data section)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", {}) or {}
    entries = [Entry(k, v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()]
    return sorted(entries, key=lambda e: e.start), metadata, 8 + n


CHUNK = 16 * 2**20  # bytes per read/write when a tensor is copied unchanged


class Stored:
    """One tensor of an open file, not read yet: loaded whole when it has to change, else copied as bytes."""

    def __init__(self, f: BinaryIO, offset: int, entry: Entry):
        self.f, self.offset, self.entry = f, offset, entry

    def load(self):
        import torch

        e = self.entry
        self.f.seek(self.offset)
        buf = bytearray(e.end - e.start)
        self.f.readinto(buf)
        dtype = getattr(torch, DTYPES[e.dtype])
        t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
        return t.reshape(e.shape)


def iter_stored(path: Path) -> Iterator[tuple[Entry, Stored]]:
    """Yield (entry, stored tensor) in file order; each is valid until the next one is yielded."""
    entries, _, data_start = read_header(path)
    with path.open("rb") as f:
        for e in entries:
            yield e, Stored(f, data_start + e.start, e)


def iter_tensors(path: Path) -> Iterator[tuple[Entry, Any]]:
    """Yield (entry, tensor) one at a time, each read into its own buffer."""
    for e, stored in iter_stored(path):
        yield e, stored.load()


class Writer:
    """Write a safetensors file whose tensors' names, dtypes and shapes are known up front."""

    def __init__(self, path: Path, layout: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]):
        import math

        import torch

        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self.expected: list[tuple[str, str, tuple[int, ...], int]] = []
        for name, code, shape in layout:
            size = math.prod(shape) * torch.empty(0, dtype=getattr(torch, DTYPES[code])).element_size()
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.expected.append((name, code, tuple(shape), size))
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the library writes it
        self.f: BinaryIO = path.open("wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.i = 0

    def write(self, name: str, tensor) -> None:
        import torch

        exp_name, code, shape, size = self.expected[self.i]
        if name != exp_name or CODES[str(tensor.dtype).removeprefix("torch.")] != code or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name} {tensor.dtype} {tuple(tensor.shape)} does not match the header entry "
                f"{exp_name} {code} {shape}"
            )
        flat = tensor.contiguous().reshape(-1)
        if flat.numel():
            self.f.write(memoryview(flat.view(torch.uint8).numpy()))
        self.i += 1

    def copy(self, name: str, stored: Stored) -> None:
        """Write a tensor unchanged from its source file, CHUNK bytes at a time: never held whole in memory."""
        exp_name, code, shape, size = self.expected[self.i]
        e = stored.entry
        if name != exp_name or e.dtype != code or e.shape != shape:
            raise ValueError(
                f"tensor {name} {e.dtype} {e.shape} does not match the header entry {exp_name} {code} {shape}"
            )
        stored.f.seek(stored.offset)
        left = size
        while left:
            chunk = stored.f.read(min(CHUNK, left))
            if not chunk:
                raise ValueError(f"{name}: the source file ends {left} bytes early")
            self.f.write(chunk)
            left -= len(chunk)
        self.i += 1

    def close(self) -> None:
        if self.i != len(self.expected):
            raise ValueError(f"{len(self.expected) - self.i} tensors were never written")
        self.f.flush()
        self.f.close()
