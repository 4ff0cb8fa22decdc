"""Decode speed of attnconv's loop vs transformers generate(), MHA vs GQA-4 vs MQA, on a ~100M Llama-like model.

Random weights (speed does not depend on them), fp32, 2 threads. All figures are ratios measured in one run:
- attnconv's loop / the best generate() mode (static or dynamic cache) at every grid point (target >= 1.0x);
- achieved fraction of the memory-bandwidth roofline at batch 8, context 2048 (target >= 80%);
- MQA over MHA speedup at batch 8, context 2048 vs the ratio of bytes read per step (target: within 75%).

    python benchmarks/decode.py [--new-tokens 16] [--batches 1 8] [--contexts 512 2048] [--decode-kernel auto]
                                [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, LlamaConfig

from attnconv.eval.decode import decode_benchmark
from attnconv.eval.decode_measure import weight_bytes_per_step
from attnconv.families import cache_shape

VARIANTS = {"MHA": 12, "GQA-4": 3, "MQA": 1}  # name -> n_kv_heads for 12 query heads
FOCUS = (8, 2048)  # (batch, context) of the roofline and MQA/MHA targets


def build_model(n_kv_heads: int, max_positions: int):
    config = LlamaConfig(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=n_kv_heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def step_bytes(model, batch: int, context: int, new_tokens: int) -> float:
    """Bytes one decode step reads, on average over the run: weights + the filled KV cache (as decode_benchmark)."""
    per_token = cache_shape(model.config).bytes_per_token(4)
    return weight_bytes_per_step(model) + batch * (context + new_tokens / 2) * per_token


def print_table(console: Console, name: str, rows: list[dict]) -> None:
    table = Table(title=name)
    for col in ("impl", "batch", "context", "prefill s", "tok/s", "ms/token", "KV MB", "peak MB", "roofline tok/s",
                "roofline %"):
        table.add_column(col, justify="right")
    for r in rows:
        kv_mb = (r["kv_bytes_measured"] or 0) / 1e6
        table.add_row(r["impl"], str(r["batch"]), str(r["context"]), f"{r['prefill_s']:.2f}",
                      f"{r['tokens_per_s']:.1f}", f"{r['ms_per_token']:.1f}", f"{kv_mb:.1f}",
                      f"{(r['peak_mem_bytes'] or 0) / 1e6:.0f}", f"{r['roofline_tokens_per_s']:.1f}",
                      f"{100 * r['bandwidth_fraction']:.0f}%")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode-kernel", default="auto", choices=("auto", "native", "torch"),
                        help="Linear layers of the decode loop: attnconv's AVX2 kernel (auto/native) or oneDNN (torch)")
    parser.add_argument("--json", help="also write all rows and ratios to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    started = time.perf_counter()
    # other processes on the same cores distort every figure: print the load so a reader can judge
    console.print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    results, sizes = {}, {}
    for name, n_kv in VARIANTS.items():
        model = build_model(n_kv, max_positions=max(args.contexts) + args.new_tokens)
        params = sum(p.numel() for p in model.parameters())
        console.print(f"[bold]{name}[/]: {params / 1e6:.1f}M parameters, n_kv_heads={n_kv}")
        results[name] = decode_benchmark(model, contexts=args.contexts, batches=args.batches,
                                         new_tokens=args.new_tokens, kernel=args.decode_kernel)
        sizes[name] = {(b, c): step_bytes(model, b, c, args.new_tokens) for b in args.batches for c in args.contexts}
        print_table(console, name, results[name]["rows"])
        del model
    for note in results["MHA"]["notes"]:
        console.print(f"note: {note}")

    ratios = {"attnconv_vs_best_generate": {}, "roofline_fraction": {}}
    console.print("\n[bold]attnconv loop / best generate() mode (target >= 1.0x)[/]")
    for name, res in results.items():
        by = {(r["impl"], r["batch"], r["context"]): r for r in res["rows"]}
        for b in args.batches:
            for c in args.contexts:
                best = max(by[(impl, b, c)]["tokens_per_s"] for impl in ("hf-static", "hf-dynamic"))
                ratio = by[("attnconv", b, c)]["tokens_per_s"] / best
                ratios["attnconv_vs_best_generate"][f"{name} b{b} ctx{c}"] = ratio
                console.print(f"  {name:6s} batch {b} context {c:5d}: {ratio:.2f}x "
                              f"({by[('attnconv', b, c)]['tokens_per_s']:.1f} vs {best:.1f} tok/s)")
        if FOCUS in sizes[name]:
            fraction = by[("attnconv", *FOCUS)]["bandwidth_fraction"]
            ratios["roofline_fraction"][name] = fraction
    if ratios["roofline_fraction"]:
        console.print(f"\n[bold]fraction of the bandwidth roofline at batch {FOCUS[0]}, context {FOCUS[1]} "
                      "(target >= 80%)[/]")
        for name, fraction in ratios["roofline_fraction"].items():
            console.print(f"  {name:6s}: {100 * fraction:.0f}%")
        tps = {n: next(r["tokens_per_s"] for r in results[n]["rows"]
                       if (r["impl"], r["batch"], r["context"]) == ("attnconv", *FOCUS)) for n in ("MHA", "MQA")}
        speedup = tps["MQA"] / tps["MHA"]
        bytes_ratio = sizes["MHA"][FOCUS] / sizes["MQA"][FOCUS]
        ratios["mqa_over_mha"] = {"speedup": speedup, "bytes_ratio": bytes_ratio, "fraction": speedup / bytes_ratio}
        console.print(f"\n[bold]MQA over MHA at batch {FOCUS[0]}, context {FOCUS[1]}[/]: speedup {speedup:.2f}x, "
                      f"bytes read per step ratio {bytes_ratio:.2f}x -> {100 * speedup / bytes_ratio:.0f}% "
                      "of it (target >= 75%)")
    console.print(f"\ntotal {time.perf_counter() - started:.0f} s, load average at end: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "ratios": ratios, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
