"""The training loop on accelerate: AdamW, warmup + schedule, clipping, accumulation, eval, checkpoints.

The same code runs in one process or under `accelerate launch` / `torchrun` (DDP): each process reads
its slice of every global batch (see BlockSchedule), and logged losses are means over all processes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from attnconv.errors import AttnconvError
from attnconv.uptrain.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from attnconv.uptrain.cpu_attention import cpu_training_attention
from attnconv.uptrain.data import BlockSchedule
from attnconv.uptrain.distill import DistillConfig, cross_entropy, training_loss
from attnconv.uptrain.fused_loss import install_fused_loss, loss_targets, remove_fused_loss

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass
class TrainConfig:
    steps: int
    seq_len: int
    batch_size: int  # per process, per micro-step
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: int = 0
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int | None = None
    save_every: int | None = None
    seed: int = 0
    distill: DistillConfig | None = field(default=None)
    loss_kernel: str = "auto"  # see attnconv.uptrain.fused_loss.LOSS_KERNELS


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel (one pass over all parameters) exists on CPU and CUDA; it is also Trainer's default.
    fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def clip_and_step(accelerator, optimizer, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients to max_norm (global L2) and take the optimizer step; returns the norm before clipping.

    A fused AdamW divides every gradient by its `grad_scale` in the step's own pass (the attribute GradScaler sets
    for it), so the clip factor goes there instead of into a separate pass over all gradients: on CPU at 102 M
    parameters that pass is ~20 ms a step. Same result to rounding. Where gradients are sharded (FSDP, DeepSpeed)
    or a GradScaler is in use, accelerate's own clipping.
    """
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", optimizer)  # under AcceleratedOptimizer
    plain = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)
    if not (max_norm > 0 and plain and accelerator.scaler is None and inner.defaults.get("fused")
            and getattr(inner, "grad_scale", None) is None and hasattr(torch.nn.utils, "get_total_norm")):
        norm = accelerator.clip_grad_norm_(params, max_norm)
        optimizer.step()
        return norm
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], 2.0, foreach=True)
    inner.grad_scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)  # clip_grad_norm_'s factor, inverted
    try:
        optimizer.step()
    finally:
        del inner.grad_scale
    return norm


@torch.no_grad()
def evaluate(accelerator, model, windows: torch.Tensor, batch_size: int) -> float:
    """Perplexity over held-out windows [n, seq_len + 1]; each process scores its share, sums are reduced."""
    net = accelerator.unwrap_model(model)  # no DDP hooks: processes may score different numbers of batches
    was_training = net.training
    net.eval()
    mine = windows[accelerator.process_index::accelerator.num_processes]
    nll = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [sum of token NLL, tokens]
    for i in range(0, len(mine), batch_size):
        batch = mine[i:i + batch_size].to(accelerator.device)  # [b, seq_len + 1]
        with accelerator.autocast():
            logits = net(input_ids=batch[:, :-1], use_cache=False).logits  # [b, seq_len, V]
        n = batch[:, 1:].numel()
        nll += torch.tensor([cross_entropy(logits, batch[:, 1:]).item() * n, n], dtype=torch.float64,
                            device=accelerator.device)
    nll = accelerator.reduce(nll, reduction="sum")
    net.train(was_training)
    return math.exp(nll[0].item() / max(nll[1].item(), 1.0))


def _progress(enabled: bool, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("uptrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), disable=not enabled, transient=False)
    task = progress.add_task("uptrain", total=total, completed=start, info="")
    return progress, task


def _read_log(path: Path, upto: int) -> list[dict]:
    """Log lines of steps <= upto (a resumed run rewrites the steps after its checkpoint)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def train(accelerator, model, blocks: torch.Tensor, cfg: TrainConfig, run_dir: Path, *, teacher=None,
          eval_windows: torch.Tensor | None = None, resume: bool = False, data_key: str = "",
          show_progress: bool = True) -> dict:
    """Train `model` in place for cfg.steps optimizer steps; returns a summary (final loss, ppl, speed)."""
    schedule = BlockSchedule(len(blocks), cfg.batch_size, cfg.grad_accum, accelerator.num_processes, cfg.seed)
    schedule.check("the training data")
    params = [p for p in model.parameters() if p.requires_grad]
    # Without a teacher only the loss is needed, not the logits: the output layer computes it in chunks.
    head = install_fused_loss(model, cfg.loss_kernel, accelerator.device,
                              cfg.batch_size * cfg.seq_len) if teacher is None else None
    try:
        # On CPU, causal attention in query blocks (the flash kernel computes the masked half below 768 tokens).
        with cpu_training_attention(model, accelerator.device):
            return _train(accelerator, model, blocks, cfg, run_dir, schedule, params, head, teacher=teacher,
                          eval_windows=eval_windows, resume=resume, data_key=data_key, show_progress=show_progress)
    finally:
        remove_fused_loss(accelerator.unwrap_model(model), head)


def _train(accelerator, model, blocks, cfg: TrainConfig, run_dir: Path, schedule: BlockSchedule, params, head, *,
           teacher, eval_windows, resume: bool, data_key: str, show_progress: bool) -> dict:
    optimizer = make_optimizer(params, cfg, accelerator.device)
    from transformers import get_scheduler

    scheduler = get_scheduler(SCHEDULES[cfg.schedule], optimizer, num_warmup_steps=cfg.warmup,
                              num_training_steps=cfg.steps)
    # The scheduler stays unprepared: accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    if teacher is not None:
        teacher.to(accelerator.device).eval().requires_grad_(False)

    ckpt_root, log_path = run_dir / "checkpoints", run_dir / "train_log.jsonl"
    start, log_rows = 0, []
    last = latest_checkpoint(ckpt_root) if resume else None
    if last is not None:
        state = load_checkpoint(accelerator, last, model, optimizer, scheduler)
        if state.get("world") != accelerator.num_processes or state.get("data_key") != data_key:
            raise AttnconvError(f"{last} was written by a run with other data or another number of processes "
                                f"({state.get('world')}); resume with the same --data and process count")
        changed = _changed_settings(state.get("config", {}), _jsonable(cfg))
        if changed:
            raise AttnconvError(f"{last} was written with other settings ({', '.join(changed)}); resume with the "
                                "settings of the interrupted run, or start over with --overwrite")
        start, log_rows = state["step"], _read_log(log_path, state["step"])
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in log_rows))
    tokens_per_step = schedule.global_batch * cfg.seq_len
    last_ppl = None
    t_begin, steps_timed = time.perf_counter(), 0
    model.train()
    progress, task = _progress(show_progress and accelerator.is_main_process, cfg.steps, start)
    with progress, open(log_path, "a") if accelerator.is_main_process else _nowhere() as log:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            sums = torch.zeros(3, device=accelerator.device)  # [loss, ce, kl] summed over micro-steps
            for idx in schedule.micro_batches(step, accelerator.process_index):
                batch = blocks[idx].to(accelerator.device, non_blocking=True)  # [b, seq_len + 1]
                inputs, targets = batch[:, :-1], batch[:, 1:]
                with accelerator.accumulate(model):
                    if head is not None:
                        with loss_targets(head, targets):
                            loss = model(input_ids=inputs, use_cache=False).logits  # the mean CE, a scalar
                        parts = {"ce": loss.detach()}
                    else:
                        logits = model(input_ids=inputs, use_cache=False).logits  # [b, seq_len, V]
                        teacher_logits = None
                        if teacher is not None:
                            with torch.no_grad(), accelerator.autocast():
                                teacher_logits = teacher(input_ids=inputs, use_cache=False).logits
                        loss, parts = training_loss(logits, targets, teacher_logits, cfg.distill)
                        del logits, teacher_logits  # [b, s, V] each: not needed by backward, free them before it
                    accelerator.backward(loss)
                    sums += torch.stack([loss.detach().float(), parts["ce"].float(),
                                         parts.get("kl", torch.zeros((), device=loss.device)).float()])
                    if accelerator.sync_gradients:
                        means = accelerator.reduce(sums / cfg.grad_accum, reduction="mean")
                        if not torch.isfinite(means[0]):
                            optimizer.zero_grad(set_to_none=True)
                            prev = latest_checkpoint(ckpt_root)
                            kept = f"the last good checkpoint is {prev}" if prev else "no checkpoint was saved yet"
                            raise AttnconvError(f"the loss became {means[0].item()} at step {step + 1}; training "
                                                f"stopped and {kept}; lower --lr or check the data")
                        lr_now = scheduler.get_last_lr()[0]
                        grad_norm = clip_and_step(accelerator, optimizer, params, cfg.max_grad_norm)
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            steps_timed += 1
            row = {"step": step + 1, "loss": means[0].item(), "lr": lr_now, "tokens": (step + 1) * tokens_per_step,
                   "tokens_per_s": tokens_per_step / dt, "grad_norm": float(grad_norm)}
            row["elapsed_s"] = time.perf_counter() - t_begin  # after the syncs above: device work is done
            if cfg.distill is not None:
                row.update(ce=means[1].item(), kl=means[2].item())
            done = step + 1
            if eval_windows is not None and (cfg.eval_every and done % cfg.eval_every == 0 or done == cfg.steps):
                last_ppl = evaluate(accelerator, model, eval_windows, cfg.batch_size)
                row["eval_ppl"] = last_ppl
            log_rows.append(row)
            if accelerator.is_main_process:
                log.write(json.dumps(row) + "\n")
                log.flush()
            progress.update(task, completed=done,
                            info=f"loss {row['loss']:.4f}  {row['tokens_per_s']:,.0f} tok/s")
            if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
                save_checkpoint(accelerator, ckpt_root, model, optimizer, scheduler,
                                {"step": done, "world": accelerator.num_processes, "data_key": data_key,
                                 "samples_seen": done * schedule.global_batch,
                                 "epoch": done // schedule.steps_per_epoch, "config": _jsonable(cfg)})
    elapsed = time.perf_counter() - t_begin
    new_rows = log_rows[len(log_rows) - steps_timed:] if steps_timed else []
    return {
        "steps": cfg.steps, "resumed_from": start, "tokens": cfg.steps * tokens_per_step,
        "final_loss": log_rows[-1]["loss"] if log_rows else None, "eval_ppl": last_ppl,
        "tokens_per_s": (steps_timed * tokens_per_step / elapsed) if steps_timed else None,
        "seconds": elapsed, "log": log_rows, "steps_this_run": len(new_rows),
        "model": accelerator.unwrap_model(model),
        "loss_kernel": head.backend if head is not None else "reference",
    }


def _jsonable(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg)))


def _changed_settings(saved: dict, now: dict) -> list[str]:
    """Settings that decide the data order, the schedule or the loss; eval/save frequency may change."""
    free = {"eval_every", "save_every", "loss_kernel"}  # kernels give the same losses to rounding
    return [f"{k}: {saved.get(k)} -> {v}" for k, v in now.items() if k not in free and saved.get(k) != v]


class _nowhere:
    """A do-nothing log file for processes other than the main one."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass

    def flush(self):
        pass
