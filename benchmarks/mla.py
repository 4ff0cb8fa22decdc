"""MLA decode speed: attnconv's loop on a DeepseekV3 (MLA) model against the same loop on an MHA model of the same
dims, and against transformers' generate() on the MLA model.

~130M-parameter models with random weights (speed does not depend on them), fp32, 2 threads, batch 8:
- MHA: Llama-like, hidden 768, 12 heads of 64, 12 layers, 2 x 12 x 64 = 1536 cached values per token and layer;
- MLA: DeepseekV3 of the same dims (q_lora_rank null, qk_nope 64, v 64, dense MLPs), kv_lora_rank 128 +
  qk_rope_head_dim 64 = 192 cached values per token and layer: 12.5% of MHA's KV bytes.
Targets: MLA loop >= 1.5x the MHA loop's tokens/s, >= 3x generate() on the MLA checkpoint. The machine may be
shared: the implementations run in alternating order, every round, and the ratios are medians of the rounds'.
`--profile` times one MLA step's parts: the absorbed attention alone against the rest, with bytes and FLOPs.

    python benchmarks/mla.py [--contexts 2048 8192] [--batch 8] [--new-tokens 16] [--rounds 3]
                             [--generate-rounds 1] [--profile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, DeepseekV3Config, LlamaConfig

from attnconv.eval.decode import greedy_generate
from attnconv.eval.decode_measure import measure_bandwidth, time_generate, weight_bytes_per_step
from attnconv.families import cache_shape
from attnconv.kernels.mla_attention import mla_decode_attention, split_kv_b

DIMS = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=12, tie_word_embeddings=False)


def build_mha(max_positions: int):
    torch.manual_seed(0)
    config = LlamaConfig(**DIMS, max_position_embeddings=max_positions)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def build_mla(max_positions: int, rank: int = 128, rope: int = 64):
    torch.manual_seed(0)
    config = DeepseekV3Config(**DIMS, max_position_embeddings=max_positions, q_lora_rank=None, kv_lora_rank=rank,
                              qk_rope_head_dim=rope, qk_nope_head_dim=64, v_head_dim=64, rope_interleave=True,
                              first_k_dense_replace=DIMS["num_hidden_layers"], n_routed_experts=8,
                              moe_intermediate_size=256)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} CPUs)"


def run_impl(name: str, models: dict, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """(decode tokens/s, tokens) of one timed run."""
    batch, steps = prompt.shape[0], new_tokens - 1
    if name == "generate":
        tokens, _, decode_s, _ = time_generate(models["MLA"], prompt, new_tokens, None)
    else:
        result = greedy_generate(models[name], prompt, new_tokens)
        tokens, decode_s = result.tokens, result.decode_s
    return batch * steps / decode_s, tokens


def matmul_gflops(seconds: float = 0.5) -> float:
    """This CPU's fp32 GEMM throughput with the current threads (1024^3, best of a few)."""
    a, best = torch.randn(1024, 1024), float("inf")
    a @ a
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024 ** 3 / best / 1e9


@torch.inference_mode()
def profile_attention(model, batch: int, context: int, repeats: int = 5) -> dict:
    """One decode step's absorbed attention (all layers) over `context` random cached rows: seconds, bytes, FLOPs."""
    c = model.config
    rank, rope, heads = c.kv_lora_rank, c.qk_rope_head_dim, c.num_attention_heads
    rows = torch.randn(batch, context + 16, rank + rope)[:, :context]
    w_uk, w_uv = split_kv_b(model.model.layers[0].self_attn.kv_b_proj.weight, heads, c.qk_nope_head_dim,
                            c.v_head_dim)
    q_nope, q_rot = torch.randn(batch, heads, c.qk_nope_head_dim), torch.randn(batch, heads, rope)
    mla_decode_attention(q_nope, q_rot, rows, w_uk, w_uv, 0.1)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mla_decode_attention(q_nope, q_rot, rows, w_uk, w_uv, 0.1)
        best = min(best, time.perf_counter() - t0)
    layers = c.num_hidden_layers
    flops = 2 * batch * heads * context * (2 * rank + rope) * layers  # scores (r + d_r) + values (r)
    return {"attention_s": best * layers, "attention_bytes": rows.nbytes * layers, "attention_flops": flops}


def print_rounds(console: Console, context: int, rounds: list[dict]) -> None:
    table = Table(title=f"batch x context {context}: decode tokens/s per round (alternating order)")
    for col in ("round", "order", "MHA loop", "MLA loop", "MLA generate()", "MLA/MHA", "MLA/generate()"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rounds):
        gen = r.get("generate")
        table.add_row(str(i + 1), " ".join(r["order"]), f"{r['MHA']:.1f}", f"{r['MLA']:.1f}",
                      f"{gen:.2f}" if gen else "-", f"{r['MLA'] / r['MHA']:.2f}x",
                      f"{r['MLA'] / gen:.1f}x" if gen else "-")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two loops per context")
    parser.add_argument("--generate-rounds", type=int, default=1,
                        help="rounds that also run generate() (slow: it expands the whole cache every step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="time the MLA step's attention apart from the rest")
    parser.add_argument("--json", help="also write all figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    started = time.perf_counter()
    console.print(f"CPU: {cpu_name()}, {args.threads} threads; load average at start {os.getloadavg()[0]:.1f}")
    max_positions = max(args.contexts) + args.new_tokens
    models = {"MHA": build_mha(max_positions), "MLA": build_mla(max_positions)}
    for name, model in models.items():
        shape = cache_shape(model.config)
        console.print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                      f"{weight_bytes_per_step(model) / 1e6:.0f} MB of weights read per step, "
                      f"{shape.values_per_layer} cached values per token and layer")
    generator = torch.Generator().manual_seed(0)
    warm = torch.randint(0, DIMS["vocab_size"], (args.batch, 32), generator=generator)
    for name in ("MHA", "MLA", "generate"):  # kernels built, threads and allocator touched
        run_impl(name, models, warm, 4)
    results = {"cpu": cpu_name(), "threads": args.threads, "contexts": {}}
    for context in args.contexts:
        prompt = torch.randint(0, DIMS["vocab_size"], (args.batch, context), generator=generator)
        rounds = []
        for i in range(args.rounds):
            order = ["MHA", "MLA"] + (["generate"] if i < args.generate_rounds else [])
            order = order if i % 2 == 0 else order[::-1]
            rates, tokens = {}, {}
            for name in order:
                rates[name], tokens[name] = run_impl(name, models, prompt, args.new_tokens)
            if "generate" in tokens:
                rates["generate_tokens_equal"] = bool(torch.equal(tokens["generate"], tokens["MLA"]))
            rounds.append({"order": order, **rates})
        print_rounds(console, context, rounds)
        summary = {"mla_over_mha": statistics.median(r["MLA"] / r["MHA"] for r in rounds)}
        with_gen = [r for r in rounds if "generate" in r]
        if with_gen:
            summary["mla_over_generate"] = statistics.median(r["MLA"] / r["generate"] for r in with_gen)
            summary["generate_tokens_equal"] = all(r["generate_tokens_equal"] for r in with_gen)
        console.print(f"context {context}: MLA loop / MHA loop [bold]{summary['mla_over_mha']:.2f}x[/] (target >= 1.5x)"
                      + (f", MLA loop / generate() [bold]{summary['mla_over_generate']:.1f}x[/] (target >= 3x), "
                         f"tokens equal: {summary['generate_tokens_equal']}" if with_gen else ""))
        if args.profile:
            prof = profile_attention(models["MLA"], args.batch, context)
            step_s = args.batch / statistics.median(r["MLA"] for r in rounds)
            prof.update(step_s=step_s, weights_bytes=weight_bytes_per_step(models["MLA"]),
                        bandwidth=measure_bandwidth(torch.device("cpu")), matmul_gflops=matmul_gflops())
            summary["profile"] = prof
            console.print(
                f"  MLA step {1e3 * step_s:.1f} ms: absorbed attention {1e3 * prof['attention_s']:.1f} ms "
                f"({prof['attention_bytes'] / 1e6:.0f} MB, {prof['attention_flops'] / 1e9:.2f} GFLOP: "
                f"{prof['attention_flops'] / prof['attention_s'] / 1e9:.0f} GFLOP/s, "
                f"{prof['attention_bytes'] / prof['attention_s'] / 1e9:.1f} GB/s), the rest "
                f"{1e3 * (step_s - prof['attention_s']):.1f} ms ({prof['weights_bytes'] / 1e6:.0f} MB of weights: "
                f"{prof['weights_bytes'] / max(step_s - prof['attention_s'], 1e-9) / 1e9:.1f} GB/s); this CPU: "
                f"{prof['bandwidth'] / 1e9:.1f} GB/s read (torch.sum), {prof['matmul_gflops']:.0f} GFLOP/s fp32 GEMM")
        results["contexts"][context] = {"rounds": rounds, **summary}
    console.print(f"total {time.perf_counter() - started:.0f} s, load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
