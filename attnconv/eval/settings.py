"""The settings of `attnconv eval` (see attnconv/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass

from attnconv.dtypes import ALIASES, DTYPES
from attnconv.errors import AttnconvError
from attnconv.settings import Settings, allow_pickle_option, option, overwrite_option, quiet_option

DECODE_KERNELS = ("auto", "native", "torch")


@dataclass(frozen=True)
class EvalSettings(Settings):
    command_name = "eval"

    models: tuple[str, ...] = option(help="Model folders or hub ids to evaluate, side by side.", argument=True,
                                     metavar="MODEL", io="model")
    data: str | None = option(None, help="Text to score: a .txt/.jsonl/.parquet/.csv file, a folder, a datasets spec "
                              "name[:config][:split][:column], tinyshakespeare[:test] or wikitext-2-test (the whole "
                              "WikiText-2 raw test split shipped with attnconv). Default: wikitext-2-test:eval, its "
                              "second half (convert calibrates on the first half by default).", io="data")
    max_length: int | None = option(None, help="Window length L in tokens. Default: min(1024, the models' maximum "
                                    "positions); clamped to that maximum.", flag="--max-length", short="-L",
                                    minimum=2)
    stride: int | None = option(None, help="Window stride S; each window scores only the tokens no earlier window "
                                "scored. Default: L // 2.", short="-S", minimum=1)
    batch_size: int = option(4, help="Windows per forward pass.", short="-b", minimum=1)
    dtype: str = option("auto", help="auto (the checkpoint's), float32, bfloat16 or float16.",
                        choices=("auto", *DTYPES), aliases=ALIASES)
    reference: str | None = option(None, help="Source model: report KL(source || model), top-1 agreement and the "
                                   "perplexity ratio on the same windows (same tokenizer).", io="model")
    tokenizer: str | None = option(None, help="Tokenizer folder or hub id for all models, for model folders that "
                                   "have none.", io="model")
    perplexity: bool = option(True, help="Score perplexity (and agreement with --reference); --no-perplexity with "
                              "--decode measures decode speed alone.")
    decode: bool = option(False, help="Also measure decode speed and KV-cache memory.")
    contexts: tuple[int, ...] = option((512, 2048, 8192), help="Decode context lengths, comma-separated (capped by "
                                       "each model's maximum).", minimum=1)
    batches: tuple[int, ...] = option((1, 8), help="Decode batch sizes, comma-separated.", minimum=1)
    new_tokens: int = option(32, help="Tokens generated per decode measurement.", minimum=2)
    repeats: int = option(3, help="Timed decode runs per grid point; the median is reported with the spread.",
                          minimum=1)
    decode_kernel: str = option("auto", help="CPU float32 decode: Linear layers for up to 8 rows through attnconv's "
                                "AVX2 kernel (compiled on first use with $CC or cc), else oneDNN. auto (the kernel "
                                "where it builds), native (fail without it) or torch (oneDNN only).",
                                choices=DECODE_KERNELS)
    tasks: tuple[str, ...] | None = option(None, help="Downstream tasks scored through lm-evaluation-harness, "
                                           "comma-separated (hellaswag,arc_easy,...; needs attnconv[tasks]).")
    limit: str | None = option(None, help="Examples per task: a count, or a fraction between 0 and 1.")
    num_fewshot: int | None = option(None, help="Few-shot examples per task (default: each task's own).", minimum=0)
    task_include: str | None = option(None, help="A folder of extra task definitions (lm-evaluation-harness YAML).",
                                      io="path")
    device: str = option("auto", help="auto (CUDA when available), cpu, cuda or cuda:N.")
    out: str | None = option(None, help="Write results.json, results.md and PNG plots here.", short="-o", run=False,
                             io="out")
    overwrite: bool = overwrite_option("--out")
    allow_pickle: bool = allow_pickle_option()
    quiet: bool = quiet_option()

    def check(self) -> None:
        if not self.perplexity and not self.decode and not self.tasks:
            raise AttnconvError("--no-perplexity leaves nothing to measure; add --decode or --tasks")
        if self.limit is not None:
            from attnconv.eval.tasks import parse_limit

            parse_limit(self.limit)
        if self.tasks is None and (self.limit or self.task_include or self.num_fewshot is not None):
            raise AttnconvError("--limit, --num-fewshot and --task-include go with --tasks NAMES")
        if self.stride is not None and self.max_length is not None and self.stride > self.max_length:
            raise AttnconvError(f"{self.label('stride')} {self.stride} must not exceed {self.label('max_length')} "
                                f"({self.max_length}), or tokens go unscored")
        if self.device not in ("auto", "cpu", "cuda") and not (self.device.startswith("cuda:")
                                                              and self.device[5:].isdigit()):
            raise self.error("device", "auto, cpu, cuda or cuda:N", self.device)
