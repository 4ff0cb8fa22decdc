"""Content fingerprints of model folders: what provenance records and what a resumed run must match."""

from __future__ import annotations

import hashlib
import mmap
import os
import re
from pathlib import Path

from attnconv.errors import write_cache_file

HASH_WINDOW = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


def sha256_file(path: Path) -> str:
    """sha256 of a file, remembered across runs while the file is provably the same (device, inode, size, mtime and
    ctime, which no user call can set back): converting one source several ways reads it once."""
    path = Path(path)
    named = _hub_blob_sha256(path)
    if named is not None:
        return named
    st = path.stat()
    signature = f"{st.st_dev} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}"
    memo = _memo_path(path)
    try:
        sig, digest = memo.read_text().rsplit(" ", 1)
        if sig == signature and len(digest) == 64:
            return digest
    except (OSError, ValueError):
        pass
    digest = _sha256_uncached(path)
    write_cache_file(memo, f"{signature} {digest}")  # best effort: a failed write only costs a re-hash
    return digest


def _hub_blob_sha256(path: Path) -> str | None:
    """The sha256 a huggingface_hub cache names the file by, without reading it.

    In that cache, <cache>/models--ORG--NAME/snapshots/<revision>/<file> links to ../../blobs/<etag>, and a weight
    file's etag is the sha256 of its content (the LFS object id the hub shows); git files are named by a 40-digit
    sha1 instead, and are hashed. Only that exact layout inside the hub cache folder is trusted: any other link to
    a 64-hex name (a local folder made to look like it) is hashed.
    """
    if not path.is_symlink():
        return None
    path = Path(os.path.abspath(path))
    snapshot = next((p for p in path.parents if p.parent.name == "snapshots"), None)
    if snapshot is None:
        return None
    repo = snapshot.parent.parent
    if not repo.name.startswith("models--") or repo.parent.resolve() != _hub_cache().resolve():
        return None
    blob = path.resolve()
    if blob.parent != repo.resolve() / "blobs" or not re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return None
    return blob.name


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _memo_path(path: Path) -> Path:
    from attnconv.errors import cache_root

    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
    return cache_root() / "sha256" / key


def _sha256_uncached(path: Path) -> str:
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
