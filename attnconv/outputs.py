"""Output folders that appear only when complete, never overwrite an input, and have one writer at a time.

A command writes into a hidden temporary sibling of OUT and renames it into place at the end. With
`--overwrite` the new folder and the old OUT are swapped in one step (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere
two renames, the old folder kept under a hidden name the next run restores), so a kill at any moment leaves the
old or the new output, never neither. Without `--overwrite` the rename never replaces anything another program put
at OUT meanwhile (`renameat2(RENAME_NOREPLACE)`): the finished work is then kept under a printed, visible name. A
lock file beside OUT makes a second writer fail at once, naming the first. Hidden siblings of killed runs are
cleaned (or restored) by the next run for the same OUT. OUT may not be empty, the current folder or one above it,
the home folder, a link, or another command's working folder.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import sys
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from attnconv.errors import AttnconvError

NAME_MAX = 255
_TAG = ".attnconv-"
RUN_SUFFIX = ".uptrain-run"  # uptrain's working folder beside its OUT (attnconv.uptrain.api.run_dir_for)
_HELD: dict[Path, int] = {}  # locks this process holds, by OUT, with their file descriptors


def _stem(out: Path) -> str:
    """OUT's name, shortened (with a hash) so that every hidden sibling's name fits the file system's limit."""
    name = out.name
    if len(f".{name}{_TAG}old-4194304-12345678".encode()) <= NAME_MAX:
        return name
    return name.encode()[:180].decode(errors="ignore") + "~" + hashlib.sha256(name.encode()).hexdigest()[:12]


def sibling(out: Path, kind: str) -> Path:
    """A hidden sibling of OUT for this process: kind 'tmp' (being written) or 'old' (replaced, being removed)."""
    return out.parent / f".{_stem(out)}{_TAG}{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def refuse_unsafe_output(out: str | Path) -> Path:
    """OUT as an absolute path, refused when it is empty (an unset variable in a script), the current folder or one
    above it, the home folder, the root, or another command's working folder: replacing those loses what they hold
    (and `.` is what an empty string means to Path)."""
    if not str(out).strip():
        raise AttnconvError("the output path is empty (an unset variable?); give the output folder's path")
    path = Path(out).expanduser().absolute()
    folded = Path(os.path.abspath(path))
    cwd = Path.cwd()
    if folded == cwd or folded in cwd.parents or folded in (Path.home(), Path(folded.anchor)):
        what = "the current folder" if folded == cwd else "the home folder" if folded == Path.home() \
            else "a folder above the current one"
        raise AttnconvError(f"the output {out} is {what}; outputs are replaced whole: name a new folder inside it")
    for part in folded.parts:
        if part.endswith(RUN_SUFFIX) or (part.startswith(".") and _TAG in part):
            raise AttnconvError(f"the output {out} is inside {part}, another attnconv command's working folder; "
                                "choose another output folder")
    return path


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Fail early (before any work) when OUT cannot or may not be written."""
    out = refuse_unsafe_output(out)
    if len(out.name.encode()) > NAME_MAX:
        raise AttnconvError(f"the output name {out.name[:40]}... is longer than {NAME_MAX} bytes; choose a shorter one")
    if out.is_symlink():
        target = os.readlink(out)
        raise AttnconvError(f"{out} is a symbolic link (to {target}); give the real folder's path or remove the link")
    if out.exists() and not overwrite:
        raise AttnconvError(f"{out} already exists; pass --overwrite to replace it or choose another folder")
    if out.exists() and not out.is_dir():
        raise AttnconvError(f"{out} exists and is not a folder; remove it or choose another output path")
    return out


def protect_inputs(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Refuse an OUT that equals, contains or lies inside an input (with or without --overwrite)."""
    target = Path(out).expanduser().absolute().resolve()
    for spec in inputs:
        if spec is None:
            continue
        path = Path(str(spec).split("::")[0]).expanduser()
        if not path.exists():
            continue  # a hub id or dataset name: nothing on disk to protect
        src = path.resolve()
        if target == src or src in target.parents or target in src.parents:
            raise AttnconvError(f"{out} overlaps the input {spec}; inputs are never modified: choose another "
                                "output folder")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[str]:
    """Remove the temporary siblings of OUT left by killed runs; restore a replaced OUT a kill left hidden.
    Returns notes on what was restored."""
    prefix, notes = f".{_stem(out)}{_TAG}", []
    if not out.parent.is_dir():
        return notes
    for p in sorted(out.parent.iterdir()):
        if not p.name.startswith(prefix) or p.name.endswith("lock"):
            continue
        kind, _, rest = p.name[len(prefix):].partition("-")
        try:
            pid = int(rest.split("-")[0])
        except ValueError:
            continue
        if pid_alive(pid) and pid != os.getpid():
            continue
        if kind == "old" and not out.exists():
            os.rename(p, out)  # a kill between the two renames of --overwrite: the previous output comes back
            notes.append(f"restored {out} from an interrupted replacement")
        else:
            shutil.rmtree(p, ignore_errors=True)
    return notes


@contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold OUT's lock file (`.OUT.attnconv-lock`) for this block; a second writer fails at once, naming the
    first. Re-entrant within a process."""
    out = Path(out).expanduser().absolute()
    if out in _HELD:
        yield
        return
    created = [p for p in [out.parent, *out.parent.parents] if not os.path.lexists(p)]
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{_stem(out)}{_TAG}lock"
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AttnconvError(f"{out} is being written by {holder}; wait for it to finish or choose another "
                                "output folder") from None
        if os.path.exists(lock) and os.fstat(fd).st_ino == os.stat(lock).st_ino:
            break  # the file we locked is still the lock (not one a finishing writer just removed)
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"attnconv (pid {os.getpid()}: {' '.join(sys.argv[:3])})".encode(), 0)
    _HELD[out] = fd
    try:
        yield
    finally:
        del _HELD[out]
        os.unlink(lock)
        os.close(fd)
        if not os.path.lexists(out):
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed command created for its output, deepest first, while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


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


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def _renameat2(a: Path, b: Path, flag: int) -> bool:
    """Linux renameat2 with FLAG; False where the system or file system cannot (OSError for a real refusal)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    return _renameat2(a, b, RENAME_EXCHANGE)


def rename_no_replace(src: Path, dest: Path) -> None:
    """Rename SRC to DEST only while nothing is at DEST (FileExistsError otherwise): one step with
    renameat2(RENAME_NOREPLACE); elsewhere a checked rename (a folder made in between the check and the rename
    is still refused unless it is empty)."""
    if _renameat2(src, dest, RENAME_NOREPLACE):
        return
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, "exists", str(dest))
    try:
        os.rename(src, dest)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, "exists", str(dest)) from None
        raise


def _keep(tmp: Path, out: Path) -> Path:
    """Move the finished work in TMP to a visible name beside OUT that no clean-up removes; returns it."""
    kept = out.parent / f"{_stem(out)}.attnconv-finished-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(tmp, kept)
    return kept


def publish(tmp: Path, out: Path, overwrite: bool = True) -> None:
    """Put the complete folder TMP in OUT's place, replacing an existing OUT (only with OVERWRITE, only a folder)
    without a moment with neither. Something put at OUT by another program meanwhile is never replaced without
    OVERWRITE: the work is then kept under a printed name (AttnconvError)."""
    def refuse(what: str) -> None:
        kept = _keep(tmp, out)
        raise AttnconvError(f"{what} appeared at {out} while this command ran; it was left alone and the finished "
                            f"output is kept in {kept}: move it into place or remove it")

    if not overwrite or not os.path.lexists(out):
        try:
            rename_no_replace(tmp, out)
        except FileExistsError:
            refuse("a folder" if out.is_dir() and not out.is_symlink() else "a file or link")
    elif out.is_symlink() or not out.is_dir():
        refuse("a file or link")
    elif _exchange(tmp, out):
        fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous output
    else:
        old = sibling(out, "old")
        os.rename(out, old)
        os.rename(tmp, out)
        fsync_dir(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)


@contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False,
                      inputs: Iterable[str | Path | None] = (), recheck: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside OUT; on success it replaces OUT (see the module docstring).

    On any error (or Ctrl-C) the temporary folder is removed and OUT is left as it was. `inputs` are refused as
    OUT or around it. recheck=False: the caller checked OUT before long work whose result is only now written;
    an OUT that appeared since is then found at publish, which keeps the work under another name.
    """
    out = check_output_dir(out, overwrite) if recheck else refuse_unsafe_output(out)
    protect_inputs(out, inputs)
    with output_lock(out):
        clean_stale(out)
        if recheck:
            check_output_dir(out, overwrite)  # a restored output counts as existing
        tmp = sibling(out, "tmp")
        tmp.mkdir()
        try:
            yield tmp
            fsync_tree(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish(tmp, out, overwrite)
