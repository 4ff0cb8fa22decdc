"""Output folders that appear only when complete: write to a hidden sibling, rename at the end."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attnconv.errors import AttnconvError

_TMP_TAG = ".attnconv-tmp-"


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) when OUT exists and may not be replaced."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not overwrite:
        raise AttnconvError(f"{out} already exists; pass --overwrite to replace it or choose another folder")
    if out.exists() and not out.is_dir():
        raise AttnconvError(f"{out} exists and is not a folder; remove it or choose another output path")
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_tmp(out: Path) -> None:
    """Remove temporary siblings of OUT left by runs that were killed (their process is gone)."""
    prefix = f".{out.name}{_TMP_TAG}"
    if not out.parent.exists():
        return
    for p in out.parent.iterdir():
        if p.name.startswith(prefix):
            try:
                pid = int(p.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """Flush every file under ROOT, and its folders, to disk: a rename that publishes them must not be
    able to survive a power cut that their contents did not."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside OUT; on success it replaces OUT in one rename.

    On any error (or Ctrl-C) the temporary folder is removed and OUT is left as it was.
    A SIGKILL leaves only a hidden `.OUT.attnconv-tmp-PID-*` sibling, cleaned by the next run.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)
    tmp = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}{_TMP_TAG}{os.getpid()}-old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)
        fsync_dir(out.parent)
