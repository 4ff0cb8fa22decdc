"""Shared test helpers: run the CLI in-process and capture its exit code and output."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture
def cli(capsys):
    """cli(*args) -> (exit_code, stdout, stderr) of `attnconv ARGS`, run in this process."""
    from attnconv.cli import main

    def run(*args):
        capsys.readouterr()
        old = sys.argv
        sys.argv = ["attnconv", *map(str, args)]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        finally:
            sys.argv = old
        out, err = capsys.readouterr()
        return code, out, err

    return run
