"""The optimizer step and the held-out evaluation of the training loop."""

from __future__ import annotations

import math

import torch

from attnconv.uptrain.distill import cross_entropy


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                   device: torch.device) -> torch.optim.AdamW:
    # The fused kernel (one pass over all parameters) exists on CPU and CUDA; it is also Trainer's default.
    fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.bfloat16) for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def clip_and_step(accelerator, optimizer, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients to max_norm (global L2; 0: no clipping) and take the optimizer step; returns the norm
    before clipping.

    A fused AdamW divides every gradient by its `grad_scale` in the step's own pass (the attribute GradScaler sets
    for it), so the clip factor goes there instead of into a separate pass over all gradients. Same result to
    rounding. Where gradients are sharded (FSDP, DeepSpeed)
    or a GradScaler is in use, accelerate's own clipping.
    """
    from accelerate.utils import DistributedType

    inner = getattr(optimizer, "optimizer", optimizer)  # under AcceleratedOptimizer
    if max_norm == 0:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads \
            else torch.zeros(())
        optimizer.step()
        return norm
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
