"""Tokens/s and peak memory: attnconv's uptrain loop vs a plain transformers Trainer, side by side.

Same random Llama-like GQA model, same packed Tiny Shakespeare blocks (GPT-2 tokenizer), same batch,
AdamW (fused, Trainer's default), cosine schedule, clipping at 1.0, logging every step, in fp32 and
bf16 autocast. Each run is a fresh subprocess so its peak memory is its own: on CPU the peak resident
set (VmHWM, reset after the model is loaded) minus the resident set at that moment; on CUDA
torch.cuda.max_memory_allocated. Runs come in pairs of alternating order (ours, Trainer; Trainer, ours; ...)
so that load from other processes hits both alike; the speedup is the median of the pairs' ratios, and
best/best the ratio of each program's fastest run (on a shared machine interference only slows). Speed is
the median step-end to step-end time after the warm-up steps, taken once the device has finished (Trainer's
own per-step callbacks fire before its per-step sync). attnconv runs as
`attnconv uptrain` does: Liger's RMSNorm/RoPE/SwiGLU on CUDA when installed, `--loss-kernel` (default auto),
in the process settings the command sets (huge pages for torch's allocator, a malloc that keeps freed memory;
`--trainer-settings` gives Trainer the same).
Target: >= 1.2x Trainer's tokens/s at equal or lower memory.

    python benchmarks/uptrain.py [--steps 6] [--warmup-steps 2] [--batch 4] [--seq-len 256] [--threads 1]
                             [--dtypes fp32,bf16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from attnconv.runtime import attnconv_env, keep_freed_memory


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    """Reset the peak RSS (Linux clear_refs 5) / CUDA peak; returns the current baseline in bytes."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _rss_kib("VmRSS") * 1024


def _peak() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _rss_kib("VmHWM") * 1024


def _model_and_blocks(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from attnconv.testing import TOKENIZER_DIR
    from attnconv.textdata import tinyshakespeare_split
    from attnconv.uptrain.data import pack_blocks, tokenize_cached

    cfg = LlamaConfig(vocab_size=50257, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 64 * 64,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                      max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa")
    stream, _ = tokenize_cached([tinyshakespeare_split("train")], AutoTokenizer.from_pretrained(TOKENIZER_DIR),
                                Path(tempfile.gettempdir()) / "attnconv-bench-tokens")
    return model, pack_blocks(stream, args.seq_len + 1)  # [n, seq_len + 1]


def worker_ours(args, model, blocks) -> list[float]:
    from accelerate import Accelerator

    from attnconv.patches.liger import apply_liger
    from attnconv.uptrain.trainer import TrainConfig, train

    apply_liger(model)  # as `attnconv uptrain` does: Liger's RMSNorm/RoPE/SwiGLU on CUDA when installed
    acc = Accelerator(mixed_precision="bf16" if args.dtype == "bf16" else "no", cpu=not torch.cuda.is_available())
    cfg = TrainConfig(steps=args.warmup_steps + args.steps, seq_len=args.seq_len, batch_size=args.batch, lr=1e-4,
                      loss_kernel=args.loss_kernel)
    with tempfile.TemporaryDirectory() as run_dir:
        r = train(acc, model, blocks, cfg, Path(run_dir), show_progress=False)
    print(json.dumps({"loss_kernel": r["loss_kernel"]}), file=sys.stderr)
    ends = [row["elapsed_s"] for row in r["log"]]
    return [args.batch * args.seq_len / (b - a) for a, b in zip(ends, ends[1:], strict=False)]


def worker_trainer(args, model, blocks) -> list[float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):  # seq_len tokens through the model, like ours (the model shifts labels)
            return {"input_ids": blocks[i, :-1], "labels": blocks[i, :-1]}

    class Clock(TrainerCallback):
        """Step-end to step-end wall time, after the device has finished (Trainer logs after on_step_end)."""

        def __init__(self):
            self.last, self.rates = None, []

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self.last is not None:
                self.rates.append(args.batch * args.seq_len / (now - self.last))
            self.last = now

    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, learning_rate=1e-4,
                                  max_steps=args.warmup_steps + args.steps, lr_scheduler_type="cosine",
                                  max_grad_norm=1.0, bf16=args.dtype == "bf16", use_cpu=not torch.cuda.is_available(),
                                  logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                                  dataloader_num_workers=0, seed=0)
        Trainer(model=model, args=targs, train_dataset=Blocks(), callbacks=[clock]).train()
    return clock.rates


def run_worker(args) -> None:
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    model, blocks = _model_and_blocks(args)
    base = _reset_peak()
    rates = (worker_ours if args.worker == "ours" else worker_trainer)(args, model, blocks)
    # rates[i] is the cycle from the end of step i + 1 to the end of step i + 2: skip the warm-up steps.
    print(json.dumps({"tokens_per_s": statistics.median(rates[args.warmup_steps - 1:]), "peak_bytes": _peak() - base,
                      "params": sum(p.numel() for p in model.parameters())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6, help="timed steps per run")
    p.add_argument("--warmup-steps", type=int, default=2, help="untimed first steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2, help="a converted (GQA) model")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fair on shared, busy cores)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--repeat", type=int, default=3, help="run pairs; the speedup is the median of the pairs' ratios")
    p.add_argument("--loss-kernel", default="auto", help="attnconv's loss kernel (auto, torch, liger, reference)")
    p.add_argument("--trainer-settings", action="store_true",
                   help="run Trainer in attnconv's process settings too (huge pages, kept freed memory)")
    p.add_argument("--worker", choices=["ours", "trainer"], help=argparse.SUPPRESS)
    p.add_argument("--keep-freed-memory", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return run_worker(args)
    skip = ("worker", "dtype", "dtypes", "trainer_settings", "keep_freed_memory")
    common = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in skip]
    rows = []
    for dtype in args.dtypes.split(","):
        res: dict[str, list[dict]] = {"ours": [], "trainer": []}
        for r in range(args.repeat):  # pairs in alternating order: load from other processes hits both alike
            for who in (("ours", "trainer") if r % 2 == 0 else ("trainer", "ours")):
                cmd = [sys.executable, __file__, *common, f"--worker={who}", f"--dtype={dtype}"]
                # Ours runs in the process settings the `attnconv` command sets (huge pages for torch's
                # allocator, kept freed memory); Trainer as a plain script would, unless --trainer-settings.
                same = who == "ours" or args.trainer_settings
                env = attnconv_env() if same else None
                cmd += ["--keep-freed-memory"] if same else []
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{who} {dtype} failed:\n{proc.stderr[-3000:]}")
                res[who].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        o, t = res["ours"], res["trainer"]
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(o, t, strict=True)]
        rows.append({"dtype": dtype, "params_M": round(o[0]["params"] / 1e6, 1),
                     "ours_tok_s": round(statistics.median(x["tokens_per_s"] for x in o), 1),
                     "trainer_tok_s": round(statistics.median(x["tokens_per_s"] for x in t), 1),
                     "speedup": round(statistics.median(ratios), 3), "speedups": [round(x, 3) for x in ratios],
                     "ours_peak_MiB": round(max(x["peak_bytes"] for x in o) / 2**20),
                     "trainer_peak_MiB": round(max(x["peak_bytes"] for x in t) / 2**20)})
        rows[-1]["memory_ratio"] = round(rows[-1]["ours_peak_MiB"] / max(rows[-1]["trainer_peak_MiB"], 1), 3)
        # On a shared machine other tenants only ever slow a run down: the fastest runs are the least disturbed.
        rows[-1]["ours_runs"] = [round(x["tokens_per_s"], 1) for x in o]
        rows[-1]["trainer_runs"] = [round(x["tokens_per_s"], 1) for x in t]
        rows[-1]["best_ratio"] = round(max(rows[-1]["ours_runs"]) / max(rows[-1]["trainer_runs"]), 3)
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    print(f"\nbatch {args.batch} x {args.seq_len}, {device}, median of {args.repeat} pairs")
    print(f"{'dtype':6} {'ours tok/s':>11} {'Trainer tok/s':>14} {'speedup':>8} {'best/best':>10} {'ours MiB':>9} "
          f"{'Trainer MiB':>12}")
    for r in rows:
        print(f"{r['dtype']:6} {r['ours_tok_s']:>11} {r['trainer_tok_s']:>14} {r['speedup']:>8} {r['best_ratio']:>10} "
              f"{r['ours_peak_MiB']:>9} {r['trainer_peak_MiB']:>12}")


if __name__ == "__main__":
    main()
