"""MLA conversion cost: time against the GQA conversion of the same source, and peak memory against its bound.

A synthetic Llama (random bf16 weights, 2 shards) is converted, each in a fresh process, to GQA-4, to MLA
(deepseek-v3, --init svd: no calibration), to MLA with calibration (--init pca and phases over N tokens) and to
GQA-4 by the calibrated grouped+aligned+fit.
Target (issue 17): peak RSS <= largest shard + 1 GiB + the calibration memory the dry run states.

    python benchmarks/mla_convert.py [--hidden 1024] [--layers 12] [--calib-tokens 8192] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from attnconv.testing import build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import timed_child as timed  # noqa: E402  (peak RSS through a small parent)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="attnconv-mla-bench-"))
    src = work / "src"
    if not src.exists():
        build_tiny_model("llama", src, with_tokenizer=True, hidden=args.hidden, n_heads=args.heads,
                         layers=args.layers, max_positions=2048, dtype=torch.bfloat16, max_shard_size="200MB")
    shards = sorted(src.glob("*.safetensors"))
    largest = max(f.stat().st_size for f in shards)
    total = sum(f.stat().st_size for f in shards)
    print(f"source: hidden {args.hidden}, {args.layers} layers, {args.heads} heads, bf16, {total / 2**20:.0f} MiB in "
          f"{len(shards)} shards (largest {largest / 2**20:.0f} MiB); {torch.get_num_threads()} threads")
    head = args.hidden // args.heads
    base = [sys.executable, "-m", "attnconv", "convert", str(src)]
    mla = ["--to", "mla", "--kv-rank", str(4 * head), "--rope-dim", str(head // 2)]
    calib = ["--calibrate", "tinyshakespeare:train", "--calib-tokens", str(args.calib_tokens), "--calib-seq-len", "512"]
    runs = {"GQA-4 (mean)": ["--kv-heads", "4"],
            "MLA deepseek-v3, svd (no calibration)": [*mla, "--init", "svd", "--no-phases"],
            f"MLA deepseek-v3, pca + phases, {args.calib_tokens} calibration tokens":
                [*mla, *calib],
            f"GQA-4, grouped+aligned+fit, {args.calib_tokens} calibration tokens":
                ["--kv-heads", "4", "--method", "grouped+aligned+fit", *calib]}
    rows = []
    for name, extra in runs.items():
        out = work / re.sub(r"\W+", "-", name)
        shutil.rmtree(out, ignore_errors=True)
        dry = subprocess.run([*base, "--dry-run", *extra], check=True, capture_output=True, text=True).stdout
        calib = re.search(r"about ([\d.]+) (MiB|GiB) beside", dry)
        calib_bytes = float(calib.group(1)) * (2**20 if calib.group(2) == "MiB" else 2**30) if calib else 0.0
        wall, peak = timed([*base, str(out), *extra])
        bound = largest + 2**30 + calib_bytes
        rows.append((name, wall, peak, bound))
        print(f"{name}: {wall:.1f} s, peak RSS {peak / 2**30:.2f} GiB (bound {bound / 2**30:.2f} GiB: largest shard "
              f"+ 1 GiB + calibration {calib_bytes / 2**20:.0f} MiB) -> {'within' if peak <= bound else 'OVER'}")
    gqa = rows[0][1]
    print(json.dumps({name: {"seconds": round(w, 2), "vs_gqa": round(w / gqa, 2), "peak_rss_gib": round(p / 2**30, 3),
                             "bound_gib": round(b / 2**30, 3)} for name, w, p, b in rows}, indent=1))


if __name__ == "__main__":
    main()
