"""`attnconv eval`: build the settings, call `attnconv.eval.api.evaluate`."""

from __future__ import annotations

from attnconv.eval.settings import EvalSettings


def run_eval(settings: EvalSettings) -> None:
    """Evaluate models: perplexity, agreement with a source model, decode speed and KV-cache memory.

    Perplexity: strided sliding windows over one token stream (Hugging Face guide, exact token average).
    Word/byte perplexity and bits per byte follow lm-evaluation-harness, counted on the original text.

    Examples:

      attnconv eval ./llama ./llama-gqa4 --reference ./llama --out report/

      attnconv eval ./llama-gqa4 --no-perplexity --decode --contexts 512,2048 --batches 1,8
    """
    from attnconv.eval.api import evaluate

    evaluate(settings)
