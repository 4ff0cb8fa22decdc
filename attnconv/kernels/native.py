"""Building and loading the project's C kernels (AVX2 + FMA, float32) on first use.

Each C file is compiled with the system C compiler (`$CC`, else `cc`) into the attnconv cache
(`$ATTNCONV_CACHE/kernels`, default `~/.cache/attnconv/kernels`), named by a hash of source and flags, written under
a temporary name and renamed (a concurrent build or a crash never leaves half a library), and loaded with ctypes.
Their OpenMP calls resolve to the runtime torch has already loaded, so the kernels share torch's threads.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from attnconv.errors import cache_root

FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c11")


def cache_dir() -> Path:
    return cache_root() / "kernels"


def cpu_supports_avx2() -> bool:
    capability = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")()
    return capability.upper().startswith(("AVX2", "AVX512"))


def build(source: Path) -> Path:
    """Compile `source` (once per source and flags) and return the shared library's path."""
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))  # includes
    compiler = os.environ.get("CC", "cc")
    key = hashlib.sha256(text + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C compiler: {compiler!r} is not on PATH (set $CC)")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, str(source), "-o", str(built)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip().splitlines()[-1:]}")
        os.replace(built, target)
    return target


I64, PTR, F32, INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int


def load(source: Path, signatures: dict[str, tuple[list, object]]) -> ctypes.CDLL | str:
    """The built and loaded library with each function's {name: (argument types, result type)} declared, or why it
    is not available (a string)."""
    if not cpu_supports_avx2():
        return "this CPU has no AVX2/FMA"
    try:
        lib = ctypes.CDLL(str(build(source)))
    except (OSError, RuntimeError) as e:
        return f"could not build or load {source.name}: {e}"
    for name, (args, result) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib
