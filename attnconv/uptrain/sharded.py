"""`attnconv uptrain` under FSDP2 (`fully_shard`, through accelerate): setup, sharded checkpoints, final gather.

FSDP is asked for by the accelerate launch config (`distributed_type: FSDP`, which sets ACCELERATE_USE_FSDP);
recipes/accelerate/ has ready ones. Only FSDP2 is accepted: per-parameter DTensor shards mix frozen and trainable
parameters (--train only-attention) in one group, and torch.distributed.checkpoint (DCP) reshards them on load.
accelerate 1.15 turns FSDP on only for GPU-class devices and silently runs DDP on CPU (gloo); `setup_fsdp` turns it
on there too, so the sharded code paths run (and are tested) without a GPU.

Checkpoints: every process writes its shards of the model and optimizer with DCP into the same temporary folder as
the unsharded checkpoints (attnconv.uptrain.checkpoint: published by rename, previous one intact on failure). DCP
reshards on load, so a checkpoint resumes on another number of processes when the global batch (batch-size x
grad-accum x processes) is unchanged: a step then reads the same blocks. The final model is gathered on the main
process into a plain transformers model and saved like the unsharded path's.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch

from attnconv.errors import AttnconvError, first_line
from attnconv.uptrain.checkpoint import rng_file, save_checkpoint, set_rng_state
from attnconv.uptrain.distill import cross_entropy

SHARDED_FORMAT = "fsdp2-dcp"
SHARDS = "shards"  # the DCP folder inside a checkpoint
# The split of a global batch over processes: a sharded checkpoint may resume with another split of the same batch.
SPLIT_KEYS = ("batch_size", "grad_accum", "processes")


def fsdp_requested() -> bool:
    """Whether the launcher asked for FSDP (`accelerate launch` with distributed_type FSDP sets this)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_fsdp_version() -> None:
    """Refuse FSDP1 before accelerate builds its plugin (which, for FSDP1 on CPU, fails with a traceback)."""
    version = os.environ.get("FSDP_VERSION", "1")
    if fsdp_requested() and version != "2":
        raise AttnconvError(f"attnconv uptrain shards with FSDP2 only, and the launch config asks for FSDP version "
                            f"{version}; set fsdp_version: 2 in its fsdp_config (see recipes/accelerate/)")


def setup_fsdp(accelerator, bf16: bool) -> bool:
    """Check an FSDP request and turn FSDP on where accelerate left it off (CPU); returns whether training shards."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if not fsdp_requested():
        return False
    if accelerator.num_processes == 1:
        raise AttnconvError("FSDP was asked for (distributed_type: FSDP) on one process: sharding needs 2 or more; "
                            "launch with --num_processes 2 or more, or with recipes/accelerate/single_gpu.yaml")
    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:  # as AcceleratorState does it for GPUs
        from torch.distributed.fsdp import CPUOffloadPolicy

        plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        if isinstance(plugin.cpu_offload, CPUOffloadPolicy):  # it pins memory for a GPU
            raise AttnconvError("fsdp_offload_params moves shards from the GPU to CPU memory and this run has no GPU; "
                                "set fsdp_offload_params: false in the launch config")
        if bf16:
            plugin.set_mixed_precision("bf16")
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # a later AcceleratorState() reads it
    return state.distributed_type == DistributedType.FSDP


def wrap_decoder_layers(accelerator, model) -> None:
    """With TRANSFORMER_BASED_WRAP and no class named, accelerate wraps the classes in `_no_split_modules`; for a
    model without them, name the class of its decoder layers (the ModuleList of num_hidden_layers blocks)."""
    plugin = accelerator.state.fsdp_plugin
    policy = getattr(plugin.auto_wrap_policy, "func", plugin.auto_wrap_policy)
    if getattr(policy, "__name__", "") != "transformer_auto_wrap_policy" or plugin.transformer_cls_names_to_wrap \
            or getattr(model, "_no_split_modules", None):
        return
    n = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and len({type(m) for m in module}) == 1:
            plugin.transformer_cls_names_to_wrap = [type(module[0]).__name__]
            return


def resume_identity(identity: dict) -> dict:
    """A run's identity for a sharded checkpoint: the global batch counts, not how processes split it."""
    out = {k: v for k, v in identity.items() if k not in SPLIT_KEYS}
    out["global_batch"] = math.prod(identity.get(k) or 1 for k in SPLIT_KEYS)
    return out


def check_resume(path: Path, state: dict, sharded_now: bool) -> None:
    """Refuse a checkpoint written with FSDP by a run without it, and the other way round."""
    sharded_then = state.get("format") == SHARDED_FORMAT
    if sharded_then and not sharded_now:
        raise AttnconvError(f"{path} holds FSDP shards and this run does not use FSDP; resume it with an FSDP launch "
                            "config (recipes/accelerate/fsdp_*.yaml)")
    if sharded_now and not sharded_then:
        raise AttnconvError(f"{path} was written without FSDP and this run uses FSDP; resume it with the launch "
                            "config that wrote it")


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # under AcceleratedOptimizer


def _write_shards(accelerator, tmp: Path, model, optimizer, scheduler) -> None:
    """Every process writes its shards (DCP fsyncs each file it writes); the main process the scheduler."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, _inner(optimizer))
    try:
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=tmp / SHARDS)
    except CheckpointException as e:  # a BaseException; raised on every process when any one failed
        errors = [exc for exc, _ in e.failures.values()]
        raise errors[0] if errors and isinstance(errors[0], OSError) else RuntimeError(first_line(e)) from None
    if accelerator.is_main_process:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")


def save_sharded_checkpoint(accelerator, ckpt_root: Path, model, optimizer, scheduler, state: dict) -> Path:
    """save_checkpoint with the model and optimizer in DCP shards; all processes must call it."""
    return save_checkpoint(accelerator, ckpt_root, model, optimizer, scheduler, {**state, "format": SHARDED_FORMAT},
                           write_payload=_write_shards)


def load_sharded_checkpoint(accelerator, path: Path, model, optimizer, scheduler, seed: int) -> dict:
    """Restore a sharded checkpoint, resharded to this run's processes; returns its state (step, ...).

    Random-number states are per process: restored where this process's file exists; a process the writing run did
    not have is seeded from (seed, step, rank), so random draws (dropout, if the model has any) differ from an
    uninterrupted run. Data order, weights, optimizer and schedule are exact."""
    import json

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    try:
        state = json.loads((path / "state.json").read_text())
        model_sd, optim_sd = get_state_dict(model, _inner(optimizer))
        loaded = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(loaded, checkpoint_id=path / SHARDS)
        set_state_dict(model, _inner(optimizer), model_state_dict=loaded["model"],
                       optim_state_dict=loaded["optimizer"])
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        mine = path / rng_file(accelerator.process_index)
        if mine.is_file():
            set_rng_state(torch.load(mine, weights_only=True))
        else:
            from accelerate.utils import set_seed

            set_seed(seed * 1_000_003 + state["step"] * 1009 + accelerator.process_index)
    except (OSError, RuntimeError, ValueError, KeyError, CheckpointException) as e:
        raise AttnconvError(f"checkpoint {path} could not be loaded ({first_line(e)}); remove it to fall back to "
                            "an earlier one, or start over with --overwrite") from None
    return state


def gather_full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's state, gathered tensor by tensor into CPU memory of the main process ({} elsewhere);
    all processes must call it, while the model is as it was prepared (the fused loss head still in place)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def plain_model(model, full_sd: dict[str, torch.Tensor]):
    """A transformers model of MODEL's class and config holding FULL_SD (no copy), for save_pretrained; None on
    processes without the gathered state. Built on the meta device: no second initialisation of the weights."""
    if not full_sd:
        return None
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), dtype=torch.float32)
    plain.load_state_dict(full_sd, strict=True, assign=True)
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()  # assign=True gave the tied names separate tensors
    buffers = dict(model.named_buffers())
    for name, buf in list(plain.named_buffers()):  # non-persistent ones (rotary frequencies) are not in FULL_SD
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, buffers[name].detach().cpu().clone(), persistent=False)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = copy.deepcopy(model.generation_config)
    return plain.eval()


@torch.no_grad()
def evaluate(accelerator, model, windows: torch.Tensor, batch_size: int) -> float:
    """optim.evaluate for FSDP: each forward all-gathers weights, so every process runs the same number of them; a
    process with no windows left scores one and discards it."""
    was_training = model.training
    model.eval()
    mine = windows[accelerator.process_index::accelerator.num_processes]
    rounds = math.ceil(math.ceil(len(windows) / accelerator.num_processes) / batch_size)
    nll = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [sum of token NLL, tokens]
    for i in range(rounds):
        batch = mine[i * batch_size:(i + 1) * batch_size]
        real = len(batch) > 0
        batch = (batch if real else windows[:1]).to(accelerator.device)  # [b, seq_len + 1]
        with accelerator.autocast():
            logits = model(input_ids=batch[:, :-1], use_cache=False).logits  # [b, seq_len, V]
        if real:
            n = batch[:, 1:].numel()
            nll += torch.tensor([cross_entropy(logits, batch[:, 1:]).item() * n, n], dtype=torch.float64,
                                device=accelerator.device)
    nll = accelerator.reduce(nll, reduction="sum")
    model.train(was_training)
    return math.exp(nll[0].item() / max(nll[1].item(), 1.0))
