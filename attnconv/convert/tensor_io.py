"""Lazy, shard-aware checkpoint IO: read one tensor at a time, write shards as a stream.

The safetensors format is an 8-byte header length, a JSON header (dtype, shape, byte offsets per
tensor) and the raw little-endian bytes. Knowing every output shape before the first byte is
computed (the plan does), a shard can be written tensor by tensor, so a conversion holds one tensor
in memory, never a shard; unchanged tensors are copied as bytes, without decoding.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from attnconv.errors import AttnconvError

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
COPY_CHUNK = 64 << 20  # user-space fallback: bounded memory
KERNEL_CHUNK = 1 << 30  # copy_file_range: no user memory; fewer, larger calls are faster


@dataclass(frozen=True)
class TensorMeta:
    """Where a tensor lives: file, dtype, shape and (safetensors) absolute byte range."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int = -1
    end: int = -1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _corrupt(path: Path, why: str) -> AttnconvError:
    return AttnconvError(f"{path} is truncated or corrupted ({why}); download or copy that file again")


def read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """Parse and check a shard's header against its size; never reads the tensor bytes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _corrupt(path, "shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise _corrupt(path, "header length beyond the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _corrupt(path, "unreadable header") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "header is not a JSON object")
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = ST_DTYPES[info["dtype"]], tuple(info["shape"])
            start, end = (base + o for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"bad entry for {name}") from None
        meta = TensorMeta(name, path, dtype, shape, start, end)
        if end - start != meta.nbytes or end > size:
            raise _corrupt(path, f"{name} extends beyond the end of the file" if end > size else f"bad size of {name}")
        out[name] = meta
    return out


class CheckpointReader:
    """Every tensor of a checkpoint folder, by name, read lazily (safetensors) or from a mmapped pickle."""

    def __init__(self, files: list[Path], fmt: str):
        self.format = fmt
        self.tensors: dict[str, TensorMeta] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        for path in files:
            metas = read_safetensors_header(path) if fmt == "safetensors" else self._pickle_metas(path)
            for name, meta in metas.items():
                if name in self.tensors:
                    raise AttnconvError(f"tensor {name} appears in two files ({self.tensors[name].file.name}, "
                                        f"{path.name}); the checkpoint is inconsistent")
                self.tensors[name] = meta

    def _pickle_metas(self, path: Path) -> dict[str, TensorMeta]:
        try:
            # weights_only: a pickle may only rebuild tensors, never run code; mmap: do not load it all.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise AttnconvError(f"{path} could not be read as a weights-only torch file ({type(e).__name__}); "
                                "convert it to safetensors first") from None
        self._pickles[path] = state
        return {k: TensorMeta(k, path, t.dtype, tuple(t.shape)) for k, t in state.items() if torch.is_tensor(t)}

    def get(self, name: str) -> torch.Tensor:
        meta = self.tensors[name]
        if self.format != "safetensors":
            return self._pickles[meta.file][name]
        with open(meta.file, "rb") as f:
            f.seek(meta.start)
            buf = bytearray(f.read(meta.nbytes))
        if len(buf) != meta.nbytes:
            raise _corrupt(meta.file, f"{name} is cut short")
        if not buf:
            return torch.empty(meta.shape, dtype=meta.dtype)
        return torch.frombuffer(buf, dtype=meta.dtype).reshape(meta.shape)


class ShardWriter:
    """Write one safetensors file tensor by tensor, in the order of `entries` [(name, dtype, shape)]."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        self._expected: list[tuple[str, int]] = []
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._expected.append((name, nbytes))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment with spaces
        self.path, self.total = path, offset
        self._f = open(path, "wb", buffering=0)  # unbuffered: copy_file_range below shares the fd
        self._f.write(struct.pack("<Q", len(blob)) + blob)
        self._next = 0

    def _check(self, name: str, nbytes: int) -> None:
        want_name, want = self._expected[self._next]
        if name != want_name or nbytes != want:
            raise RuntimeError(f"shard writer got {name} ({nbytes} B), expected {want_name} ({want} B)")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        self._check(name, t.numel() * t.element_size())
        if t.numel():
            view = memoryview(t.view(-1).view(torch.uint8).numpy())
            while view:  # raw FileIO may write less than asked
                view = view[self._f.write(view):]

    def copy_raw(self, items: list[tuple[str, TensorMeta]]) -> None:
        """Copy tensors' bytes from a safetensors file without decoding them.

        items: consecutive output tensors whose source bytes are contiguous in one file, copied in one go.
        """
        for name, meta in items:
            self._check(name, meta.nbytes)
        first, last = items[0][1], items[-1][1]
        with open(first.file, "rb", buffering=0) as src:
            offset, left = first.start, last.end - first.start
            while left:
                n = self._copy_range(src, offset, left)
                if not n:
                    raise _corrupt(first.file, f"{items[-1][0]} is cut short")
                offset, left = offset + n, left - n

    def _copy_range(self, src, offset: int, count: int) -> int:
        """Copy in the kernel (as cp does) where the platform allows, else through a bounded buffer."""
        if hasattr(os, "copy_file_range"):
            try:
                return os.copy_file_range(src.fileno(), self._f.fileno(), min(count, KERNEL_CHUNK), offset)
            except OSError:
                pass  # e.g. across file systems on old kernels
        src.seek(offset)
        chunk = memoryview(src.read(min(count, COPY_CHUNK)))
        n = len(chunk)
        while chunk:
            chunk = chunk[self._f.write(chunk):]
        return n

    def close(self) -> None:
        if self._next != len(self._expected):
            raise RuntimeError(f"{self.path.name}: {len(self._expected) - self._next} tensors were never written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
