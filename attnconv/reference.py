"""attnconv's embedded reference model: a small Llama-architecture MHA LM trained on Tiny Shakespeare.

It is the default source for demos and tests that need real learned attention heads while the model hub is
out of reach. `scripts/train_reference.py` reproduces it; its training run is recorded in `train_run.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attnconv.errors import AttnconvError

REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"
TRAIN_RUN_FILE = "train_run.json"


def load_train_run(path: str | Path = REFERENCE_DIR) -> dict[str, Any]:
    """The recorded training run (seed, config, steps, held-out perplexity, weights sha256) of a reference model."""
    run_file = Path(path) / TRAIN_RUN_FILE
    if not run_file.is_file():
        raise AttnconvError(f"{run_file} is missing; rebuild the reference model with scripts/train_reference.py")
    try:
        return json.loads(run_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AttnconvError(f"{run_file} is not valid JSON ({e.msg} at line {e.lineno}); "
                            "rebuild it with scripts/train_reference.py") from None
