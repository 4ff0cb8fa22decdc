"""attnconv's own greedy decode loop (preallocated KV cache + SDPA with enable_gqa) and its speed benchmark.

`greedy_generate` runs the model's own transformers modules with `PreallocatedKVCache` and the decode attention
(attnconv/patches/decode_cache.py, decode_attention.py): one prefill forward, then one forward per new token.
MLA models get a latent cache and the absorbed latent attention instead: DeepSeek-V3's format a `LatentKVCache`
(patches/deepseek_v3.py), attnconv's own format a `RopeLatentKVCache` (patches/attnconv_mla.py).
`decode_benchmark` times it beside transformers' `generate()` over a grid of batch sizes and context lengths.
"""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from rich.progress import Progress

from attnconv.errors import AttnconvError
from attnconv.eval.decode_measure import (
    PeakMemory,
    measure_bandwidth,
    synchronize,
    time_generate,
    weight_bytes_per_step,
)
from attnconv.families import FAMILIES, cache_shape, family_of
from attnconv.kernels.cpu_decode import resolve_backend
from attnconv.model_shape import config_value, max_positions
from attnconv.patches import attnconv_mla
from attnconv.patches.decode_attention import decode_attention
from attnconv.patches.decode_cache import LatentKVCache, PreallocatedKVCache
from attnconv.patches.decode_linear import packed_linears
from attnconv.patches.deepseek_v3 import mla_decode


@dataclass
class GreedyResult:
    tokens: torch.Tensor  # [b, new_tokens], the greedy continuation
    prefill_s: float  # prompt forward + first token
    decode_s: float  # the new_tokens - 1 one-token steps after it
    kv_bytes: int  # nbytes of the preallocated cache tensors
    prefill_logits: torch.Tensor | None = None  # [b, s, vocab] when asked for


def unsupported_reason(model) -> str | None:
    """Why attnconv's decode loop cannot run MODEL, or None when it can."""
    family = family_of(model.config)
    if family is None or not family.decode:
        supported = ", ".join(f.name for f in FAMILIES.values() if f.decode)
        return (f"attnconv's decode loop does not support model type "
                f"{getattr(model.config, 'model_type', None)!r}; supported: {supported}")
    check = _CACHES[family.decode_cache][1]
    return check(model) if check is not None else None


def check_supported(model) -> None:
    reason = unsupported_reason(model)
    if reason is not None:
        raise AttnconvError(f"{reason}. Run eval without --decode for this model")


def _cache_keyword(model) -> str:
    """transformers renamed the forward's `past_key_values` to `cache` (the old name warns, then goes)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def _padding_masks(attention_mask: torch.Tensor, total: int):
    """For left-padded prompts: positions [b, s], the prefill keep-mask [b, 1, s, s] and the decode keep-mask
    [b, 1, 1, total] (sliced to the filled length by the attention). Causality is added by the attention."""
    batch, prompt_len = attention_mask.shape
    keep = torch.ones(batch, total, dtype=torch.bool, device=attention_mask.device)  # [b, total]
    keep[:, :prompt_len] = attention_mask.bool()
    # a pad query also sees itself, so no row is fully masked (that would give NaN that reaches real tokens)
    eye = torch.eye(prompt_len, dtype=torch.bool, device=attention_mask.device)
    prefill = keep[:, None, None, :prompt_len] | eye  # [b, 1, s, s]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [b, s], as generate() numbers them
    return positions, prefill, keep[:, None, None, :]


def _keys_as_rows(config, dtype: torch.dtype, device: torch.device, backend: str) -> bool:
    """Keep the CPU cache's keys as rows for attnconv's grouped-query scores kernel: float32, 2+ query heads per
    KV head (with one, BLAS over transposed keys streams at full speed), a head size that is a multiple of 8."""
    if device.type != "cpu" or dtype != torch.float32 or backend != "native":
        return False
    shape = cache_shape(config)
    return shape.n_heads // shape.n_kv_heads >= 2 and shape.head_dim % 8 == 0


def _kv(model, batch: int, total: int, dtype: torch.dtype, device: torch.device, backend: str):
    cache = PreallocatedKVCache(model.config, batch, total, dtype, device,
                                keys_as_rows=_keys_as_rows(model.config, dtype, device, backend))
    return cache, decode_attention(model)


def _deepseek_latent(model, batch: int, total: int, dtype: torch.dtype, device: torch.device, backend: str):
    """MLA: the latent cache, absorbed one-token steps."""
    return LatentKVCache(model.config, batch, total, dtype, device), mla_decode(model, backend)


def _attnconv_latent(model, batch: int, total: int, dtype: torch.dtype, device: torch.device, backend: str):
    """attnconv's MLA format: latent + RoPE keys per KV head."""
    cache = attnconv_mla.RopeLatentKVCache(model, batch, total, dtype, device)
    return cache, attnconv_mla.attnconv_mla_decode(model, backend)


# a family record's decode_cache -> (its cache and attention, why a model of it cannot run or None)
_CACHES = {"kv": (_kv, None), "deepseek_latent": (_deepseek_latent, None),
           "attnconv_latent": (_attnconv_latent, attnconv_mla.unsupported_reason)}


def _cache_and_attention(model, batch: int, total: int, dtype: torch.dtype, device: torch.device, backend: str):
    """The loop's cache for `batch x total` tokens and the context manager of its attention, by family."""
    return _CACHES[family_of(model.config).decode_cache][0](model, batch, total, dtype, device, backend)


@torch.inference_mode()
def greedy_generate(model, input_ids: torch.Tensor, new_tokens: int, *, attention_mask: torch.Tensor | None = None,
                    keep_prefill_logits: bool = False, packed: bool = True, kernel: str = "auto") -> GreedyResult:
    """Greedy continuation of `input_ids` ([b, s]) by `new_tokens` tokens, timed.

    attention_mask: [b, s] with 0 on left padding, or None for same-length prompts (the fast path: no mask).
    The cache is sized once for s + new_tokens tokens. Timings synchronise the device before each clock read.
    packed: on CPU in float32, run the Linear layers through the few-row kernel (`kernel`: auto, native, torch)
    or oneDNN with weights packed once (packed_linear.py).
    """
    check_supported(model)
    if new_tokens < 1:
        raise AttnconvError(f"new_tokens must be at least 1, got {new_tokens}")
    device = model_device(model)
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    total = prompt_len + new_tokens
    limit = max_positions(model.config)
    if limit is not None and total > limit:
        raise AttnconvError(f"{prompt_len} prompt + {new_tokens} new tokens exceed the model's {limit} positions; "
                            "use a shorter context")
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    backend = resolve_backend(kernel)
    cache, attention = _cache_and_attention(model, batch, total, dtype, device, backend)
    cache_kw = _cache_keyword(model)
    tokens = torch.empty(batch, new_tokens, dtype=torch.long, device=device)
    if attention_mask is not None and not bool(attention_mask.all()):
        positions, prefill_mask, step_mask = _padding_masks(attention_mask.to(device), total)
        position = positions[:, -1:].clone()  # [b, 1], advanced in place every step
    else:
        positions = torch.arange(prompt_len, device=device)[None]
        prefill_mask = step_mask = None
        position = torch.full((1, 1), prompt_len - 1, dtype=torch.long, device=device)
    with attention, packed_linears(model, packed, backend):
        synchronize(device)
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, attention_mask=prefill_mask, position_ids=positions, **{cache_kw: cache},
                    use_cache=True, logits_to_keep=0 if keep_prefill_logits else 1)
        prefill_logits = out.logits if keep_prefill_logits else None  # [b, s, vocab]
        next_token = out.logits[:, -1].argmax(-1)  # [b]
        tokens[:, 0] = next_token
        synchronize(device)
        t1 = time.perf_counter()
        for i in range(1, new_tokens):
            position += 1
            logits = model(input_ids=next_token[:, None], attention_mask=step_mask, position_ids=position,
                           **{cache_kw: cache}, use_cache=True).logits  # [b, 1, vocab]
            next_token = logits[:, -1].argmax(-1)
            tokens[:, i] = next_token
        synchronize(device)
        t2 = time.perf_counter()
    return GreedyResult(tokens, t1 - t0, t2 - t1, cache.nbytes, prefill_logits)


WARMUP_PROMPT = 32  # warm-up runs use a short prompt: they only need to touch the kernels, threads and allocator
BASELINES = (("hf-static", "static"), ("hf-dynamic", "dynamic"))


def clamp_contexts(contexts: Sequence[int], limit: int | None, new_tokens: int, notes: list[str]) -> list[int]:
    """Contexts that fit the model's positions together with the new tokens; clamped ones are noted."""
    kept: list[int] = []
    for ctx in contexts:
        if limit is not None and ctx + new_tokens > limit:
            clamped = limit - new_tokens
            if clamped < 1:
                raise AttnconvError(f"the model's {limit} positions leave no room for {new_tokens} new tokens; "
                                    "ask for fewer new tokens")
            notes.append(f"context {ctx} clamped to {clamped}: the model has {limit} positions "
                         f"and {new_tokens} are generated")
            ctx = clamped
        if ctx not in kept:
            kept.append(ctx)
    return kept


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on DEVICE (free GPU memory; MemAvailable on Linux), None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def grid_memory(config, batch: int, ctx: int, new_tokens: int, dtype_bytes: int) -> tuple[int, int]:
    """(KV cache bytes, activation bytes) one grid point needs at its peak: the cache for ctx + new_tokens tokens
    (one implementation's at a time), and the prefill's hidden states, MLP and prompt ids (an estimate: a few
    hidden-sized and intermediate-sized tensors per token)."""
    kv = cache_shape(config).bytes(batch, ctx + new_tokens, dtype_bytes)
    hidden = config_value(config, "hidden_size", "n_embd", default=0)
    inner = config_value(config, "intermediate_size", "n_inner", default=None) or 4 * hidden
    per_token = (6 * hidden + 3 * inner) * dtype_bytes + 8
    return kv, batch * ctx * per_token


def check_grid_fits(config, batches, contexts, new_tokens: int, dtype_bytes: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a grid whose largest point needs more memory than DEVICE has."""
    free = available_memory(device)
    if free is None:
        return
    batch, ctx = max(batches), max(contexts)
    kv, act = grid_memory(config, batch, ctx, new_tokens, dtype_bytes)
    if kv + act > free:
        gib = 1 << 30
        raise AttnconvError(f"the decode grid's largest point (batch {batch}, context {ctx}) needs about "
                            f"{(kv + act) / gib:,.1f} GiB ({kv / gib:,.1f} GiB of KV cache + about "
                            f"{act / gib:,.1f} GiB of activations) but {device.type} has {free / gib:,.1f} GiB "
                            "available; lower --batches or --contexts")


def _row(impl, batch, ctx, new_tokens, runs, kv_theory, kv_measured, peak, step_bytes, bandwidth):
    """One grid point from its timed runs [(prefill_s, decode_s)]: the median run, with the spread of tokens/s."""
    steps = new_tokens - 1  # the first new token comes out of the prefill
    rates = sorted(batch * steps / decode_s for _, decode_s in runs)
    tokens_per_s = statistics.median(rates)
    decode_s = batch * steps / tokens_per_s
    roofline = batch * bandwidth / step_bytes  # every sequence of the batch gets a token per step
    return {"impl": impl, "batch": batch, "context": ctx, "prefill_s": statistics.median(p for p, _ in runs),
            "tokens_per_s": tokens_per_s, "tokens_per_s_min": rates[0], "tokens_per_s_max": rates[-1],
            "runs": len(runs), "ms_per_token": 1000 * decode_s / steps, "kv_bytes_theoretical": kv_theory,
            "kv_bytes_measured": kv_measured, "peak_mem_bytes": peak, "roofline_tokens_per_s": roofline,
            "bandwidth_fraction": tokens_per_s / roofline}


def _timed_runs(model, prompt, new_tokens, cache_impl, backend, repeats, device):
    """One untimed warm-up on a short prompt, then `repeats` timed runs: (tokens, [(prefill_s, decode_s)],
    measured KV bytes, peak memory)."""
    warm = prompt[:, :min(prompt.shape[1], WARMUP_PROMPT)]
    runs, peak_bytes = [], 0
    if cache_impl is None:
        greedy_generate(model, warm, min(new_tokens, 4), kernel=backend)
    else:
        time_generate(model, warm, min(new_tokens, 4), cache_impl)
    for _ in range(repeats):
        with PeakMemory(device) as peak:
            if cache_impl is None:
                run = greedy_generate(model, prompt, new_tokens, kernel=backend)
                tokens, timing = run.tokens, (run.prefill_s, run.decode_s, run.kv_bytes)
            else:
                tokens, *timing = time_generate(model, prompt, new_tokens, cache_impl)
        runs.append(timing[:2])
        peak_bytes = max(peak_bytes, peak.peak or 0)
    return tokens, runs, timing[2], peak_bytes


def _baselines(config, notes: list[str]) -> list[tuple[str, str]]:
    """generate()'s cache implementations that can run this model."""
    if family_of(config).decode_cache == "attnconv_latent":
        notes.append("hf-static not measured: transformers' StaticCache gives the values slot the keys' head count, "
                     "and attnconv's MLA format caches per-KV-head RoPE keys beside one latent")
        return [b for b in BASELINES if b[1] != "static"]
    return list(BASELINES)


@torch.inference_mode()
def decode_benchmark(model, *, contexts=(512, 2048, 8192), batches=(1, 8), new_tokens=32, baseline=True,
                     kernel: str = "auto", repeats: int = 1, progress: bool = True) -> dict:
    """Decode speed of attnconv's loop (and transformers generate(), static and dynamic cache) over a grid.

    Per (batch, context): random prompt ids (seeded), one untimed warm-up with a short prompt, then `repeats` timed
    runs; the median is reported with the fastest and slowest. tokens_per_s = batch x (new_tokens - 1) / time of
    the one-token steps after the prefill (prefill_s apart). Roofline: bytes read per step (weights + the KV cache
    filled on average over the run) / measured bandwidth.
    """
    check_supported(model)
    if new_tokens < 2:
        raise AttnconvError(f"the decode benchmark needs at least 2 new tokens to time a decode step, got {new_tokens}")
    backend = resolve_backend(kernel)
    device, config = model_device(model), model.config
    notes: list[str] = []
    grid_contexts = clamp_contexts(contexts, max_positions(config), new_tokens, notes)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    shape, dtype_bytes = cache_shape(config), torch.tensor([], dtype=dtype).element_size()
    check_grid_fits(config, batches, grid_contexts, new_tokens, dtype_bytes, device)
    bandwidth = measure_bandwidth(device)
    weights = weight_bytes_per_step(model)
    notes.append(f"bandwidth {bandwidth / 1e9:.1f} GB/s: best of 5 torch.sum over a 256 MiB fp32 tensor on "
                 f"{device} with {torch.get_num_threads()} threads")
    if device.type == "cpu" and dtype == torch.float32:
        notes.append("Linear layers: attnconv's AVX2 kernel for <= 8 rows, oneDNN with packed weights above"
                     if backend == "native" else "Linear layers: oneDNN with packed weights")
    notes.append(f"bytes read per decode step: {weights / 1e6:.1f} MB of weights + batch x (context + new_tokens/2)"
                 f" x {shape.bytes_per_token(dtype_bytes)} KV bytes per token")
    notes.append(f"tokens/s: median of {repeats} timed run(s) after a warm-up, with the fastest and slowest")
    if device.type != "cuda":
        notes.append("peak_mem_bytes: process resident-set peak during the timed runs (VmHWM, reset per run)")
    impls = [("attnconv", None)] + (_baselines(config, notes) if baseline else [])
    generator = torch.Generator().manual_seed(0)
    rows, mismatches = [], []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("decode benchmark", total=len(batches) * len(grid_contexts) * len(impls))
        for batch in batches:
            for ctx in grid_contexts:
                prompt = torch.randint(0, config.vocab_size, (batch, ctx), generator=generator).to(device)
                kv_theory = shape.bytes(batch, ctx + new_tokens, dtype_bytes)
                step_bytes = weights + batch * (ctx + new_tokens / 2) * shape.bytes_per_token(dtype_bytes)
                for impl, cache_impl in impls:
                    bar.update(task, description=f"{impl} batch {batch} context {ctx}")
                    tokens, runs, kv_measured, peak = _timed_runs(model, prompt, new_tokens, cache_impl, backend,
                                                                  repeats, device)
                    if cache_impl is None:
                        ours = tokens
                    elif not torch.equal(tokens, ours):
                        mismatches.append(f"{impl} batch {batch} context {ctx}")
                    rows.append(_row(impl, batch, ctx, new_tokens, runs, kv_theory, kv_measured, peak, step_bytes,
                                     bandwidth))
                    bar.advance(task)
    if baseline:  # random weights give near-ties where kernels' rounding may pick another token: say so
        notes.append("greedy tokens equal generate()'s at every grid point" if not mismatches else
                     f"greedy tokens differ from generate()'s at: {', '.join(mismatches)}")
    return {"rows": rows, "notes": notes, "bandwidth_bytes_per_s": bandwidth}
