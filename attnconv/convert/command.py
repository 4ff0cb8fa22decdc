"""`attnconv convert` and `attnconv info` (being written)."""

from attnconv.errors import AttnconvError


def convert_command(src: str) -> None:
    """Convert a checkpoint."""
    raise AttnconvError("convert is not implemented yet")


def info_command(model: str) -> None:
    """Describe a model."""
    raise AttnconvError("info is not implemented yet")
