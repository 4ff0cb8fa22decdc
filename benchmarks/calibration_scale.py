"""What a calibrated MLA conversion costs, and what it would cost on a 7B model.

1. SmolLM2-135M-Instruct (scripts/build_smollm2.py) -> DeepSeek-V3 MLA 96 + 32 (pca + phases, the default), with
   16,384 calibration tokens in sequences of 2,048 (the default): wall time and peak RSS, time per calibration
   token and per token and parameter.
2. Llama-2-7B's layer shape (hidden 4096, 32 heads, MLP 11008; random bf16 weights, vocabulary 50257) with 1 and 2
   layers, the same conversion at the same tokens (latent 512 + 64): the difference is one more layer's cost;
   7B = the 1-layer run + 31 more layers.
Each conversion runs in a fresh process, one at a time (run it on an otherwise quiet machine).

    python benchmarks/calibration_scale.py [--calib-tokens 16384] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from attnconv.testing import build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import timed_child  # noqa: E402  (peak RSS through a small parent)

ROOT = Path(__file__).resolve().parent.parent
LLAMA_7B = dict(hidden=4096, n_heads=32, max_positions=4096, extra={"intermediate_size": 11008})
LAYERS_7B = 32


def smollm2() -> Path:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_smollm2.py")], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"error: scripts/build_smollm2.py failed: {(run.stderr or run.stdout).strip().splitlines()[-1]}")
    return Path(run.stdout.strip().splitlines()[-1])


def convert(source: Path, out: Path, rank: int, rope: int, tokens: int) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    return timed_child([sys.executable, "-m", "attnconv", "convert", str(source), str(out), "--to", "mla",
                        "--kv-rank", str(rank), "--rope-dim", str(rope), "--calib-tokens", str(tokens), "--quiet"])


def n_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="attnconv-calibration-scale-"))
    tokens = args.calib_tokens
    print(f"{torch.get_num_threads()} torch threads; {tokens:,} calibration tokens in sequences of 2,048")

    source = smollm2()
    seconds, peak = convert(source, work / "smollm2-mla", 96, 32, tokens)
    params = n_params(source)
    print(f"SmolLM2-135M ({params / 1e6:.0f} M parameters) -> DeepSeek-V3 96 + 32: {seconds:.1f} s, peak RSS "
          f"{peak / 2**30:.2f} GiB; {seconds / tokens * 1e3:.2f} ms per calibration token, "
          f"{seconds / tokens / params * 1e12:.0f} ps per token and parameter")

    times = {}
    for layers in (1, 2):
        src = work / f"llama7b-shape-{layers}"
        if not src.exists():
            build_tiny_model("llama", src, with_tokenizer=True, layers=layers, dtype=torch.bfloat16, **LLAMA_7B)
        times[layers] = convert(src, work / f"llama7b-shape-{layers}-mla", 512, 64, tokens)
        print(f"Llama-7B layer shape, {layers} layer(s) -> DeepSeek-V3 512 + 64: {times[layers][0]:.1f} s, peak RSS "
              f"{times[layers][1] / 2**30:.2f} GiB", flush=True)
    # The last layer stops at its attention input (nothing reads its output): a 1-layer run is that layer's
    # statistics and conversion plus what does not grow with depth; each further layer adds one full layer.
    per_layer = times[2][0] - times[1][0]
    estimate = times[1][0] + (LAYERS_7B - 1) * per_layer
    print(f"each 7B-shaped layer beyond the first: {per_layer:.1f} s; a 32-layer 7B model: about "
          f"{estimate / 60:.0f} min ({estimate / tokens * 1e3:.0f} ms per calibration token)")


if __name__ == "__main__":
    main()
