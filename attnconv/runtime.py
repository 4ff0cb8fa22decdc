"""Process settings that have to be in place before torch is imported; the `attnconv` command applies them first.

Torch's CPU allocator hands large blocks back to the operating system, so every training step (and every
chunk of the loss) faults its activations, gradients and logits in again, 4 KiB at a time: measured on the
102 M-parameter uptrain benchmark, 1.87 M minor faults in a run against 0.25-0.27 M with 2 MiB pages, and a
vocabulary-sized product 10-15% slower into a fresh block than into a reused one. Torch asks the kernel for
transparent huge pages on blocks of 2 MiB and more when THP_MEM_ALLOC_ENABLE=1, read once at its first
allocation; Linux with THP in `madvise` or `always` mode honours it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


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
