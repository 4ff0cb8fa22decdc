"""Calibration benchmark: time and peak memory of the layer-wise runner collecting every layer's covariance.

Defaults: the shipped reference model on 64k tokens of Tiny Shakespeare (train split), rows of 256 tokens.
Peak memory is the growth of the process's resident set (CPU) or of CUDA's allocated memory over the run,
measured after a warm-up on two rows (imports, kernels); the --dry-run estimate is printed beside it.

    python benchmarks/calibration.py [--source DIR] [--calibrate SPEC] [--tokens N] [--seq-len S] [--device D]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from attnconv.calibration import (
    BATCH_TOKENS,
    CovarianceCollector,
    calibrate_layers,
    calibration_tokens,
    estimate_memory,
)
from attnconv.eval.decode_measure import PeakMemory
from attnconv.loading import load_tokenizer
from attnconv.reference import REFERENCE_DIR


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(REFERENCE_DIR))
    ap.add_argument("--calibrate", default="tinyshakespeare:train")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=BATCH_TOKENS)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)

    t0 = time.perf_counter()
    tokens = calibration_tokens(args.calibrate, load_tokenizer(args.source), args.tokens, args.seq_len)
    tokenize_s = time.perf_counter() - t0
    for _ in calibrate_layers(args.source, tokens[:2], lambda i: [CovarianceCollector()], device=device,
                              batch_tokens=args.batch_tokens, progress=False):
        pass

    config = json.loads((Path(args.source) / "config.json").read_text())
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss()
    with PeakMemory(device) as peak:
        t0 = time.perf_counter()
        traces = []
        for _, (cov,) in calibrate_layers(args.source, tokens, lambda i: [CovarianceCollector()], device=device,
                                          batch_tokens=args.batch_tokens, progress=False):
            traces.append(cov.second_moment().trace().item())  # the conversion's use: read, then drop
        run_s = time.perf_counter() - t0
    one_cov = CovarianceCollector.nbytes(config["hidden_size"])
    estimate = estimate_memory(config, tokens.numel(), one_cov, seq_len=args.seq_len, batch_tokens=args.batch_tokens)
    print(json.dumps({
        "source": str(args.source), "tokens": tokens.numel(), "seq_len": args.seq_len, "device": str(device),
        "threads": torch.get_num_threads(), "tokenize_s": round(tokenize_s, 2), "calibrate_s": round(run_s, 2),
        "tokens_per_s": round(tokens.numel() / run_s), "peak_growth_mib": round((peak.peak - base) / 2**20, 1),
        "estimate_mib": round(estimate / 2**20, 1),
        "hidden_states_mib": round(tokens.numel() * config["hidden_size"] * 4 / 2**20, 1),
        "weights_mib": round(sum(f.stat().st_size for f in Path(args.source).glob("*.safetensors")) / 2**20, 1),
    }, indent=1))


def _rss() -> int:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


if __name__ == "__main__":
    main()
