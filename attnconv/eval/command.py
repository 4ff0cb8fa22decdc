"""`attnconv eval`: parse options, call `attnconv.eval.api.evaluate`."""

from __future__ import annotations

from pathlib import Path

import typer

from attnconv.errors import AttnconvError


def _int_list(value: str, option: str) -> tuple[int, ...]:
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise AttnconvError(f"{option} takes comma-separated integers, like 512,2048; got {value!r}") from None
    if not items or any(v < 1 for v in items):
        raise AttnconvError(f"{option} takes positive integers, like 512,2048; got {value!r}")
    return items


def eval_command(
    models: list[str] = typer.Argument(..., metavar="MODEL",
                                        help="Model folders or hub ids to evaluate, side by side."),
    data: str = typer.Option(None, "--data", help="Text to score: a .txt/.jsonl/.parquet/.csv file, a folder, "
                             "a datasets spec name[:config][:split][:column], or tinyshakespeare[:test]. "
                             "Default: the WikiText-2 raw test split shipped with attnconv."),
    max_length: int = typer.Option(None, "--max-length", "-L", help="Window length L in tokens. Default: "
                                   "min(1024, the models' maximum positions); clamped to that maximum."),
    stride: int = typer.Option(None, "--stride", "-S", help="Window stride S; each window scores only the "
                               "tokens no earlier window scored. Default: L // 2."),
    batch_size: int = typer.Option(4, "--batch-size", "-b", help="Windows per forward pass."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (the checkpoint's), float32, bfloat16 or float16."),
    reference: str = typer.Option(None, "--reference", help="Source model: report KL(source || model), top-1 "
                                  "agreement and the perplexity ratio on the same windows (same tokenizer)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Tokenizer folder or hub id for all models, for "
                                  "model folders that have none."),
    decode: bool = typer.Option(False, "--decode", help="Also measure decode speed and KV-cache memory."),
    contexts: str = typer.Option("512,2048,8192", "--contexts", help="Decode context lengths (capped by each "
                                 "model's maximum)."),
    batches: str = typer.Option("1,8", "--batches", help="Decode batch sizes."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="Tokens generated per decode measurement."),
    decode_kernel: str = typer.Option("auto", "--decode-kernel", help="CPU float32 decode: Linear layers for up to "
                                      "8 rows through attnconv's AVX2 kernel (compiled on first use with $CC or "
                                      "cc), else oneDNN. auto (the kernel where it builds), native (fail without "
                                      "it) or torch (oneDNN only)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N."),
    out: Path = typer.Option(None, "--out", "-o", help="Write results.json, results.md and PNG plots here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pytorch_model*.bin weights "
                                      "(loaded with torch.load(weights_only=True))."),
) -> None:
    """Evaluate models: perplexity, agreement with a source model, decode speed and KV-cache memory.

    Perplexity: strided sliding windows over one token stream (Hugging Face guide, exact token average).
    Word/byte perplexity and bits per byte follow lm-evaluation-harness, counted on the original text.
    """
    from attnconv.eval.api import evaluate

    evaluate(models, data=data, max_length=max_length, stride=stride, batch_size=batch_size, dtype=dtype,
             reference=reference, tokenizer=tokenizer, decode=decode,
             contexts=_int_list(contexts, "--contexts"), batches=_int_list(batches, "--batches"),
             new_tokens=new_tokens, out=out, overwrite=overwrite, allow_pickle=allow_pickle, device=device,
             decode_kernel=decode_kernel)
