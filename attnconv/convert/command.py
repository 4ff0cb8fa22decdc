"""`attnconv convert` and `attnconv info`: each builds its settings and calls the library function."""

from __future__ import annotations

from attnconv.convert.settings import ConvertSettings, InfoSettings
from attnconv.textdata import CALIBRATION_SPEC


def run_convert(settings: ConvertSettings) -> None:
    """Convert an MHA (or GQA) checkpoint to GQA/MQA by merging the key/value heads of each group, or to MLA
    (multi-head latent attention) by a low-rank factorisation of its keys and values.

    Tensors are read and written shard by shard (MLA: a layer at a time); the output is a standard checkpoint
    that loads with AutoModelForCausalLM.from_pretrained(OUT), with the tokenizer and generation config copied
    and provenance in OUT/attnconv.json.

    Examples:

      attnconv convert ./llama ./llama-gqa4 --to gqa --kv-heads 4

      attnconv convert gpt2 ./gpt2-mqa --to mqa          (written as GPTBigCode, multi_query=True)

      attnconv convert ./llama ./x --to gqa --kv-heads 2 --dry-run

      attnconv convert ./llama ./llama-gqa2 --to gqa --kv-heads 2 --method grouped+aligned+fit --calibrate DATA

      attnconv convert ./llama ./llama-mla --to mla --kv-rank 512 --rope-dim 64
    """
    from attnconv.convert.api import convert

    if settings.needs_calibration and not settings.dry_run:
        print(f"note: {calibration_note(settings)}")

    plan = convert(settings, progress=not settings.quiet)
    from attnconv.convert.report import print_plan, print_result  # imports torch: only once the work is done

    if settings.dry_run:
        print_plan(plan)
    else:
        print_result(plan, settings.out)


def calibration_note(settings: ConvertSettings) -> str:
    """Which text is read, how much, and which options read it (so a weights-only intent sees it is not)."""
    data = settings.calibrate or (f"{CALIBRATION_SPEC} (the first half of the WikiText-2 test split shipped with "
                                  "attnconv; --calibrate DATA to choose)")
    return (f"calibrating on {settings.calib_tokens:,} tokens of {data} for "
            f"{', '.join(settings.calibration_uses)}")


def run_info(settings: InfoSettings) -> None:
    """Show a model's architecture, heads, KV heads, head_dim, parameters and KV-cache size.

    The table gives the cache (layers x batch x kv_heads x head_dim x context x 2 x bytes) for the
    model as it is and for every KV-head count that divides its query heads.
    """
    from attnconv.convert.info import print_info

    print_info(settings)
