"""The `attnconv` command line: thin wrappers over typed library functions.

Each subcommand lives beside its library code (`attnconv/<area>/command.py`); this file only
assembles them and turns `AttnconvError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import sys

import typer

from attnconv import __version__
from attnconv.convert.command import convert_command, info_command
from attnconv.errors import AttnconvError
from attnconv.eval.command import eval_command
from attnconv.uptrain.command import uptrain_command

app = typer.Typer(
    name="attnconv",
    help=(
        "Convert Hugging Face causal-LM checkpoints with multi-head attention into attention with a "
        "much smaller KV cache (GQA, MQA), repair them with short uptraining, and measure the result."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("convert", no_args_is_help=True)(convert_command)
app.command("info", no_args_is_help=True)(info_command)
app.command("eval", no_args_is_help=True)(eval_command)
app.command("uptrain", no_args_is_help=True)(uptrain_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attnconv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


def main() -> None:
    try:
        app(standalone_mode=False)
    except AttnconvError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to the output folder", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click usage errors carry their own exit code
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
