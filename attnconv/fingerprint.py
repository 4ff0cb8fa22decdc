"""Content fingerprints of model folders: what provenance records and what a resumed run must match."""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

HASH_WINDOW = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


def sha256_file(path: Path) -> str:
    """sha256 of a file, read through the page cache in mapped windows: read() would copy every byte once more,
    and one whole-file mapping would count the file in the process's resident memory."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        for start in range(0, size, HASH_WINDOW):
            with mmap.mmap(fh.fileno(), min(HASH_WINDOW, size - start), access=mmap.ACCESS_READ,
                           offset=start) as window:
                h.update(window)  # hashlib releases the GIL: this runs beside other work
    return h.hexdigest()


def sha256_files(files: list[Path], into: dict[str, str]) -> None:
    """{file name: sha256} for each file, into `into` (so a thread can fill it)."""
    for f in files:
        into[f.name] = sha256_file(f)


def folder_fingerprint(files: list[Path]) -> str:
    """One sha256 over the named files' contents (weights and config of a model folder)."""
    hashes: dict[str, str] = {}
    sha256_files(sorted(files), hashes)
    return hashlib.sha256("".join(f"{k}:{v};" for k, v in sorted(hashes.items())).encode()).hexdigest()
