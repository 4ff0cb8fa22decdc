"""Lazy, shard-aware checkpoint IO: read one tensor at a time, write shards as a stream.

The safetensors format is an 8-byte header length, a JSON header (dtype, shape, byte offsets per
tensor) and the raw little-endian bytes. Knowing every output shape before the first byte is
computed (the plan does), a shard can be written tensor by tensor, so a conversion holds one tensor
in memory, never a shard; unchanged tensors are copied as bytes, without decoding.

Nothing here imports torch until a tensor is decoded or encoded: `convert` copies the unchanged
tensors in a thread while the main thread is still importing torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from attnconv.errors import AttnconvError

if TYPE_CHECKING:
    import torch

# safetensors dtype -> (torch dtype name, bytes per element)
ST_DTYPES = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1), "U8": ("uint8", 1),
    "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
ST_NAMES = {torch_name: st for st, (torch_name, _) in ST_DTYPES.items()}
COPY_CHUNK = 64 << 20  # user-space fallback: bounded memory
WRITEBACK_CHUNK = 64 << 20  # start writing to disk every this many bytes instead of all at fsync
KERNEL_CHUNK = 1 << 30  # copy_file_range: no user memory; fewer, larger calls are faster


def _load_sync_file_range():
    """Linux's sync_file_range(2), which Python does not wrap; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL("libc.so.6", use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


@dataclass(frozen=True)
class TensorMeta:
    """Where a tensor lives: file, dtype, shape and (safetensors) absolute byte range."""

    name: str
    file: Path
    st_dtype: str  # the safetensors name: F32, BF16, ...
    shape: tuple[int, ...]
    start: int = -1
    end: int = -1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_DTYPES[self.st_dtype][1]

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.st_dtype)


def torch_dtype(st_dtype: str) -> torch.dtype:
    import torch

    return getattr(torch, ST_DTYPES[st_dtype][0])


def st_dtype(dtype: torch.dtype | str) -> str:
    """The safetensors name of a torch dtype (or of its name, e.g. 'bfloat16')."""
    name = str(dtype).removeprefix("torch.")
    if name not in ST_NAMES:
        raise AttnconvError(f"tensors of dtype {name} cannot be stored in safetensors by attnconv")
    return ST_NAMES[name]


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
            dtype, shape = info["dtype"], tuple(info["shape"])
            start, end = (base + o for o in info["data_offsets"])
            if dtype not in ST_DTYPES:
                raise KeyError(dtype)
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
        import torch

        try:
            # weights_only: a pickle may only rebuild tensors, never run code; mmap: do not load it all.
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise AttnconvError(f"{path} could not be read as a weights-only torch file ({type(e).__name__}); "
                                "convert it to safetensors first") from None
        self._pickles[path] = state
        return {k: TensorMeta(k, path, st_dtype(t.dtype), tuple(t.shape)) for k, t in state.items()
                if torch.is_tensor(t)}

    def get(self, name: str) -> torch.Tensor:
        """A tensor, refused when it holds NaN or Inf (what is read here is transformed, never copied)."""
        import torch

        from attnconv import finite

        meta = self.tensors[name]
        if self.format != "safetensors":
            return finite.source_tensor(name, self._pickles[meta.file][name], meta.file)
        with open(meta.file, "rb") as f:
            f.seek(meta.start)
            buf = bytearray(f.read(meta.nbytes))
        if len(buf) != meta.nbytes:
            raise _corrupt(meta.file, f"{name} is cut short")
        if not buf:
            return torch.empty(meta.shape, dtype=meta.dtype)
        return finite.source_tensor(name, torch.frombuffer(buf, dtype=meta.dtype).reshape(meta.shape), meta.file)


def header_reserve(entries: list[TensorMeta], renamed: int = 16) -> int:
    """An upper bound on the header of a shard holding converted versions of these source tensors.

    A conversion never grows a shape, lengthens a name by at most `renamed` characters, and at most
    quadruples the bytes (F8 -> F32), which bounds every offset; dtype names are at most 7 characters.
    """
    big = 10 ** len(str(4 * sum(m.nbytes for m in entries))) - 1
    body = sum(len(json.dumps({m.name + "x" * renamed: {"dtype": "F8_E4M3", "shape": list(m.shape),
                                                       "data_offsets": [big, big]}}, separators=(",", ":")))
               for m in entries)
    return body + 64  # + {"__metadata__":{"format":"pt"}} and braces


class ShardWriter:
    """Write one safetensors file as a stream of tensors; the header goes in last, into reserved space.

    The data starts at a fixed offset (8 + header_reserve), so tensors can be written (or copied as
    bytes) before their neighbours are known; `close` writes the header, padded with spaces as the
    format allows, and fsyncs.
    """

    def __init__(self, path: Path, header_reserve: int, metadata: dict[str, str] | None = None):
        self.path, self.reserve = path, header_reserve + (-header_reserve % 8)
        self.metadata = metadata or {"format": "pt"}
        self.entries: list[tuple[str, str, tuple[int, ...], int]] = []  # name, st dtype, shape, bytes
        self.total = 0
        self._f = open(path, "wb", buffering=0)  # unbuffered: copy_file_range below shares the fd
        self._f.seek(8 + self.reserve)
        self._written_back = 8 + self.reserve

    @property
    def names(self) -> list[str]:
        return [e[0] for e in self.entries]

    def _add(self, name: str, dtype: str, shape: tuple[int, ...], nbytes: int) -> None:
        self.entries.append((name, dtype, tuple(shape), nbytes))
        self.total += nbytes
        end = 8 + self.reserve + self.total
        if _sync_file_range is not None and end - self._written_back >= WRITEBACK_CHUNK:
            # Start writing the new bytes to disk now, asynchronously: the disk works while we go on
            # copying, instead of receiving every byte at the final fsync.
            _sync_file_range(self._f.fileno(), self._written_back, end - self._written_back, _SYNC_FILE_RANGE_WRITE)
            self._written_back = end

    def write(self, name: str, tensor: torch.Tensor) -> None:
        t = tensor.detach().contiguous().cpu()
        self._add(name, st_dtype(t.dtype), tuple(t.shape), t.numel() * t.element_size())
        if t.numel():
            view = memoryview(t.view(-1).view(torch_dtype("U8")).numpy())
            while view:  # raw FileIO may write less than asked
                view = view[self._f.write(view):]

    def copy_raw(self, items: list[tuple[str, TensorMeta]]) -> None:
        """Copy tensors' bytes from a safetensors file without decoding them.

        items: consecutive output tensors whose source bytes are contiguous in one file, copied in one go.
        """
        first, last = items[0][1], items[-1][1]
        with open(first.file, "rb", buffering=0) as src:
            offset, left = first.start, last.end - first.start
            while left:
                n = self._copy_range(src, offset, left)
                if not n:
                    raise _corrupt(first.file, f"{items[-1][0]} is cut short")
                offset, left = offset + n, left - n
        for name, meta in items:
            self._add(name, meta.st_dtype, meta.shape, meta.nbytes)

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

    def header(self) -> bytes:
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for name, dtype, shape, nbytes in self.entries:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        if len(blob) > self.reserve:
            raise RuntimeError(f"{self.path.name}: header of {len(blob)} B exceeds the {self.reserve} B reserved")
        return struct.pack("<Q", self.reserve) + blob + b" " * (self.reserve - len(blob))

    def close(self) -> None:
        """Write the header, flush the file to disk and close it."""
        try:
            os.pwrite(self._f.fileno(), self.header(), 0)
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def abort(self) -> None:
        self._f.close()
