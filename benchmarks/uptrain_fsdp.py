"""Tokens/s of `attnconv uptrain` under FSDP2 against DDP, same processes, same model, same global batch.

Each run is `accelerate launch --config_file recipes/accelerate/{ddp_1node,fsdp_1node}.yaml --num_processes N
-m attnconv uptrain ...` on a random Llama-like GQA model (GPT-2 tokenizer) and Tiny Shakespeare. Runs come in
pairs of alternating order (DDP, FSDP; FSDP, DDP; ...) so that load from other processes hits both alike. A run's
speed is the median tokens/s (train_log.jsonl, whole global batch) of its steps after the warm-up; the ratio is the
median of the pairs' FSDP/DDP ratios. Without a GPU the processes run on CPU over gloo (attnconv turns FSDP on there;
accelerate alone would run DDP).

FSDP is for models that do not fit one device: it all-gathers each layer's weights in forward and again in backward
and reduce-scatters the gradients, where DDP all-reduces the gradients once. Expect it to be slower where DDP fits.

    python benchmarks/uptrain_fsdp.py [--processes 2] [--steps 8] [--warmup-steps 2] [--batch 4] [--seq-len 128]
                                      [--hidden 256] [--layers 4] [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(kind: str, args, model: Path, data: Path, work: Path) -> float:
    out = work / f"out-{kind}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes" / "accelerate" / f"{kind}_1node.yaml"), "--num_processes", str(args.processes),
           "--main_process_port", "0", "-m", "attnconv", "uptrain", str(model), str(out), "--data", str(data),
           "--steps", str(args.steps), "--batch-size", str(args.batch), "--seq-len", str(args.seq_len),
           "--quiet", "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "ATTNCONV_CACHE": str(work / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} run failed:\n{proc.stderr[-3000:]}")
    record = json.loads((out / "attnconv.json").read_text())["uptrain"]["settings"]
    assert record["fsdp"] == (kind == "fsdp"), record
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[args.warmup_steps:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup-steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences per process and step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3, help="pairs of runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    args = ap.parse_args()

    from attnconv.testing import build_tiny_model
    from attnconv.textdata import tinyshakespeare_split

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = build_tiny_model("llama", work / "model", with_tokenizer=True, hidden=args.hidden, layers=args.layers,
                                 n_heads=8, n_kv_heads=2)
        data = work / "train.txt"
        data.write_text(tinyshakespeare_split("train"))
        speeds: dict[str, list[float]] = {"ddp": [], "fsdp": []}
        ratios = []
        for i in range(args.repeat):
            pair = {}
            for kind in (("ddp", "fsdp") if i % 2 == 0 else ("fsdp", "ddp")):
                pair[kind] = run(kind, args, model, data, work)
                speeds[kind].append(pair[kind])
                print(f"pair {i + 1}: {kind:4s} {pair[kind]:8.0f} tok/s", file=sys.stderr)
            ratios.append(pair["fsdp"] / pair["ddp"])
    result = {"processes": args.processes, "tokens_per_step": args.processes * args.batch * args.seq_len,
              "hidden": args.hidden, "layers": args.layers,
              **{f"{k}_tokens_per_s": {"median": statistics.median(v), "min": min(v), "max": max(v)}
                 for k, v in speeds.items()},
              "fsdp_over_ddp": {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                                "best_over_best": max(speeds["fsdp"]) / max(speeds["ddp"])}}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
