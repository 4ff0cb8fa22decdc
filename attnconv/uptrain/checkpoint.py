"""Atomic training checkpoints: model, optimizer, scheduler, RNG states (per process) and data position.

A checkpoint is written into `checkpoints/.tmp-step-N/`, flushed to disk (fsync) and renamed to
`checkpoints/step-N/` only when every process has finished writing; the previous checkpoint is deleted
after that rename. A crash, a power cut or a full disk while saving therefore leaves the previous
checkpoint intact. Everything loads with
`torch.load(weights_only=True)` or safetensors: no pickled code. (Under FSDP the model and optimizer are DCP shards
instead, see attnconv.uptrain.sharded; torch reads a DCP folder's `.metadata` with pickle.)
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from attnconv.errors import AttnconvError, first_line
from attnconv.outputs import fsync_dir, fsync_tree

# Test hook: SIGKILL this process right after the checkpoint of this step is complete (simulates a crash).
KILL_AFTER_ENV = "ATTNCONV_TEST_KILL_AFTER_CHECKPOINT"


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint (a renamed folder with its state.json), or None."""
    if not ckpt_root.is_dir():
        return None
    done = [p for p in ckpt_root.glob("step-*")
            if p.name[5:].isascii() and p.name[5:].isdigit() and (p / "state.json").is_file()]  # not step-abc
    return max(done, key=lambda p: int(p.name[5:])) if done else None


def _write_whole(accelerator, tmp: Path, model, optimizer, scheduler) -> None:
    if accelerator.is_main_process:
        save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")


def save_checkpoint(accelerator, ckpt_root: Path, model, optimizer, scheduler, state: dict,
                    write_payload=_write_whole) -> Path:
    """Write a checkpoint for `state["step"]` atomically; all processes must call it.

    write_payload(accelerator, tmp, model, optimizer, scheduler) runs on every process; this module's writes the
    whole model and optimizer from the main process, attnconv.uptrain.sharded's FSDP shards from all of them."""
    step = state["step"]
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}"
    final = ckpt_root / step_dir_name(step)
    error: Exception | None = None
    if accelerator.is_main_process:
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            error = e
    no_folder = _any_process(accelerator, error is not None)  # a collective payload is skipped by all or none
    try:
        if not no_folder:
            write_payload(accelerator, tmp, model, optimizer, scheduler)
            torch.save(_rng_state(), tmp / rng_file(accelerator.process_index))
    except (OSError, RuntimeError, SafetensorError) as e:  # torch and safetensors report a full disk their way
        error = e
    failed = _any_process(accelerator, error is not None)
    if not failed and accelerator.is_main_process:
        try:
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            fsync_tree(tmp)  # on disk before the rename publishes it and the previous checkpoint goes
            os.rename(tmp, final)
            fsync_dir(ckpt_root)
        except OSError as e:
            error = e
    failed = _any_process(accelerator, error is not None) or failed
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(ckpt_root)
        keep = f"the previous checkpoint ({prev}) is intact" if prev else "no earlier checkpoint exists"
        full = error is not None and (getattr(error, "errno", None) == errno.ENOSPC
                                      or "No space left" in str(error) or "failed writing" in str(error))
        why = "the disk is full" if full else first_line(error) if error else "a process failed"
        raise AttnconvError(f"could not save the checkpoint of step {step} ({why}); {keep}; "
                            "free space and run again with --resume")
    if accelerator.is_main_process:
        for old in ckpt_root.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    if os.environ.get(KILL_AFTER_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    return final


def _any_process(accelerator, flag: bool) -> bool:
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restore everything saved by save_checkpoint; returns its state dict (step, data position...)."""
    rng = path / rng_file(accelerator.process_index)
    if not rng.is_file():
        raise AttnconvError(f"{path} was written by fewer processes than this run has; resume with the same "
                            "number of processes")
    try:
        state = json.loads((path / "state.json").read_text())
        load_model(accelerator.unwrap_model(model), str(path / "model.safetensors"), strict=True)
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(rng, weights_only=True))
    except (OSError, RuntimeError, ValueError, KeyError, SafetensorError) as e:
        raise AttnconvError(f"checkpoint {path} could not be loaded ({first_line(e)}); remove it to fall back to "
                            "an earlier one, or start over with --overwrite") from None
    return state
