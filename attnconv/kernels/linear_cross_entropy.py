"""Fused linear + cross-entropy: the mean token loss of `hidden @ weight.T (+ bias)` without ever holding the
[tokens, vocab] logits.

A language model's last matmul and its loss are the largest activations of a training step (tokens x vocab,
in float32 for the softmax) and a long chain of memory-bound passes (log-softmax forward, its backward, the
one-hot scatter). Here rows are processed a chunk at a time: each chunk's logits are turned into the loss
and, in place, into their gradient (softmax - one-hot) / n_valid, which immediately yields that chunk's
grad_hidden and its share of grad_weight. backward() only scales the stored gradients (Liger-Kernel and
Cut Cross-Entropy do the same on GPUs; this file is their pure-torch form, used on CPU and as a fallback).

Backends: "torch" (this file), "liger" (Liger-Kernel's Triton kernel; CUDA and the `gpu` extra),
"reference" (the eager two-op form, for tests), "auto" (liger where it loads, else torch).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from attnconv.kernels import LOSS_KERNELS as BACKENDS
from attnconv.kernels.cpu_softmax import exp_columns_

# float32 logits per chunk: on CPU, 256-512 rows of a 50k vocabulary keep BLAS at full speed while the chunk
# stays small next to the model; on GPUs large chunks keep the matmuls efficient.
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   bias: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Eager form: hidden [N, d], weight [V, d], bias [V], targets [N] -> mean CE over non-ignored targets."""
    logits = F.linear(hidden, weight, bias)  # [N, V]
    return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index)


def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls faster than float32 on this CPU."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The matmul dtype autocast would pick (the Function runs with autocast off), except that a CPU without
    bf16 instructions computes in float32: there bf16 matmuls with a vocabulary-sized inner dimension run two
    orders of magnitude slower than float32."""
    if torch.is_autocast_enabled(t.device.type):
        dtype = torch.get_autocast_dtype(t.device.type)
        if t.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_fast_bf16():
            return torch.float32
        return dtype
    return t.dtype


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and all gradients in forward, one chunk of rows at a time; backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, chunk_rows: int):
        # hidden [N, d], weight [V, d], bias [V] | None, targets [N]
        dtype = _compute_dtype(hidden)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            valid = targets != ignore_index  # [N]
            n_valid = valid.sum().clamp(min=1)
            grad_h = torch.empty_like(hidden) if need_h else None
            # float32: the first chunk's product initialises grad_w (saves zeroing a vocabulary-sized matrix)
            fresh_w = dtype == torch.float32 and hidden.shape[0] > 0
            grad_w = (torch.empty if fresh_w else torch.zeros)(weight.shape, dtype=torch.float32,
                                                              device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
            # One logits buffer for all chunks: a fresh vocabulary-sized block per chunk costs page faults on
            # CPU (torch returns large blocks to the OS), 10-15% of the product's time.
            buffer = torch.empty(weight.shape[0] * min(chunk_rows, hidden.shape[0]), dtype=dtype,
                                 device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_rows):
                # Logits are computed transposed, [V, c] = weight @ h.T: with a vocabulary-sized dimension CPU BLAS
                # runs this layout much faster than h @ weight.T.
                h = hidden[start:start + chunk_rows].to(dtype)  # [c, d]
                out = buffer[:weight.shape[0] * h.shape[0]].view(weight.shape[0], h.shape[0])  # [V, c]
                logits = (torch.mm(w, h.t(), out=out) if b is None
                          else torch.addmm(b[:, None], w, h.t(), out=out)).float()  # [V, c]
                ok = valid[start:start + chunk_rows]
                tgt = torch.where(ok, targets[start:start + chunk_rows], 0)[None, :]  # [1, c]
                target_logit = logits.gather(0, tgt)  # [1, c]
                # log-sum-exp with its exponentials kept, in place: they become the softmax of the gradient.
                peak, total = exp_columns_(logits)  # logits now exp(logits - peak) [V, c]; peak, total [1, c]
                loss_sum += ((peak + total.log() - target_logit) * ok).sum()
                if not (need_h or need_w or need_b):
                    continue
                # d loss / d logits = exps * col - one_hot * scale (0 on ignored rows), never formed: the column
                # factor goes onto the [c, d] operands and the one-hot part is c rows, so the [V, c] block is
                # only read again by the two products.
                scale = (ok / n_valid).unsqueeze(0)  # [1, c]
                col = (scale / total).t()  # [c, 1]
                exps = logits.to(dtype)  # [V, c]
                h_scaled = h * col.to(dtype)  # [c, d]
                if need_h:
                    picked = scale.t() * w.index_select(0, tgt[0]).float()  # [c, d]: the one-hot rows' share
                    grad_h[start:start + chunk_rows] = (exps.t() @ w).float() * col - picked
                if need_w:
                    if fresh_w and start == 0:
                        torch.mm(exps, h_scaled, out=grad_w)
                    elif dtype == torch.float32:
                        grad_w.addmm_(exps, h_scaled)
                    else:
                        grad_w += (exps @ h_scaled).float()
                    grad_w.index_add_(0, tgt[0], -(scale.t() * h.float()))
                if need_b:
                    grad_b += logits.float() @ col[:, 0]
                    grad_b.index_add_(0, tgt[0], -scale[0])
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = None if bool(grad_out == 1.0) else grad_out  # the usual case: loss.backward() as is
        out = []
        for g, dt in ((grad_h, None), (grad_w, ctx.dtypes[0]), (grad_b, ctx.dtypes[1])):
            if g is not None:
                g = g if scale is None else g * scale.to(g.dtype)
                g = g.to(dt) if dt is not None else g
            out.append(g)
        return out[0], out[1], out[2], None, None, None


def _even_chunk_rows(n: int, vocab: int, device_type: str) -> int:
    """Rows per chunk within the byte budget, as equal chunks of a multiple of 64 rows: a ragged last chunk
    or an odd row count drops CPU BLAS off its fast path."""
    most = max(64, CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"]) // (4 * vocab))
    per_chunk = -(-n // -(-n // most))  # ceil(n / number of chunks)
    return -(-per_chunk // 64) * 64


def liger_available() -> bool:
    """Liger-Kernel needs its package (the `gpu` extra) and a CUDA device; it stays off on CPU."""
    return torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None


def _liger(hidden, weight, targets, bias, ignore_index):
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, weight, targets, bias, ignore_index=ignore_index)


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' picks Liger on CUDA when it is installed, else the pure-torch chunked form; an explicit
    'liger' that cannot run raises."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown linear cross-entropy backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "liger" if device.type == "cuda" and liger_available() else "torch"
    if backend == "liger" and not (device.type == "cuda" and liger_available()):
        raise RuntimeError("the liger backend needs a CUDA device and liger-kernel (pip install 'attnconv[gpu]')")
    return backend


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, backend: str = "auto",
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ weight.T + bias` against targets; hidden [..., d], targets [...]."""
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    which = resolve_backend(backend, hidden.device)
    if which == "reference":
        return linear_cross_entropy_reference(hidden, weight, targets, bias, ignore_index)
    if which == "liger":
        return _liger(hidden, weight, targets, bias, ignore_index)
    rows = chunk_rows or _even_chunk_rows(hidden.shape[0], weight.shape[0], hidden.device.type)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, rows)
