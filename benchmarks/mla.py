"""MLA decode speed: attnconv's loop on a DeepseekV3 (MLA) model against the same loop on an MHA model of the same
dims, and against transformers' generate() on the MLA model; `--attnconv-format` adds attnconv's own MLA format.

~130M-parameter models with random weights (speed does not depend on them), fp32, 2 threads, batch 8:
- MHA: Llama-like, hidden 768, 12 heads of 64, 12 layers, 2 x 12 x 64 = 1536 cached values per token and layer;
- MLA: DeepseekV3 of the same dims (q_lora_rank null, qk_nope 64, v 64, dense MLPs), kv_lora_rank 128 +
  qk_rope_head_dim 64 = 192 cached values per token and layer: 12.5% of MHA's KV bytes;
- MLA-attnconv (--attnconv-format): attnconv's own MLA format of the MHA dims at the same KV bytes, kv_lora_rank
  96 + 12 KV heads x 8 RoPE dims = 192 cached values per token and layer; and MLA-attnconv-shared, the same
  format with one RoPE key for all heads (--rope-key shared), 128 + 64 as the DeepseekV3 model.
Targets: MLA loop >= 1.5x the MHA loop's tokens/s, >= 3x generate() on the MLA checkpoint. The machine may be
shared: the implementations run in alternating order, every round, and the ratios are medians of the rounds'.
`--profile` times one MLA step's parts: the absorbed attention alone against the rest, with bytes and FLOPs.

    python benchmarks/mla.py [--contexts 2048 8192] [--batch 8] [--new-tokens 16] [--rounds 3]
                             [--generate-rounds 1] [--profile] [--attnconv-format] [--json out.json]
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

GENERATE_PREFILL_CHUNK = 512
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


def build_mla_attnconv(max_positions: int, rank: int = 96, rope: int = 8):
    """attnconv's MLA format (models/mla.py) of the MHA dims: rank + 12 x rope cached values per token and layer."""
    from attnconv.models.mla import CLASSES, register_auto_classes

    register_auto_classes()
    torch.manual_seed(0)
    heads, layers = DIMS["num_key_value_heads"], DIMS["num_hidden_layers"]
    pairs = [[list(range(0, 32, 32 // (rope // 2)))] * heads] * layers  # [layer][KV head][kept pair], spread
    config = CLASSES["llama"][0](**DIMS, max_position_embeddings=max_positions, kv_lora_rank=rank, qk_rope_dim=rope,
                                 rope_pairs=pairs, kv_cache_dim_per_layer=rank + heads * rope)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def build_mla_attnconv_shared(max_positions: int, rank: int = 128, rope: int = 64):
    """attnconv's MLA format with one RoPE key shared by all heads (--rope-key shared): DeepseekV3's cache,
    rank + rope cached values per token and layer, a latent block per query head."""
    from attnconv.models.mla import CLASSES, register_auto_classes

    register_auto_classes()
    torch.manual_seed(0)
    heads, layers = DIMS["num_attention_heads"], DIMS["num_hidden_layers"]
    pairs = [[list(range(0, 32, 32 // (rope // 2)))]] * layers  # [layer][the one RoPE key][kept pair]
    config = CLASSES["llama"][0](**DIMS, max_position_embeddings=max_positions, kv_lora_rank=rank, qk_rope_dim=rope,
                                 rope_pairs=pairs, rope_key="shared", kv_cache_dim_per_layer=rank + rope)
    config.num_key_value_heads = heads
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return f"{fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} CPUs)"


class StepClock:
    """Times every one-token forward of a model (hooks on the model itself): on a shared machine the fastest step
    of a run is the best estimate of an undisturbed one."""

    def __init__(self, model):
        self.steps: list[float] = []
        self._start = 0.0
        self._hooks = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                       model.register_forward_hook(self._post, with_kwargs=True)]

    def _pre(self, module, args, kwargs):
        self._start = time.perf_counter()

    def _post(self, module, args, kwargs, out):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] == 1:
            self.steps.append(time.perf_counter() - self._start)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()


def run_impl(name: str, models: dict, prompt: torch.Tensor, new_tokens: int) -> tuple[dict, torch.Tensor]:
    """({"tokens_per_s": whole run, "best_step_tokens_per_s": fastest step}, tokens) of one timed run."""
    batch, steps = prompt.shape[0], new_tokens - 1
    model = models["MLA" if name == "generate" else name]
    clock = StepClock(model)
    chunk = model.generation_config.prefill_chunk_size
    try:
        if name == "generate":
            # DeepseekV3's value heads are narrower than its query/key heads, so transformers' SDPA prefill takes
            # the math kernel: [b, H, s, s] scores (25.8 GB at 8 x 8192). Its prefill in chunks of 512 queries
            # bounds them; the timed decode steps are the same.
            model.generation_config.prefill_chunk_size = GENERATE_PREFILL_CHUNK
            tokens, _, decode_s, _ = time_generate(model, prompt, new_tokens, None)
        else:
            result = greedy_generate(model, prompt, new_tokens)
            tokens, decode_s = result.tokens, result.decode_s
    finally:
        clock.remove()
        model.generation_config.prefill_chunk_size = chunk
    return {"tokens_per_s": batch * steps / decode_s, "best_step_tokens_per_s": batch / min(clock.steps)}, tokens


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
def profile_attention(model, batch: int, context: int, repeats: int = 3) -> dict:
    """One decode step's absorbed attention over `context` cached rows per layer, one buffer per layer as in the
    cache (so they come from memory, not from the last level cache): seconds, bytes, FLOPs."""
    c = model.config
    rank, rope, heads, layers = c.kv_lora_rank, c.qk_rope_head_dim, c.num_attention_heads, c.num_hidden_layers
    rows = [torch.randn(batch, context + 16, rank + rope)[:, :context] for _ in range(layers)]
    w_uk, w_uv = split_kv_b(model.model.layers[0].self_attn.kv_b_proj.weight, heads, c.qk_nope_head_dim,
                            c.v_head_dim)
    q_nope, q_rot = torch.randn(batch, heads, c.qk_nope_head_dim), torch.randn(batch, heads, rope)
    best = float("inf")
    for _ in range(repeats + 1):  # the first sweep warms up
        t0 = time.perf_counter()
        for layer_rows in rows:
            mla_decode_attention(q_nope, q_rot, layer_rows, w_uk, w_uv, 0.1)
        best = min(best, time.perf_counter() - t0)
    flops = 2 * batch * heads * context * (2 * rank + rope) * layers  # scores (r + d_r) + values (r)
    return {"attention_s": best, "attention_bytes": sum(r.nbytes for r in rows) // (context + 16) * context,
            "attention_flops": flops}


RATIOS = {"mla_over_mha": ("MLA", "MHA"), "mla_over_generate": ("MLA", "generate"),
          "attnconv_mla_over_mha": ("MLA-attnconv", "MHA"),
          "attnconv_shared_mla_over_mha": ("MLA-attnconv-shared", "MHA")}


def _cell(r: dict, name: str) -> str:
    return f"{r[name]['tokens_per_s']:.2f} ({r[name]['best_step_tokens_per_s']:.2f})" if name in r else "-"


def _ratio(r: dict, a: str, b: str) -> str:
    if a not in r or b not in r:
        return "-"
    return (f"{r[a]['tokens_per_s'] / r[b]['tokens_per_s']:.2f}x "
            f"({r[a]['best_step_tokens_per_s'] / r[b]['best_step_tokens_per_s']:.2f}x)")


def print_rounds(console: Console, context: int, rounds: list[dict]) -> None:
    table = Table(title=f"batch x context {context}: decode tokens/s per round, whole run (fastest step)")
    for col in ("round", "order", "MHA loop", "MLA loop", "MLA generate()", "MLA-attnconv loop",
                "MLA-attnconv-shared loop", "MLA/MHA", "MLA/generate()", "MLA-attnconv/MHA", "shared/MHA"):
        table.add_column(col, justify="right")
    for i, r in enumerate(rounds):
        table.add_row(str(i + 1), " ".join(r["order"]), _cell(r, "MHA"), _cell(r, "MLA"), _cell(r, "generate"),
                      _cell(r, "MLA-attnconv"), _cell(r, "MLA-attnconv-shared"), _ratio(r, "MLA", "MHA"),
                      _ratio(r, "MLA", "generate"), _ratio(r, "MLA-attnconv", "MHA"),
                      _ratio(r, "MLA-attnconv-shared", "MHA"))
    console.print(table)


def summarize(rounds: list[dict]) -> dict:
    """Per ratio: the median over rounds of whole-run ratios and of fastest-step ratios, and the ratio of the
    fastest steps over all rounds."""
    out = {}
    for key, (a, b) in RATIOS.items():
        both = [r for r in rounds if a in r and b in r]
        if not both:
            continue
        out[key] = {
            "median_whole_run": statistics.median(r[a]["tokens_per_s"] / r[b]["tokens_per_s"] for r in both),
            "median_fastest_step": statistics.median(r[a]["best_step_tokens_per_s"] / r[b]["best_step_tokens_per_s"]
                                                     for r in both),
            "fastest_steps_overall": max(r[a]["best_step_tokens_per_s"] for r in both)
            / max(r[b]["best_step_tokens_per_s"] for r in both)}
    return out


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
    parser.add_argument("--attnconv-format", action="store_true",
                        help="also run attnconv's own MLA format at the same KV bytes as the DeepseekV3 model")
    parser.add_argument("--json", help="also write all figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    started = time.perf_counter()
    console.print(f"CPU: {cpu_name()}, {args.threads} threads; load average at start {os.getloadavg()[0]:.1f}")
    max_positions = max(args.contexts) + args.new_tokens
    models = {"MHA": build_mha(max_positions), "MLA": build_mla(max_positions)}
    if args.attnconv_format:
        models["MLA-attnconv"] = build_mla_attnconv(max_positions)
        models["MLA-attnconv-shared"] = build_mla_attnconv_shared(max_positions)
    for name, model in models.items():
        shape = cache_shape(model.config)
        console.print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                      f"{weight_bytes_per_step(model) / 1e6:.0f} MB of weights read per step, "
                      f"{shape.values_per_layer} cached values per token and layer")
    generator = torch.Generator().manual_seed(0)
    warm = torch.randint(0, DIMS["vocab_size"], (args.batch, 32), generator=generator)
    loops = [name for name in models if name != "MHA"]  # the MLA loops, each timed against MHA's
    for name in ("MHA", *loops, "generate"):  # kernels built, threads and allocator touched
        run_impl(name, models, warm, 4)
    results = {"cpu": cpu_name(), "threads": args.threads, "contexts": {}}
    for context in args.contexts:
        prompt = torch.randint(0, DIMS["vocab_size"], (args.batch, context), generator=generator)
        rounds = []
        for i in range(args.rounds):
            order = ["MHA", *loops] + (["generate"] if i < args.generate_rounds else [])
            order = order if i % 2 == 0 else order[::-1]
            round_, tokens = {"order": order}, {}
            for name in order:
                round_[name], tokens[name] = run_impl(name, models, prompt, args.new_tokens)
                console.print(f"  context {context} round {i + 1} {name}: {round_[name]['tokens_per_s']:.2f} "
                              f"tokens/s (fastest step {round_[name]['best_step_tokens_per_s']:.2f}), load "
                              f"{os.getloadavg()[0]:.1f}")
            if "generate" in tokens:
                round_["generate_tokens_equal"] = bool(torch.equal(tokens["generate"], tokens["MLA"]))
            rounds.append(round_)
        print_rounds(console, context, rounds)
        summary = summarize(rounds)
        for key, target in (("mla_over_mha", 1.5), ("mla_over_generate", 3.0), ("attnconv_mla_over_mha", None),
                            ("attnconv_shared_mla_over_mha", None)):
            if key in summary:
                v = summary[key]
                console.print(f"context {context}: {key} [bold]{v['median_whole_run']:.2f}x[/] median of whole runs, "
                              f"{v['median_fastest_step']:.2f}x median of fastest steps, "
                              f"{v['fastest_steps_overall']:.2f}x fastest steps overall"
                              + ("" if target is None else f" (target >= {target}x)"))
        if any("generate" in r for r in rounds):
            summary["generate_tokens_equal"] = all(r["generate_tokens_equal"] for r in rounds if "generate" in r)
            console.print(f"greedy tokens of the MLA loop equal generate()'s: {summary['generate_tokens_equal']}")
        if args.profile:
            prof = profile_attention(models["MLA"], args.batch, context)
            step_s = args.batch / max(r["MLA"]["best_step_tokens_per_s"] for r in rounds)  # the fastest step
            prof.update(step_s=step_s, weights_bytes=weight_bytes_per_step(models["MLA"]),
                        bandwidth=measure_bandwidth(torch.device("cpu")), matmul_gflops=matmul_gflops())
            summary["profile"] = prof
            rest_s = step_s - prof["attention_s"]
            rest = (f"the rest {1e3 * rest_s:.1f} ms ({prof['weights_bytes'] / 1e6:.0f} MB of weights: "
                    f"{prof['weights_bytes'] / rest_s / 1e9:.1f} GB/s)" if rest_s > 0
                    else "longer than the fastest whole step: the machine was busy, profile again")
            console.print(
                f"  fastest MLA step {1e3 * step_s:.1f} ms: absorbed attention {1e3 * prof['attention_s']:.1f} ms "
                f"({prof['attention_bytes'] / 1e6:.0f} MB, {prof['attention_flops'] / 1e9:.2f} GFLOP: "
                f"{prof['attention_flops'] / prof['attention_s'] / 1e9:.0f} GFLOP/s, "
                f"{prof['attention_bytes'] / prof['attention_s'] / 1e9:.1f} GB/s), {rest}; this CPU: "
                f"{prof['bandwidth'] / 1e9:.1f} GB/s read (torch.sum), {prof['matmul_gflops']:.0f} GFLOP/s fp32 GEMM")
        results["contexts"][context] = {"rounds": rounds, **summary}
    console.print(f"total {time.perf_counter() - started:.0f} s, load average at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
