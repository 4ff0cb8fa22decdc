"""The one error type users see (the CLI prints its message on one line and exits non-zero), and small helpers
that turn other libraries' exceptions into such a line."""

from __future__ import annotations

import os
from pathlib import Path


class AttnconvError(Exception):
    """A problem with the user's input, with a message that says what is wrong and how to fix it."""

    exit_code = 2


class Interrupted(AttnconvError):
    """Ctrl-C (SIGINT, exit 130) or SIGTERM (exit 143): what was kept is in the message."""

    def __init__(self, message: str, signal_number: int = 2):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class Cancelled(Exception):
    """Raised in a worker thread whose caller has stopped (Ctrl-C, SIGTERM or an error): the work is not wanted."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be, so the same clean-up runs (exit 143)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (or its type's name): enough to say what went wrong."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def disk_full(e: BaseException) -> bool:
    """Whether an exception from the OS, torch or safetensors means the disk (or quota) is full."""
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    return "No space left" in text or "Disk quota" in text or "failed writing file" in text


def cache_root() -> Path:
    """attnconv's cache folder: $ATTNCONV_CACHE, else ~/.cache/attnconv (token caches, compiled kernels,
    lm-evaluation-harness's task names)."""
    return Path(os.environ.get("ATTNCONV_CACHE") or Path.home() / ".cache" / "attnconv")


def write_cache_file(path: Path, text: str) -> None:
    """Write a cache file whole (a temporary name, then a rename), best effort: a read-only or full cache only
    costs the next run the work the file would have saved."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        try:
            tmp.unlink()
        except OSError:  # never written, or its folder cannot be used at all
            pass
