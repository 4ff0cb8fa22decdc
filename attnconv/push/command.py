"""`attnconv push`: parse options, call `attnconv.push.api.push`, print what went (or would go) up."""

from __future__ import annotations

from attnconv.push.settings import PushSettings


def run_push(settings: PushSettings) -> None:
    """Upload a converted model to the Hugging Face hub, in one commit, with a model card.

    The card (README.md) is written from the folder's attnconv.json: source, method, KV heads and KV-cache bytes
    per token before and after, and the uptraining run when there was one. A README.md already in the folder is
    uploaded as it is. Hidden files, training checkpoints and pickles (unless --allow-pickle) stay behind.
    """
    from rich.console import Console

    from attnconv.push.api import PushPlan, push

    console = Console()
    result = push(settings)
    if isinstance(result, PushPlan):
        console.print(f"would upload to [bold]{settings.repo_id}[/] ({result.total_bytes / 2**20:,.1f} MiB in one "
                      "commit):")
        for name, path in result.files:
            console.print(f"  {name}  {path.stat().st_size:,} bytes", highlight=False)
        if result.card is not None:
            console.print(f"  README.md  {len(result.card.encode()):,} bytes (generated model card)")
        for line in result.skipped:
            console.print(f"  left out: {line}", highlight=False)
        if result.card is not None:
            console.rule("README.md")
            console.print(result.card, markup=False, highlight=False, soft_wrap=True)
        return
    console.print(f"uploaded {settings.model} to {settings.repo_id}: {result}", highlight=False)
