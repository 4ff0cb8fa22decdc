"""Measurements behind `decode_benchmark`: memory bandwidth, peak memory, bytes read per step, generate() timing."""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path

import torch

_BANDWIDTH: dict[tuple[str, int], float] = {}
BANDWIDTH_BYTES = 256 * 2**20  # 8x a large server L3, so the sum streams from DRAM (HBM on a GPU)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: a 256 MiB fp32 tensor summed with torch.sum, best of `repeats` runs.

    A sum reads each byte once and writes nothing, like a decode step reading weights and KV cache. Measured with
    the current torch thread count and memoised per (device, threads).
    """
    key = (str(device), torch.get_num_threads())
    if key not in _BANDWIDTH:
        x = torch.ones(BANDWIDTH_BYTES // 4, dtype=torch.float32, device=device)
        x.sum()  # first touch and kernel warm-up
        best = float("inf")
        for _ in range(repeats):
            synchronize(device)
            t0 = time.perf_counter()
            x.sum()
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
        _BANDWIDTH[key] = x.nbytes / best
        del x
    return _BANDWIDTH[key]


class PeakMemory:
    """Peak memory over a block: CUDA max_memory_allocated, or on CPU the process's resident-set high-water mark.

    On Linux the RSS high-water mark (VmHWM) is reset through /proc/self/clear_refs so it covers this block only;
    where that is not possible it is resource.getrusage's ru_maxrss, the peak since the process started.
    """

    def __init__(self, device: torch.device):
        self.device, self.peak, self.since_start = device, None, False

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.since_start = True
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif not self.since_start:
            status = Path("/proc/self/status").read_text()
            self.peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return False


def weight_bytes_per_step(model) -> int:
    """Bytes of weights a decode step reads: every parameter once, except the input embedding table (only b rows
    of it are read), which counts only when it is tied to the output head."""
    seen, total = set(), 0
    embed = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    tied = out is not None and out.weight.data_ptr() == embed.data_ptr()
    for p in model.parameters():
        if p.data_ptr() in seen or (p is embed and not tied):
            continue
        seen.add(p.data_ptr())
        total += p.nbytes
    return total


class _StepClock:
    """A logits processor that only reads the clock: generate() calls it once per forward (prefill included)."""

    def __init__(self, device: torch.device):
        self.device, self.times = device, []

    def __call__(self, input_ids, scores):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def _cache_field(output) -> str:
    """transformers renamed outputs' `past_key_values` to `cache` (reading the old name warns, then goes)."""
    return "cache" if "cache" in {f.name for f in dataclasses.fields(output)} else "past_key_values"


def time_generate(model, input_ids: torch.Tensor, new_tokens: int, cache_implementation: str | None):
    """Greedy `generate()` of exactly `new_tokens` tokens. Returns (tokens, prefill_s, decode_s, kv_bytes)
    where decode_s covers the new_tokens - 1 forwards after the prefill, like attnconv's loop."""
    from transformers import LogitsProcessorList

    device = input_ids.device
    clock = _StepClock(device)
    pad = model.generation_config.pad_token_id
    if pad is None:
        eos = model.generation_config.eos_token_id
        pad = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    synchronize(device)
    t0 = time.perf_counter()
    out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, cache_implementation=cache_implementation,
                         logits_processor=LogitsProcessorList([clock]), pad_token_id=pad,
                         return_dict_in_generate=True)
    synchronize(device)
    cache = getattr(out, _cache_field(out))
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) if cache is not None else None
    tokens = out.sequences[:, input_ids.shape[1]:]
    return tokens, clock.times[0] - t0, clock.times[-1] - clock.times[0], kv_bytes
