"""Process settings for speed: huge pages for torch's allocator (before torch is imported; the `attnconv`
command applies them first) and, for training, a malloc that keeps freed memory for reuse.

Torch's CPU allocator hands large blocks back to the operating system, so every training step (and every
chunk of the loss) faults its activations, gradients and logits in again, 4 KiB at a time. Torch asks the kernel
for transparent huge pages on blocks of 2 MiB and more when THP_MEM_ALLOC_ENABLE=1, read once at its first
allocation; Linux with THP in `madvise` or `always` mode honours it: far fewer faults.

Huge pages make a fresh block cheaper, not free: glibc still serves every block above its mmap threshold
(at most 32 MiB) with a new mapping that the kernel zeroes, and unmaps it when freed. A training step frees
and allocates the same large blocks again (vocabulary-sized gradients and logits, activations), so
`keep_freed_memory` has glibc serve every block from its heap and keep what is freed: faster steps for a somewhat
higher peak. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def huge_pages_supported() -> bool:
    """Whether the kernel would give madvised memory huge pages (Linux, THP mode `madvise` or `always`)."""
    try:
        mode = _THP_MODE.read_text()
    except OSError:
        return False
    return "[never]" not in mode


def attnconv_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default: this process's environment) with attnconv's allocator settings added; a value the
    user set already (THP_MEM_ALLOC_ENABLE=0 turns huge pages off) is kept."""
    env = dict(os.environ if base is None else base)
    if huge_pages_supported():
        env.setdefault(HUGE_PAGES_ENV, "1")
    return env


def prefer_huge_pages() -> bool:
    """Apply attnconv_env() to this process. Returns whether torch will use huge pages: False once torch is
    imported (its allocator has read the setting), where THP is off, or where the user said 0."""
    if "torch" in sys.modules:
        return False
    os.environ.update(attnconv_env())
    return os.environ.get(HUGE_PAGES_ENV) == "1"


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large blocks from its heap and keep freed memory for reuse (no mmap, no
    trimming), for the rest of this process. Returns whether it did: not off glibc, nor where the user set
    malloc tunables of their own (MALLOC_*_ or glibc.malloc in GLIBC_TUNABLES)."""
    if any(k in os.environ for k in _MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: its mallopt takes these parameters)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
