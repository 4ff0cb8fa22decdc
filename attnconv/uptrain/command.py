"""`attnconv uptrain` (placeholder until the uptrain issue lands)."""

from attnconv.errors import AttnconvError


def uptrain_command(model: str) -> None:
    """Continue training a converted model for a short while to repair its quality."""
    raise AttnconvError("uptrain is not implemented yet")
