"""`uptrain()`: the typed library function behind `attnconv uptrain` (and the demo script).

Layout on disk while training: `OUT.uptrain-run/` holds `checkpoints/step-N/` and the live
`train_log.jsonl`; `--resume` continues from its last complete checkpoint. When training ends, the
model (saved like its input, safetensors, in its input dtype), tokenizer, `train_log.jsonl` and
`attnconv.json` appear in OUT in one rename, then the run folder is removed (unless keep_checkpoints).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import torch

from attnconv.errors import AttnconvError
from attnconv.kernels.linear_cross_entropy import cpu_has_fast_bf16
from attnconv.kv import max_positions
from attnconv.outputs import atomic_output_dir, check_output_dir
from attnconv.uptrain.checkpoint import latest_checkpoint
from attnconv.uptrain.data import BlockSchedule, eval_windows, pack_blocks, tokenize_cached
from attnconv.uptrain.distill import DistillConfig
from attnconv.uptrain.model_setup import apply_liger, enable_gradient_checkpointing, select_trainable
from attnconv.uptrain.trainer import SCHEDULES, TrainConfig
from attnconv.uptrain.trainer import train as run_training

DTYPE_CHOICES = {"fp32": "no", "float32": "no", "bf16": "bf16", "bfloat16": "bf16"}


def run_dir_for(out: Path) -> Path:
    return out.parent / f"{out.name}.uptrain-run"


def _check_settings(steps, tokens, seq_len, batch_size, grad_accum, lr, warmup, schedule, dtype, eval_data,
                    eval_every, save_every) -> None:
    if steps is not None and tokens is not None:
        raise AttnconvError("give --steps or --tokens, not both")
    for name, v in (("--steps", steps), ("--tokens", tokens), ("--eval-every", eval_every),
                    ("--save-every", save_every)):
        if v is not None and v < 1:
            raise AttnconvError(f"{name} must be a positive integer, not {v}")
    for name, v in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--grad-accum", grad_accum)):
        if v < 1:
            raise AttnconvError(f"{name} must be a positive integer, not {v}")
    if not (lr > 0 and math.isfinite(lr)):
        raise AttnconvError(f"--lr must be a positive number, not {lr}")
    if warmup < 0:
        raise AttnconvError(f"--warmup must be >= 0, not {warmup}")
    if schedule not in SCHEDULES:
        raise AttnconvError(f"--schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
    if dtype not in DTYPE_CHOICES:
        raise AttnconvError(f"--dtype must be bf16 or fp32, not {dtype!r}")
    if eval_every is not None and eval_data is None:
        raise AttnconvError("--eval-every needs --eval-data SPEC (held-out text to measure perplexity on)")


def _input_dtype(path: Path) -> torch.dtype:
    cfg = json.loads((path / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, name, torch.float32) if isinstance(name, str) else torch.float32


def _prepare_run_dir(out: Path, run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Apply the OUT / run-folder rules before any work; returns True when a checkpoint will be resumed."""
    has_ckpt = latest_checkpoint(run_dir / "checkpoints") is not None
    if resume and has_ckpt:
        return True
    if resume and out.exists() and not overwrite:
        raise AttnconvError(f"{out} already holds a finished run and {run_dir} has no checkpoint to resume; "
                            "pass --overwrite to train again from the input model")
    if not resume:
        check_output_dir(out, overwrite)
        if has_ckpt and not overwrite:
            raise AttnconvError(f"an unfinished run left checkpoints in {run_dir}; pass --resume to continue it "
                                "or --overwrite to start over")
    return False


def _load_teacher(teacher: str, student_tokenizer, student_config, dtype: str, allow_pickle: bool):
    from attnconv.hub import load_causal_lm, load_tokenizer

    t_tok = load_tokenizer(teacher)
    if t_tok.get_vocab() != student_tokenizer.get_vocab():
        raise AttnconvError(f"teacher {teacher} has another tokenizer than the model (their vocabularies differ); "
                            "distil from the model's own source")
    model = load_causal_lm(teacher, dtype="bf16" if dtype in ("bf16", "bfloat16") else "fp32",
                           allow_pickle=allow_pickle)
    if model.config.vocab_size != student_config.vocab_size:
        raise AttnconvError(f"teacher {teacher} has {model.config.vocab_size} logits per token but the model has "
                            f"{student_config.vocab_size}; distil from the model's own source")
    return model.requires_grad_(False)


def uptrain(model: str, out: str, *, data: str, steps: int | None = None, tokens: int | None = None,
            seq_len: int = 512, batch_size: int = 4, grad_accum: int = 1, lr: float = 1e-4, warmup: int = 0,
            schedule: str = "cosine", dtype: str = "fp32", teacher: str | None = None,
            distill_weight: float = 0.5, temperature: float = 1.0, train: str = "all",
            eval_data: str | None = None, eval_every: int | None = None, save_every: int | None = None,
            resume: bool = False, overwrite: bool = False, seed: int = 0, max_grad_norm: float = 1.0,
            weight_decay: float = 0.0, gradient_checkpointing: bool = False, tokenizer: str | None = None,
            allow_pickle: bool = False, cache_dir: str | None = None, max_eval_windows: int = 64,
            keep_checkpoints: bool = False, loss_kernel: str = "auto", progress: bool = True) -> dict:
    """Continue training MODEL on DATA and write the result to OUT; returns the run's summary.

    steps: optimizer steps; or tokens: training tokens (steps = ceil(tokens / tokens per step));
    neither: one pass over the data. batch_size is per process and micro-step; a step reads
    batch_size x grad_accum x processes blocks of seq_len + 1 tokens.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import set_seed

    from attnconv.hub import load_causal_lm, load_tokenizer, resolve_source
    from attnconv.textdata import Corpus

    _check_settings(steps, tokens, seq_len, batch_size, grad_accum, lr, warmup, schedule, dtype, eval_data,
                    eval_every, save_every)
    _check_loss_kernel(loss_kernel)
    distill = DistillConfig(distill_weight, temperature) if teacher is not None else None
    if distill is not None:
        distill.check()
    out_path = Path(out).expanduser().absolute()
    run_dir = run_dir_for(out_path)
    src = resolve_source(model, allow_pickle)
    will_resume = _prepare_run_dir(out_path, run_dir, resume, overwrite)

    # Accelerate keeps its state per process; a second uptrain() in one process (demo, tests) may change precision.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=DTYPE_CHOICES[dtype], gradient_accumulation_steps=grad_accum,
                              cpu=not torch.cuda.is_available())
    if accelerator.is_main_process and not will_resume and run_dir.exists():
        shutil.rmtree(run_dir)  # --overwrite, or --resume with nothing to resume
    accelerator.wait_for_everyone()
    set_seed(seed)

    tok = load_tokenizer(src, tokenizer)
    net = load_causal_lm(src, dtype="fp32", allow_pickle=allow_pickle, attn_implementation="sdpa")
    limit = max_positions(net.config)
    if limit is not None and seq_len > limit:
        raise AttnconvError(f"--seq-len {seq_len} is beyond the model's maximum of {limit} positions; "
                            f"use --seq-len {limit} or less")
    teacher_net = _load_teacher(teacher, tok, net.config, dtype, allow_pickle) if teacher is not None else None

    with accelerator.main_process_first():  # tokenise once; the other processes read the cache
        stream, data_key = tokenize_cached(Corpus(data), tok, cache_dir)
        eval_stream = tokenize_cached(Corpus(eval_data, default_split="test"), tok, cache_dir)[0] if eval_data else None
    blocks = pack_blocks(stream, seq_len + 1)  # [n_blocks, seq_len + 1]
    plan = BlockSchedule(len(blocks), batch_size, grad_accum, accelerator.num_processes, seed)
    plan.check(f"--data {data} ({len(stream)} tokens)")
    windows = None
    if eval_stream is not None:
        windows = eval_windows(eval_stream, seq_len, max_eval_windows)
        if len(windows) == 0:
            raise AttnconvError(f"--eval-data {eval_data} has {len(eval_stream)} tokens, fewer than one window of "
                                f"{seq_len + 1}; give more held-out text or lower --seq-len")
    tokens_per_step = plan.global_batch * seq_len
    if steps is None:
        steps = math.ceil(tokens / tokens_per_step) if tokens is not None else plan.steps_per_epoch

    trainable, total = select_trainable(net, train)
    if gradient_checkpointing:
        enable_gradient_checkpointing(net)
    net.config.use_cache = False
    liger = apply_liger(net)
    cfg = TrainConfig(steps=steps, seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
                      warmup=warmup, schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                      eval_every=eval_every, save_every=save_every, seed=seed, distill=distill,
                      loss_kernel=loss_kernel)
    slow_bf16 = dtype == "bf16" and accelerator.device.type == "cpu" and not cpu_has_fast_bf16()
    if accelerator.is_main_process and slow_bf16:
        print("uptrain: note: this CPU has no bf16 instructions; bf16 autocast runs several times slower here "
              "than --dtype fp32", file=sys.stderr)
    if accelerator.is_main_process and progress:
        print(f"uptrain: {trainable:,} of {total:,} parameters learn; {steps} steps of {tokens_per_step:,} tokens "
              f"on {accelerator.num_processes} process(es), {accelerator.device.type}"
              + (", resuming" if will_resume else ""), file=sys.stderr)
    result = run_training(accelerator, net, blocks, cfg, run_dir, teacher=teacher_net, eval_windows=windows,
                          resume=will_resume, data_key=data_key, show_progress=progress)
    trained = result.pop("model")
    log = result.pop("log")

    summary = {
        "source": str(model), "data": data, "data_tokens": int(len(stream)), "eval_data": eval_data,
        "settings": {"steps": steps, "seq_len": seq_len, "batch_size": batch_size, "grad_accum": grad_accum,
                     "processes": accelerator.num_processes, "lr": lr, "warmup": warmup, "schedule": schedule,
                     "weight_decay": weight_decay, "max_grad_norm": max_grad_norm, "dtype": dtype, "train": train,
                     "trainable_parameters": trainable, "gradient_checkpointing": gradient_checkpointing,
                     "liger_kernel": liger, "loss_kernel": result.pop("loss_kernel"), "seed": seed, "teacher": teacher,
                     "distill_weight": distill_weight if teacher else None,
                     "temperature": temperature if teacher else None},
        "results": result,
    }
    if accelerator.is_main_process:
        _write_output(src, out_path, trained, tok, log, summary, overwrite or will_resume or resume)
        if not keep_checkpoints:
            shutil.rmtree(run_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return {**summary, "out": str(out_path), "log": log}


def _check_loss_kernel(kernel: str) -> None:
    from attnconv.kernels.linear_cross_entropy import liger_available
    from attnconv.uptrain.fused_loss import LOSS_KERNELS

    if kernel not in LOSS_KERNELS:
        raise AttnconvError(f"--loss-kernel must be one of {', '.join(LOSS_KERNELS)}, not {kernel!r}")
    if kernel == "liger" and not liger_available():
        raise AttnconvError("--loss-kernel liger needs a CUDA GPU and liger-kernel (pip install 'attnconv[gpu]'); "
                            "use --loss-kernel auto")


def _write_output(src: Path, out: Path, net, tok, log: list[dict], summary: dict, replace: bool) -> None:
    """Model + tokenizer + train_log.jsonl + attnconv.json, appearing in OUT in one rename."""
    provenance = {}
    prev = src / "attnconv.json"
    if prev.is_file():
        try:
            loaded = json.loads(prev.read_text())
            provenance = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            provenance = {}
    provenance["uptrain"] = summary
    net = net.to(_input_dtype(src))
    with atomic_output_dir(out, overwrite=replace) as tmp:
        net.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        (tmp / "attnconv.json").write_text(json.dumps(provenance, indent=2) + "\n")
