"""Decode speed in a serving engine: llama.cpp (llama-bench) on SmolLM2-135M-Instruct vs its DeepSeek-V3 MLA.

The cache saving of MLA measured where people serve models: llama-bench's decode rate (tg, tokens/s) after a
context of each depth (-d), and the KV cache bytes per token llama.cpp itself allocates (its `llama_kv_cache`
log line, read from llama-simple), for the source (Llama GQA, 3 KV heads of 64) and its MLA conversion
(--engine llama.cpp: the exact query latent; --init svd, no calibration: speed does not depend on quality).
Both as bf16 GGUFs written by llama.cpp's convert_hf_to_gguf.py (f16 would zero the DeepSeek-V3 latent
projection, which is scaled below its range). Needs scripts/build_llamacpp.py and
scripts/build_smollm2.py; writes benchmarks/results/engines.md with the CPU model and thread count.

    python benchmarks/engines.py [--kv-rank 96] [--rope-dim 32] [--depths 4096 16384] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
from pathlib import Path

from attnconv import llamacpp

RESULTS = Path(__file__).resolve().parent / "results" / "engines.md"


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return re.search(r"model name\s*:\s*(.+)", text).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or "unknown CPU"


def kv_bytes_per_token(gguf: Path) -> float:
    """K + V bytes per cached token as llama.cpp allocates them (its llama_kv_cache line: size, cells)."""
    done = subprocess.run([str(llamacpp.root() / "bin" / "llama-simple"), "-m", str(gguf), "-n", "2", "Hello"],
                          capture_output=True, text=True, timeout=600)
    m = re.search(r"llama_kv_cache: size =\s*([0-9.]+) MiB \(\s*(\d+) cells", done.stderr)
    if m is None:
        raise RuntimeError("no llama_kv_cache line in llama-simple's log:\n" + done.stderr[-2000:])
    return float(m.group(1)) * 2**20 / int(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="source (default: the SmolLM2 build in the cache)")
    ap.add_argument("--kv-rank", type=int, default=96)
    ap.add_argument("--rope-dim", type=int, default=32)
    ap.add_argument("--depths", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--n-gen", type=int, default=32, help="tokens decoded per measurement")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--outtype", default="bf16", choices=("bf16", "f32"))  # f16 zeroes the scaled latent projection
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not llamacpp.available():
        raise SystemExit("error: llama.cpp is not built: run python scripts/build_llamacpp.py")
    source = args.model or llamacpp.root().parent / "models" / "SmolLM2-135M-Instruct"
    if not (source / "config.json").exists():
        raise SystemExit(f"error: no model at {source}: run python scripts/build_smollm2.py")

    from attnconv.convert.api import convert
    from attnconv.convert.settings import ConvertSettings

    work = llamacpp.root() / "bench"
    work.mkdir(exist_ok=True)
    mla = work / f"{source.name}-mla{args.kv_rank}-{args.rope_dim}"
    if not (mla / "config.json").exists():
        convert(ConvertSettings(str(source), str(mla), to="mla", kv_rank=(args.kv_rank,), rope_dim=args.rope_dim,
                                engine="llama.cpp", init="svd", phases=False, overwrite=True), progress=False)
    rows = []
    for label, folder in (("source (GQA, 3 KV heads)", source), (f"MLA r={args.kv_rank} + RoPE {args.rope_dim}", mla)):
        gguf = llamacpp.to_gguf(folder, work / f"{folder.name}.{args.outtype}.gguf", args.outtype)
        per_token = kv_bytes_per_token(gguf)
        speeds = {r["n_depth"]: r["avg_ts"] for r in llamacpp.bench(gguf, args.depths, args.n_gen, args.threads,
                                                                      args.reps)}
        rows.append((label, per_token, speeds))
        print(label, per_token, json.dumps(speeds))
    base = rows[0]
    lines = [
        "# Decode speed in llama.cpp: SmolLM2-135M-Instruct vs its DeepSeek-V3 MLA", "",
        f"llama.cpp from the llama-cpp-python 0.3.36 sdist (scripts/build_llamacpp.py), CPU build; `llama-bench "
        f"-p 0 -n {args.n_gen} -d DEPTH -t {args.threads} -r {args.reps}`, {args.outtype} GGUFs, KV cache f16 "
        f"(llama.cpp's default). CPU: {cpu_model()}, {args.threads} threads (cores shared with other jobs: "
        "compare the two rows of one run, not runs). KV bytes: what llama.cpp allocates per cached token "
        "(its llama_kv_cache log line).", "",
        "| model | KV bytes/token | " + " | ".join(f"KV at {d} | tok/s at {d}" for d in args.depths) + " |",
        "|---|---|" + "---|---|" * len(args.depths),
    ]
    for label, per_token, speeds in rows:
        cells = []
        for d in args.depths:
            speedup = f" ({speeds[d] / base[2][d]:.2f}x)" if label != base[0] else ""
            cells += [f"{per_token * d / 2**20:.1f} MiB", f"{speeds[d]:.1f}{speedup}"]
        lines.append(f"| {label} | {per_token:,.0f} | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
