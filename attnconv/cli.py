"""The `attnconv` command line: thin wrappers over typed library functions.

Each subcommand lives beside its library code (`attnconv/<area>/command.py`); this file only
assembles them and turns `AttnconvError` into a one-line message and a non-zero exit.
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
import threading

import typer

from attnconv import __version__
from attnconv.convert.command import convert_command, info_command
from attnconv.errors import AttnconvError
from attnconv.eval.command import eval_command
from attnconv.push.command import push_command
from attnconv.runtime import prefer_huge_pages
from attnconv.uptrain.command import uptrain_command

app = typer.Typer(
    name="attnconv",
    help=(
        "Convert Hugging Face causal-LM checkpoints with multi-head attention into attention with a "
        "much smaller KV cache (GQA, MQA), repair them with short uptraining, measure the result, and publish it."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("convert", no_args_is_help=True)(convert_command)
app.command("info", no_args_is_help=True)(info_command)
app.command("eval", no_args_is_help=True)(eval_command)
app.command("uptrain", no_args_is_help=True)(uptrain_command)
app.command("push", no_args_is_help=True)(push_command)


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
    errno.EROFS: "write to a writable file system",
}


def _click_exception_types() -> tuple[type, type, type]:
    """(usage/parameter errors, Exit, Abort) in the click that typer uses: its own copy in typer >= 0.24."""
    try:
        from typer._click.exceptions import ClickException
        from typer.exceptions import Abort, Exit
    except ImportError:
        from click.exceptions import Abort, ClickException, Exit
    return ClickException, Exit, Abort


def main() -> None:
    prefer_huge_pages()  # before any command imports torch
    click_error, click_exit, click_abort = _click_exception_types()
    try:
        app(standalone_mode=False)
    except AttnconvError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to the output folder", file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # the file system said no: a user's problem to fix, not a bug to trace
        if e.errno not in _USER_OS_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"error: {e.strerror or e}{where}; {_USER_OS_ERRORS[e.errno]}; the output folder was not created "
              "or left as it was", file=sys.stderr)
        sys.exit(1)
    except click_exit as e:
        sys.exit(e.exit_code)
    except click_abort:
        sys.exit(1)
    except click_error as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `attnconv convert` alone: show its help
            e.show()
            sys.exit(0)
        commands = {c.name for c in app.registered_commands}
        command = next((a + " " for a in sys.argv[1:2] if a in commands), "")
        print(f"error: {e.format_message().rstrip('.')} (see attnconv {command}--help)", file=sys.stderr)
        sys.exit(e.exit_code)


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
