"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class AttnconvError(Exception):
    """A problem with the user's input, with a message that says what is wrong and how to fix it."""

    exit_code = 2
