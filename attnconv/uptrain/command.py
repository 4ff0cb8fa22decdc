"""`attnconv uptrain`: build the settings, call `attnconv.uptrain.api.uptrain`."""

from __future__ import annotations

from attnconv.uptrain.settings import UptrainSettings


def run_uptrain(settings: UptrainSettings) -> None:
    """Continue training a (converted) model for a short while to repair its quality.

    Runs on accelerate: under `accelerate launch` or `torchrun` the same command trains with DDP.
    Writes OUT/ (model, tokenizer, train_log.jsonl, attnconv.json) when training ends. Ctrl-C or SIGTERM
    stops after the current step with a checkpoint; --resume continues from it (and succeeds at once on a
    run that already finished).
    """
    import typer

    from attnconv.runtime import keep_freed_memory
    from attnconv.uptrain.api import uptrain

    keep_freed_memory()  # each step frees and allocates the same large blocks: reuse them
    result = uptrain(settings)
    from accelerate import PartialState

    if PartialState().is_main_process:
        r = result["results"]
        if result.get("already_finished"):
            typer.echo(f"uptrain: {result['out']} already holds this finished run; nothing to do", err=True)
        typer.echo(summary_line(result["out"], r))


def summary_line(out: str, r: dict) -> str:
    """One line a person reads (the same figures are in OUT/attnconv.json for programs)."""
    parts = [f"{r['steps']:,} steps", f"{r['tokens']:,} tokens"]
    if r.get("final_loss") is not None:
        parts.append(f"final loss {r['final_loss']:.4f}")
    if r.get("eval_ppl") is not None:
        parts.append(f"held-out perplexity {r['eval_ppl']:.2f}")
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:,.0f} tokens/s")
    return f"uptrain: {out}: " + ", ".join(parts)
