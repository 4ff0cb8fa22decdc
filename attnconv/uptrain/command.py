"""`attnconv uptrain`: parse options, call `attnconv.uptrain.api.uptrain`."""

from __future__ import annotations

import json

import typer


def uptrain_command(
    model: str = typer.Argument(..., help="Model to train: a local folder (e.g. a converted model) or a hub id."),
    out: str = typer.Argument(..., help="Output folder for the trained model (written when training ends)."),
    data: str = typer.Option(..., "--data", help="Training text: .txt/.jsonl/.parquet file or folder, a datasets "
                             "spec name[:config][:split][:column] (split: train by default), wikitext-2-test or "
                             "tinyshakespeare[:train]. Read lazily and tokenised once into a memory-mapped cache, "
                             "so corpora larger than memory work."),
    steps: int = typer.Option(None, "--steps", help="Optimizer steps (default: one pass over the data)."),
    tokens: int = typer.Option(None, "--tokens", help="Train on this many tokens instead of --steps."),
    seq_len: int = typer.Option(512, "--seq-len", help="Tokens per training sequence."),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per process and micro-step."),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-steps accumulated per optimizer step."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak AdamW learning rate."),
    warmup: int = typer.Option(0, "--warmup", help="Linear warmup steps."),
    schedule: str = typer.Option("cosine", "--schedule", help="Learning-rate schedule: cosine, linear or constant."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, or bf16 (autocast; weights and optimizer in fp32)."),
    teacher: str = typer.Option(None, "--teacher", help="Distil from this model (the unconverted source)."),
    distill_weight: float = typer.Option(0.5, "--distill-weight", help="Weight a of KL in (1-a)*CE + a*T^2*KL."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softmax temperature T of the distillation."),
    train: str = typer.Option("all", "--train", help="What learns: all, or only-attention (q/k/v/o and latent "
                              "projections)."),
    eval_data: str = typer.Option(None, "--eval-data", help="Held-out text for perplexity (same SPEC forms)."),
    eval_every: int = typer.Option(None, "--eval-every", help="Measure held-out perplexity every N steps."),
    save_every: int = typer.Option(None, "--save-every", help="Write a checkpoint every N steps (for --resume)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint in OUT.uptrain-run/."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT and discard old checkpoints."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order and of all random number generators."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Clip the gradient norm to this value."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="AdamW weight decay."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing",
                                                help="Recompute activations in backward to save memory."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer folder or hub id, if MODEL has none."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pytorch_model*.bin weights."),
    keep_checkpoints: bool = typer.Option(False, "--keep-checkpoints",
                                          help="Keep OUT.uptrain-run/ (last checkpoint) after a successful run."),
    loss_kernel: str = typer.Option("auto", "--loss-kernel",
                                    help="How the loss is computed without the full logits: auto (Liger on CUDA "
                                    "when installed, else torch), torch (chunked, pure torch), liger, or reference "
                                    "(plain logits + cross-entropy). Distillation always uses the logits."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar; print only the summary."),
) -> None:
    """Continue training a (converted) model for a short while to repair its quality.

    Runs on accelerate: under `accelerate launch` or `torchrun` the same command trains with DDP.
    Writes OUT/ (model, tokenizer, train_log.jsonl, attnconv.json) when training ends.
    """
    from attnconv.runtime import keep_freed_memory
    from attnconv.uptrain.api import uptrain

    keep_freed_memory()  # each step frees and allocates the same large blocks: reuse them
    result = uptrain(model, out, data=data, steps=steps, tokens=tokens, seq_len=seq_len, batch_size=batch_size,
                     grad_accum=grad_accum, lr=lr, warmup=warmup, schedule=schedule, dtype=dtype, teacher=teacher,
                     distill_weight=distill_weight, temperature=temperature, train=train, eval_data=eval_data,
                     eval_every=eval_every, save_every=save_every, resume=resume, overwrite=overwrite, seed=seed,
                     max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                     gradient_checkpointing=gradient_checkpointing, tokenizer=tokenizer, allow_pickle=allow_pickle,
                     keep_checkpoints=keep_checkpoints, loss_kernel=loss_kernel, progress=not quiet)
    from accelerate import PartialState

    if PartialState().is_main_process:
        r = result["results"]
        typer.echo(json.dumps({"out": result["out"], "steps": r["steps"], "tokens": r["tokens"],
                               "final_loss": r["final_loss"], "eval_ppl": r["eval_ppl"],
                               "tokens_per_s": r["tokens_per_s"]}))
