"""`attnconv push`: parse options, call `attnconv.push.api.push`, print what went (or would go) up."""

from __future__ import annotations

import typer


def push_command(
    model: str = typer.Argument(..., help="The model folder to upload (what convert or uptrain wrote)."),
    repo_id: str = typer.Argument(..., help="Hub repo: name or namespace/name; created if it does not exist."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    revision: str = typer.Option(None, "--revision", help="Branch to commit to (created if missing); default main."),
    message: str = typer.Option(None, "--message", "-m", help="Commit message."),
    token: str = typer.Option(None, "--token", help="Hub token with write access; default: HF_TOKEN or the "
                              "token saved by `hf auth login`.", envvar="ATTNCONV_HUB_TOKEN"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also upload pickle weights (*.bin, *.pt)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the files and the model card; upload nothing."),
) -> None:
    """Upload a converted model to the Hugging Face hub, in one commit, with a model card.

    The card (README.md) is written from the folder's attnconv.json: source, method, KV heads and KV-cache bytes
    per token before and after, and the uptraining run when there was one. A README.md already in the folder is
    uploaded as it is. Hidden files, training checkpoints and pickles (unless --allow-pickle) stay behind.
    """
    from rich.console import Console

    from attnconv.push.api import PushPlan, push

    console = Console()
    result = push(model, repo_id, private=private, revision=revision, commit_message=message, token=token,
                  allow_pickle=allow_pickle, dry_run=dry_run)
    if isinstance(result, PushPlan):
        console.print(f"would upload to [bold]{repo_id}[/] ({result.total_bytes / 2**20:,.1f} MiB in one commit):")
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
    console.print(f"uploaded {model} to {repo_id}: {result}", highlight=False)
