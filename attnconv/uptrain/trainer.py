"""The training loop on accelerate: AdamW, warmup + schedule, clipping, accumulation, eval, checkpoints.

The same code runs in one process or under `accelerate launch` / `torchrun` (DDP, or FSDP2 with the parts in
attnconv.uptrain.sharded): each process reads its slice of every global batch (see BlockSchedule), and logged losses
are means over all processes.
A checkpoint records the run's identity (every setting that changes its mathematics, and the fingerprints of
its model, teacher, tokenizer and data); a resume with any of them changed is refused, listing what differs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnconv.errors import AttnconvError, Interrupted
from attnconv.patches.fused_loss import fused_loss, loss_targets
from attnconv.patches.training_attention import cpu_training_attention
from attnconv.uptrain import sharded
from attnconv.uptrain.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from attnconv.uptrain.data import BlockSchedule
from attnconv.uptrain.distill import DistillConfig, training_loss
from attnconv.uptrain.interrupt import StopRequest, stop_on_signals
from attnconv.uptrain.optim import clip_and_step, evaluate, make_optimizer
from attnconv.uptrain.settings import UptrainSettings

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup", "wsd": "warmup_stable_decay"}


@dataclass
class Run:
    """One training run: its settings, resolved step count, identity (see module docstring) and folder."""

    settings: UptrainSettings
    steps: int
    identity: dict[str, Any]
    run_dir: Path

    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "train_log.jsonl"


def _progress(enabled: bool, total: int, start: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("uptrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), disable=not enabled, transient=False)
    task = progress.add_task("uptrain", total=total, completed=start, info="")
    return progress, task


def read_log(path: Path, upto: int) -> list[dict]:
    """Log lines of steps <= upto (a resumed run rewrites the steps after its checkpoint); a line torn by a kill
    while it was written is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= upto:
            rows.append(row)
    return rows


def identity_differences(saved: dict, now: dict) -> list[str]:
    """`key: old -> new` for every part of a run's identity that changed. A setting added to attnconv after the
    saved run is no difference while it keeps its default (the run was made with that behaviour)."""
    from attnconv.uptrain.settings import UptrainSettings

    defaults = UptrainSettings.defaults()
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and not (k not in saved and k in defaults and now.get(k) == defaults[k])]


def train(accelerator, model, blocks, run: Run, *, teacher=None, eval_windows: torch.Tensor | None = None,
          resume: bool = False, show_progress: bool = True) -> dict:
    """Train `model` in place for run.steps optimizer steps; returns a summary (final loss, ppl, speed)."""
    s = run.settings
    schedule = BlockSchedule(len(blocks), s.batch_size, s.grad_accum, accelerator.num_processes, s.seed)
    schedule.check("the training data")
    params = [p for p in model.parameters() if p.requires_grad]
    # Without a teacher only the loss is needed, not the logits: the output layer computes it in chunks.
    kernel = s.loss_kernel if teacher is None else "reference"
    fsdp = sharded.is_sharded(accelerator)
    with fused_loss(model, kernel, accelerator.device, s.batch_size * s.seq_len) as head, \
            cpu_training_attention(model, accelerator.device), stop_on_signals() as stop:
        result = _train(accelerator, model, blocks, run, schedule, params, head, stop, teacher=teacher,
                        eval_windows=eval_windows, resume=resume, show_progress=show_progress)
        # Gathered while the fused loss head (which holds lm_head's shards) is still in the model.
        full_sd = sharded.gather_full_state_dict(result["model"]) if fsdp else None
    if fsdp:  # the config is back to the saved attention implementation here
        result["model"] = sharded.plain_model(result["model"], full_sd)
    return result


def _checked_state(accelerator, last: Path, now: dict, partial: bool = False) -> dict:
    """The state of checkpoint LAST when NOW (a run's identity) is the run that wrote it; else a one-line refusal
    that lists what differs. partial: NOW holds some of an identity's keys; only those are compared."""
    try:  # compared before any tensor is loaded: another run's optimizer state may not even fit
        state = json.loads((last / "state.json").read_text())
    except (OSError, ValueError):
        raise AttnconvError(f"{last}/state.json is unreadable; remove {last} to fall back to an earlier "
                            "checkpoint, or start over with --overwrite") from None
    fsdp = sharded.is_sharded(accelerator)
    sharded.check_resume(last, state, fsdp)
    saved = state.get("identity", {})
    if fsdp:  # DCP reshards: another number of processes may continue the same global batch
        saved, now = sharded.resume_identity(saved), sharded.resume_identity(now)
    elif state.get("world") != accelerator.num_processes:
        raise AttnconvError(f"{last} was written by {state.get('world')} process(es) and this run has "
                            f"{accelerator.num_processes}; resume with the same number of processes")
    if partial:
        saved = {k: v for k, v in saved.items() if k in now}
    changed = identity_differences(saved, now)
    if changed:
        raise AttnconvError(f"{last} was written by a different run ({'; '.join(changed)}); resume with the "
                            "settings and inputs of the interrupted run, or start over with --overwrite")
    return state


def refuse_other_settings(accelerator, ckpt_root: Path, settings: UptrainSettings) -> None:
    """Before anything is loaded, hashed or tokenised: a resume with settings other than its checkpoint's run is
    refused at once. The inputs, which settings name by path, are compared with their contents once read (_resume)."""
    last = latest_checkpoint(ckpt_root)
    if last is None:
        return
    inputs = settings.io_fields()
    now = {k: v for k, v in settings.run_values().items() if k not in inputs}
    if settings.steps is None:
        del now["steps"]  # resolved from the data
    _checked_state(accelerator, last, {**now, "processes": accelerator.num_processes}, partial=True)


def _resume(accelerator, run: Run, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    last = latest_checkpoint(run.ckpt_root)
    if last is None:
        return 0, []
    state = _checked_state(accelerator, last, run.identity)
    if sharded.is_sharded(accelerator):
        state = sharded.load_sharded_checkpoint(accelerator, last, model, optimizer, scheduler, run.settings.seed)
    else:
        state = load_checkpoint(accelerator, last, model, optimizer, scheduler)
    return state["step"], read_log(run.log_path, state["step"])


def _schedule_kwargs(s, steps: int) -> dict:
    if s.schedule != "wsd":
        return {}
    decay = min(round(s.decay_fraction * steps), steps - min(s.warmup, steps))
    return {"num_decay_steps": decay, "decay_type": "1-sqrt"}


def _train(accelerator, model, blocks, run: Run, schedule: BlockSchedule, params, head, stop: StopRequest, *,
           teacher, eval_windows, resume: bool, show_progress: bool) -> dict:
    from transformers import get_scheduler

    s = run.settings
    distill = DistillConfig(s.distill_weight, s.temperature) if teacher is not None else None
    optimizer = make_optimizer(params, s.lr, s.weight_decay, accelerator.device)
    scheduler = get_scheduler(SCHEDULES[s.schedule], optimizer, num_warmup_steps=s.warmup,
                              num_training_steps=run.steps, scheduler_specific_kwargs=_schedule_kwargs(s, run.steps))
    # The scheduler stays unprepared: accelerate would step it once per process.
    fsdp = sharded.is_sharded(accelerator)
    if fsdp:
        sharded.wrap_decoder_layers(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if fsdp:  # fully_shard replaced the parameters with sharded ones; clipping must see those
        params = [p for p in model.parameters() if p.requires_grad]
    save = sharded.save_sharded_checkpoint if fsdp else save_checkpoint
    score = sharded.evaluate if fsdp else evaluate
    if teacher is not None:
        teacher.to(accelerator.device).eval().requires_grad_(False)
    start, log_rows = _resume(accelerator, run, model, optimizer, scheduler) if resume else (0, [])

    def checkpoint(done: int) -> Path:
        return save(accelerator, run.ckpt_root, model, optimizer, scheduler,
                    {"step": done, "world": accelerator.num_processes, "samples_seen": done * schedule.global_batch,
                     "epoch": done // schedule.steps_per_epoch, "identity": run.identity})

    if accelerator.is_main_process:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        run.log_path.write_text("".join(json.dumps(r) + "\n" for r in log_rows))
    tokens_per_step = schedule.global_batch * s.seq_len
    last_ppl = None
    t_begin, steps_timed = time.perf_counter(), 0
    model.train()
    progress, task = _progress(show_progress and accelerator.is_main_process, run.steps, start)
    with progress, open(run.log_path, "a") if accelerator.is_main_process else _Nowhere() as log:
        for step in range(start, run.steps):
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
                        loss, parts = training_loss(logits, targets, teacher_logits, distill)
                        del logits, teacher_logits  # [b, s, V] each: not needed by backward, free them before it
                    accelerator.backward(loss)
                    sums += torch.stack([loss.detach().float(), parts["ce"].float(),
                                         parts.get("kl", torch.zeros((), device=loss.device)).float()])
                    if accelerator.sync_gradients:
                        means = accelerator.reduce(sums / s.grad_accum, reduction="mean")
                        if not torch.isfinite(means[0]):
                            optimizer.zero_grad(set_to_none=True)
                            prev = latest_checkpoint(run.ckpt_root)
                            # --resume refuses a changed --lr (it continues the same run): a lower one starts over.
                            kept = (f"the last good checkpoint is {prev}" if prev
                                    else f"no checkpoint was saved yet; {run.run_dir} holds the log")
                            raise AttnconvError(f"the loss became {means[0].item()} at step {step + 1}; training "
                                                f"stopped and {kept}; run again with --overwrite and a lower --lr, "
                                                "or check the data")
                        lr_now = scheduler.get_last_lr()[0]
                        grad_norm = clip_and_step(accelerator, optimizer, params, s.max_grad_norm)
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            steps_timed += 1
            done = step + 1
            row = {"step": done, "loss": means[0].item(), "lr": lr_now, "tokens": done * tokens_per_step,
                   "tokens_per_s": tokens_per_step / dt, "grad_norm": float(grad_norm),
                   "elapsed_s": time.perf_counter() - t_begin}  # after the syncs above: device work is done
            if distill is not None:
                row.update(ce=means[1].item(), kl=means[2].item())
            if eval_windows is not None and (s.eval_every and done % s.eval_every == 0 or done == run.steps):
                last_ppl = score(accelerator, model, eval_windows, s.batch_size)
                row["eval_ppl"] = last_ppl
            log_rows.append(row)
            if accelerator.is_main_process:
                log.write(json.dumps(row) + "\n")
                log.flush()
            progress.update(task, completed=done, info=f"loss {row['loss']:.4f}  {row['tokens_per_s']:,.0f} tok/s")
            if s.save_every and (done % s.save_every == 0 or done == run.steps):
                checkpoint(done)
            if done < run.steps and stop.agreed(accelerator):
                saved = checkpoint(done)
                raise Interrupted(f"interrupted after step {done} of {run.steps}; checkpoint saved in {saved}; "
                                  "run the same command with --resume to continue", stop.signum)
    elapsed = time.perf_counter() - t_begin
    return {
        "steps": run.steps, "resumed_from": start, "tokens": run.steps * tokens_per_step,
        "final_loss": log_rows[-1]["loss"] if log_rows else None, "eval_ppl": last_ppl,
        "tokens_per_s": (steps_timed * tokens_per_step / elapsed) if steps_timed else None,
        "seconds": elapsed, "log": log_rows, "steps_this_run": steps_timed,
        "model": accelerator.unwrap_model(model),
        "loss_kernel": head.backend if head is not None else "reference",
    }


class _Nowhere:
    """A do-nothing log file for processes other than the main one."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _):
        pass

    def flush(self):
        pass
