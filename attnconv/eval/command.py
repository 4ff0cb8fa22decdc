"""`attnconv eval` (placeholder until the eval issue lands)."""

from attnconv.errors import AttnconvError


def eval_command(model: str) -> None:
    """Evaluate models: perplexity, agreement with a source model, decode speed and KV-cache memory."""
    raise AttnconvError("eval is not implemented yet")
