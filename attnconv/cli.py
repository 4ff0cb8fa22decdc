"""The `attnconv` command line: thin wrappers over typed library functions.

Each command is built from its settings dataclass and calls one library function, both named in the command table
(attnconv/commands.py). This file assembles them and turns what can go wrong into one line and an exit code:
AttnconvError (bad input: 2), a file system refusal (1), Ctrl-C (130) and SIGTERM (143).
"""

from __future__ import annotations

import atexit
import errno
import functools
import os
import signal
import sys
import threading

import typer

from attnconv import __version__
from attnconv.commands import COMMANDS
from attnconv.errors import AttnconvError, Interrupted, Terminated, disk_full
from attnconv.recipes.command import run_recipe_command
from attnconv.runtime import prefer_huge_pages
from attnconv.settings import command

app = typer.Typer(
    name="attnconv",
    help=(
        "Convert Hugging Face causal-LM checkpoints with multi-head attention into attention with a "
        "much smaller KV cache (GQA, MQA), repair them with short uptraining, measure the result, and publish it."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's layout: at 80 columns rich's option table left help a 22-column strip
)
KEPT = "the output folder was not created or left as it was"


def _interruptible(run):
    """RUN with Ctrl-C and SIGTERM turned into one-line errors (exit 130 / 143) before typer sees them."""

    @functools.wraps(run)
    def guarded(settings):
        try:
            return run(settings)
        except Terminated:
            raise Interrupted(f"terminated (SIGTERM); {KEPT}", signal.SIGTERM) from None
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; {KEPT}", signal.SIGINT) from None

    return guarded


for _name, _command in COMMANDS.items():
    app.command(_name, no_args_is_help=True)(command(_command.settings, _interruptible(_command.run)))


@app.command("run", no_args_is_help=True, help=run_recipe_command.__doc__)
def _run_recipe(
    recipe: str = typer.Argument(..., metavar="RECIPE.yaml", help="The recipe: a YAML list of stages."),
    from_stage: str | None = typer.Option(None, "--from", metavar="STAGE",
                                          help="Rerun this stage (name or number) and every later one."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the recipe and print each stage with run or "
                                 "skip and why; run nothing."),
) -> None:
    run_recipe_command(recipe, from_stage, dry_run)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"attnconv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    pass


_USER_OS_ERRORS = {
    errno.ENOSPC: "free some space or write elsewhere", errno.EDQUOT: "free some space or write elsewhere",
    errno.EACCES: "check the permissions", errno.EPERM: "check the permissions",
    errno.EROFS: "write to a writable file system", errno.ENAMETOOLONG: "choose a shorter name",
}


def _click_exception_types() -> tuple[type, type, type]:
    """(usage/parameter errors, Exit, Abort) in the click that typer uses: its own copy in typer >= 0.24."""
    try:
        from typer._click.exceptions import ClickException
        from typer.exceptions import Abort, Exit
    except ImportError:
        from click.exceptions import Abort, ClickException, Exit
    return ClickException, Exit, Abort


def _terminate(signum, frame) -> None:
    raise Terminated()


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    prefer_huge_pages()  # before any command imports torch
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)  # clean up as for Ctrl-C, then exit 143
    click_error, click_exit, click_abort = _click_exception_types()
    try:
        code = app(standalone_mode=False)
    except AttnconvError as e:
        _fail(str(e), e.exit_code)
    except Terminated:
        _fail(f"terminated (SIGTERM); {KEPT}", 143)
    except KeyboardInterrupt:
        _fail(f"interrupted; {KEPT}", 130)
    except OSError as e:  # the file system said no: a user's problem to fix, not a bug to trace
        if e.errno not in _USER_OS_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        _fail(f"{e.strerror or e}{where}; {_USER_OS_ERRORS[e.errno]}; {KEPT}", 1)
    except click_exit as e:
        sys.exit(e.exit_code)
    except click_abort as e:  # click turns a KeyboardInterrupt (and so SIGTERM's Terminated) into Abort
        if isinstance(e.__cause__ or e.__context__, Terminated):
            _fail(f"terminated (SIGTERM); {KEPT}", 143)
        _fail(f"interrupted; {KEPT}", 130)
    except click_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `attnconv convert` alone: show its help
            e.show()
            sys.exit(0)
        name = next((a + " " for a in sys.argv[1:2] if a in (*COMMANDS, "run")), "")
        _fail(f"{e.format_message().rstrip('.')} (see attnconv {name}--help)", e.exit_code)
    except Exception as e:  # torch and safetensors report a full disk in their own words; anything else is a bug
        if not disk_full(e):
            raise
        _fail(f"no space left on the disk; free some space or write elsewhere; {KEPT}", 1)
    if isinstance(code, int) and code:
        sys.exit(code)


def run() -> None:
    """The console entry point: `main()`, then exit without the interpreter's teardown.

    Unloading torch at exit takes over half a second, after the command's work is complete and on disk;
    exit handlers still run and the output streams are flushed. A crash exits normally, with its traceback.
    """
    try:
        main()
        code = 0
    except SystemExit as e:
        if not isinstance(e.code, int | None):
            raise
        code = e.code or 0
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)  # a thread still working: let the interpreter wait for it
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
