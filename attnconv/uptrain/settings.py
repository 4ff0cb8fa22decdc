"""The settings of `attnconv uptrain` (see attnconv/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass

from attnconv.errors import AttnconvError
from attnconv.kernels import LOSS_KERNELS
from attnconv.settings import Settings, allow_pickle_option, option, quiet_option

SCHEDULES = ("cosine", "linear", "constant", "wsd")
PRECISIONS = ("float32", "bfloat16")
TRAIN_CHOICES = ("all", "only-attention")


@dataclass(frozen=True)
class UptrainSettings(Settings):
    command_name = "uptrain"

    model: str = option(help="Model to train: a local folder (e.g. a converted model) or a hub id.", argument=True,
                        io="model")
    out: str = option(help="Output folder for the trained model (written when training ends).", argument=True,
                      run=False, io="out")
    data: str = option(help="Training text: .txt/.jsonl/.parquet file or folder, a datasets spec "
                       "name[:config][:split][:column] (split: train by default), wikitext-2-test or "
                       "tinyshakespeare[:train]. Read lazily and tokenised once into a memory-mapped cache, so "
                       "corpora larger than memory work.", io="data")
    steps: int | None = option(None, help="Optimizer steps (default: one pass over the data).", minimum=1)
    tokens: int | None = option(None, help="Train on this many tokens instead of --steps.", minimum=1)
    seq_len: int = option(512, help="Tokens per training sequence.", minimum=1)
    batch_size: int = option(4, help="Sequences per process and micro-step.", minimum=1)
    grad_accum: int = option(1, help="Micro-steps accumulated per optimizer step.", minimum=1)
    lr: float = option(1e-4, help="Peak AdamW learning rate.", above=0)
    warmup: int = option(0, help="Linear warmup steps.", minimum=0)
    schedule: str = option("cosine", help="Learning-rate schedule after the warmup: cosine or linear decay to 0, "
                           "constant, or wsd (warmup-stable-decay: constant, then a 1-sqrt decay to 0 over the last "
                           "--decay-fraction of the steps, as MHA2MLA trains).", choices=SCHEDULES)
    decay_fraction: float = option(0.2, help="wsd: the fraction of the steps over which the rate decays.",
                                   minimum=0, maximum=1)
    dtype: str = option("float32", help="float32, or bfloat16 (autocast; weights and optimizer stay float32).",
                        choices=PRECISIONS, aliases={"fp32": "float32", "bf16": "bfloat16"})
    teacher: str | None = option(None, help="Distil from this model (the unconverted source).",
                                  io="model")
    distill_weight: float = option(0.5, help="Weight a of KL in (1-a)*CE + a*T^2*KL.", minimum=0, maximum=1)
    temperature: float = option(1.0, help="Softmax temperature T of the distillation.", above=0)
    train: str = option("all", help="What learns: all, or only-attention (q/k/v/o and latent projections).",
                        choices=TRAIN_CHOICES)
    eval_data: str | None = option(None, help="Held-out text for perplexity (same SPEC forms).",
                                    io="data")
    eval_every: int | None = option(None, help="Measure held-out perplexity every N steps.", minimum=1, run=False)
    save_every: int | None = option(None, help="Write a checkpoint every N steps (for --resume).", minimum=1,
                                    run=False)
    resume: bool = option(False, help="Continue from the last checkpoint in OUT.uptrain-run/.", run=False)
    overwrite: bool = option(False, help="Replace OUT and discard old checkpoints.", run=False)
    seed: int = option(0, help="Seed of the data order and of all random number generators.", minimum=0)
    max_grad_norm: float = option(1.0, help="Clip the gradient norm to this value; 0 turns clipping off.", minimum=0)
    weight_decay: float = option(0.0, help="AdamW weight decay.", minimum=0)
    gradient_checkpointing: bool = option(False, help="Recompute activations in backward to save memory.")
    tokenizer: str | None = option(None, help="Tokenizer folder or hub id, if MODEL has none.", io="model")
    allow_pickle: bool = allow_pickle_option()
    keep_checkpoints: bool = option(False, help="Keep OUT.uptrain-run/ (last checkpoint) after a successful run.",
                                    run=False)
    loss_kernel: str = option("auto", help="How the loss is computed without the full logits: auto (Liger on CUDA "
                              "when installed, else torch), torch (chunked, pure torch), liger, or reference (plain "
                              "logits + cross-entropy). Distillation always uses the logits.", choices=LOSS_KERNELS)
    max_eval_windows: int = option(64, help="Held-out windows scored at each evaluation.", minimum=1)
    cache_dir: str | None = option(None, help="Token cache folder (default $ATTNCONV_CACHE/tokens).", run=False)
    quiet: bool = quiet_option()

    def check(self) -> None:
        if self.steps is not None and self.tokens is not None:
            raise AttnconvError(f"give {self.label('steps')} or {self.label('tokens')}, not both")
        if self.eval_every is not None and self.eval_data is None:
            raise AttnconvError(f"{self.label('eval_every')} needs {self.label('eval_data')} SPEC (held-out text to "
                                "measure perplexity on)")

    def run_values(self) -> dict:
        """As Settings.run_values; the distillation settings count only with a teacher."""
        values = super().run_values()
        if self.teacher is None:
            values.pop("distill_weight")
            values.pop("temperature")
        return values
