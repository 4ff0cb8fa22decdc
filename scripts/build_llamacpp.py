"""Build the llama.cpp tools attnconv's engine tests and benchmark use, once, into attnconv's cache (CPU, offline).

llama.cpp is the one serving engine for DeepSeek-V3-format MLA that runs on a CPU. The package registry is
reachable where the hub is not, and the sdist of `llama-cpp-python==0.3.36` vendors a full llama.cpp tree
(`vendor/llama.cpp`, with `convert_hf_to_gguf.py` and `gguf-py`). This script pip-downloads that sdist (no
install), unpacks the vendored tree to $ATTNCONV_CACHE/llama.cpp/src and builds only the tools needed, with
cmake (Release, CPU, -j2):

    llama-perplexity   perplexity on chunks of -c tokens (the yardstick the engine tests compare against)
    llama-simple       greedy generation (the tests compare its tokens with transformers')
    llama-tokenize     the token ids llama.cpp scores, so transformers can score the very same ids
    llama-bench        decode tokens/s at a context depth (-d), for benchmarks/engines.py

    python scripts/build_llamacpp.py       # prints the folder holding bin/ and src/

A second run finds the finished build (a stamp file naming the version) and only prints the folder. Never
commit what it writes: sources and binaries stay in the cache.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python==0.3.36"
TARGETS = ("llama-perplexity", "llama-simple", "llama-tokenize", "llama-bench")


def cache_root() -> Path:
    return Path(os.environ.get("ATTNCONV_CACHE") or Path.home() / ".cache" / "attnconv")


def llamacpp_root() -> Path:
    return cache_root() / "llama.cpp"


def unpack_sources(root: Path) -> Path:
    """The vendored llama.cpp tree of the sdist, at root/src (unpacked once, renamed into place when complete)."""
    src = root / "src"
    if (src / "convert_hf_to_gguf.py").exists():
        return src
    downloads = cache_root() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdists = sorted(downloads.glob("llama_cpp_python-0.3.36.tar.gz"))
    if not sdists:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(downloads), PACKAGE], check=True)
        sdists = sorted(downloads.glob("llama_cpp_python-0.3.36.tar.gz"))
    tmp = Path(tempfile.mkdtemp(prefix=".src.", dir=root))
    prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
    with tarfile.open(sdists[0]) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
        for m in members:
            m.name = m.name[len(prefix):]
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(src)
    return src


def build(root: Path, jobs: int) -> None:
    src = unpack_sources(root)
    build_dir = root / "build"
    subprocess.run(["cmake", "-S", str(src), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_BUILD_TESTS=OFF", "-DBUILD_SHARED_LIBS=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_OPENSSL=OFF",
                    "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF"], check=True)
    subprocess.run(["cmake", "--build", str(build_dir), "--config", "Release", "-j", str(jobs),
                    "--target", *TARGETS], check=True)
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in TARGETS:
        shutil.copy2(build_dir / "bin" / name, bin_dir / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-j", "--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = ap.parse_args()
    root = llamacpp_root()
    root.mkdir(parents=True, exist_ok=True)
    stamp = root / "BUILT"
    if not (stamp.exists() and stamp.read_text().strip() == PACKAGE):
        build(root, args.jobs)
        stamp.write_text(PACKAGE + "\n")
    print(root)


if __name__ == "__main__":
    main()
