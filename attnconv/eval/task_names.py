"""The names of lm-evaluation-harness's own tasks, groups and tags, kept on disk between runs.

Building the harness's index reads every task YAML it ships (~14k files, 15 s on a quiet core), yet checking a
--tasks name before any model loads (and suggesting close names for a typo) needs only the names. They are kept
in $ATTNCONV_CACHE/lm-eval-tasks/, one file per installed harness (named by its task folder's path), together
with what they were read from: the harness version and the task folder's identity (inode and modification time
of it and of its subfolders, which a reinstall changes, as does a task file added or removed in a subfolder; a
file edited in place in an editable install is not seen: delete the cache file). A file that does not match, or
cannot be read, is rebuilt; it is written whole under a temporary name and renamed, and concurrent processes wait
for the one that builds it instead of building it too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from pathlib import Path

from attnconv.errors import cache_root, write_cache_file

FORMAT = 1  # bump when the file's layout changes: older files are then stale


def cache_folder() -> Path:
    return cache_root() / "lm-eval-tasks"


def harness_identity() -> dict:
    """What the names depend on: the harness version and its task folder's identity (cheap: ~200 stat calls, and
    lm_eval.tasks, which imports datasets, is not imported)."""
    import importlib.util

    import lm_eval

    folder = Path(importlib.util.find_spec("lm_eval.tasks").submodule_search_locations[0]).resolve()
    st = folder.stat()
    subfolders = sorted((e.name, e.stat().st_ino, e.stat().st_mtime_ns) for e in os.scandir(folder) if e.is_dir())
    return {"format": FORMAT, "lm_eval": lm_eval.__version__, "folder": str(folder), "inode": st.st_ino,
            "mtime_ns": st.st_mtime_ns, "subfolders": hashlib.sha256(repr(subfolders).encode()).hexdigest()}


def cache_file(identity: dict) -> Path:
    return cache_folder() / f"{hashlib.sha256(identity['folder'].encode()).hexdigest()[:16]}.json"


def _read(path: Path, identity: dict) -> frozenset[str] | None:
    """The names PATH holds if it was written for IDENTITY; None when missing, stale or damaged."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = data["names"]
        if data["identity"] == identity and isinstance(names, list) and all(isinstance(n, str) for n in names):
            return frozenset(names)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


@contextmanager
def _building(path: Path):
    """Hold PATH's build lock: a second process waits here, then finds the file written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(f"{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield  # no cache folder to lock in: build without one
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def harness_task_names(build: Callable[[], Iterable[str]]) -> frozenset[str]:
    """The harness's own task, group and tag names: from the cache when it matches the installed harness, else
    from BUILD (which builds the index), written to the cache for the next run."""
    identity = harness_identity()
    path = cache_file(identity)
    names = _read(path, identity)
    if names is not None:
        return names
    with _building(path):
        names = _read(path, identity)  # another process may have built it while this one waited
        if names is None:
            names = frozenset(build())
            write_cache_file(path, json.dumps({"identity": identity, "names": sorted(names)}))
    return names
