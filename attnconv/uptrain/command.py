"""`attnconv uptrain`: build the settings, call `attnconv.uptrain.api.uptrain`."""

from __future__ import annotations

import json

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
        typer.echo(json.dumps({"out": result["out"], "steps": r["steps"], "tokens": r["tokens"],
                               "final_loss": r["final_loss"], "eval_ppl": r["eval_ppl"],
                               "tokens_per_s": r["tokens_per_s"]}))
