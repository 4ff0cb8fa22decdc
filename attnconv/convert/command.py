"""`attnconv convert` and `attnconv info`."""

from __future__ import annotations

from enum import Enum

import typer


class Target(str, Enum):
    gqa = "gqa"
    mqa = "mqa"


class MethodName(str, Enum):
    mean = "mean"
    first = "first"
    random = "random"


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def convert_command(
    src: str = typer.Argument(..., help="Source checkpoint: a local folder (with config.json) or a hub id."),
    out: str = typer.Argument(None, help="Output folder (written to a temporary sibling, renamed when complete)."),
    to: Target = typer.Option(Target.gqa, "--to", help="Target attention: gqa (needs --kv-heads) or mqa (1 KV head)."),
    kv_heads: int = typer.Option(None, "--kv-heads", help="KV heads to keep; must divide the query and KV heads."),
    method: MethodName = typer.Option(MethodName.mean, "--method",
                                      help="mean: mean-pool each group (GQA paper, best); first: keep each group's "
                                           "first head; random: random initialisation (paper ablations)."),
    seed: int = typer.Option(0, "--seed", help="Seed for --method random."),
    dtype: DType = typer.Option(DType.auto, "--dtype", help="Output dtype; auto keeps the source's. Pooling is "
                                                             "computed in float32 either way."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (tensors, sizes, KV cache) and exit."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Accept pytorch_model*.bin pickles (read with weights_only=True)."),
) -> None:
    """Convert an MHA (or GQA) checkpoint to GQA/MQA by merging the key/value heads of each group.

    Tensors are read and written shard by shard, one tensor in memory at a time; the output is a
    standard checkpoint that loads with AutoModelForCausalLM.from_pretrained(OUT), with the
    tokenizer and generation config copied and provenance in OUT/attnconv.json.

    Examples:

      attnconv convert ./llama ./llama-gqa4 --to gqa --kv-heads 4

      attnconv convert gpt2 ./gpt2-mqa --to mqa          (written as GPTBigCode, multi_query=True)

      attnconv convert ./llama ./x --to gqa --kv-heads 2 --dry-run
    """
    from attnconv.convert.api import convert

    plan = convert(src, out, to=to.value, kv_heads=kv_heads, method=method.value, seed=seed, dtype=dtype.value,
                   dry_run=dry_run, overwrite=overwrite, allow_pickle=allow_pickle)
    from attnconv.convert.report import print_plan, print_result  # imports torch: only once the work is done

    if dry_run:
        print_plan(plan)
    else:
        print_result(plan, out)


def info_command(
    model: str = typer.Argument(..., help="A model folder or hub id."),
    batch: int = typer.Option(1, "--batch", help="Batch size for the KV-cache table."),
    context: int = typer.Option(None, "--context", help="Context length (default: the model's maximum)."),
    dtype: DType = typer.Option(DType.bfloat16, "--dtype", help="Cache dtype for the table."),
) -> None:
    """Show a model's architecture, heads, KV heads, head_dim, parameters and KV-cache size.

    The table gives the cache (layers x batch x kv_heads x head_dim x context x 2 x bytes) for the
    model as it is and for every KV-head count that divides its query heads.
    """
    from attnconv.convert.info import print_info

    print_info(model, batch=batch, context=context, dtype="bfloat16" if dtype == DType.auto else dtype.value)
