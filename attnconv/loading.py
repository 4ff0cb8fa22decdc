"""The one loading gate: every command that reads a model folder goes through here.

- The folder, its weight files and config.json are checked first (attnconv/model_folder.py).
- No more parameters may be built than the weights hold, and loading refuses missing, unexpected or mis-shaped
  tensors: a randomly initialised parameter is never scored, trained or pushed. Remote code is never trusted.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnconv.dtypes import torch_dtype
from attnconv.errors import AttnconvError, first_line
from attnconv.model_folder import ModelFolder, check_layers, read_config, resolve_source, weight_files

if TYPE_CHECKING:
    import torch


def read_provenance(folder: str | Path) -> dict[str, Any]:
    """A model folder's attnconv.json (what convert and uptrain recorded), or {} when it has none or it is damaged."""
    path = Path(folder) / "attnconv.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_config(src: str | Path | ModelFolder, allow_pickle: bool = False):
    """transformers' config object for a checked source (attnconv's own architectures registered)."""
    from transformers import AutoConfig

    folder = src if isinstance(src, ModelFolder) else resolve_source(src, allow_pickle)
    read_config(folder)
    try:
        return AutoConfig.from_pretrained(folder.path, trust_remote_code=False)
    except Exception as e:  # unknown model_type, wrong value types: transformers' own checks
        raise AttnconvError(f"{folder.spec}: its config.json could not be read ({first_line(e)})") from None


def _checkpoint_tensors(files: list[Path], fmt: str) -> dict[str, tuple[int, ...]]:
    from attnconv.tensor_io import CheckpointReader

    return {name: meta.shape for name, meta in CheckpointReader(files, fmt).tensors.items()}


def _expected_parameters(config) -> tuple[int, set[str], str]:
    """Parameters (tied ones once) the architecture builds from this config, counted on the meta device: their
    number, their names, and the base model's prefix (checkpoints may omit it)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    named = dict(model.named_parameters())
    return sum(p.numel() for p in named.values()), set(named), getattr(model, "base_model_prefix", "") or ""


def _missing_names(expected: set[str], held: set[str], prefix: str) -> list[str]:
    """Expected parameter names the checkpoint lacks, with or without the base model's prefix."""
    def present(name: str) -> bool:
        bare = name.removeprefix(prefix + ".") if prefix else name
        return name in held or bare in held or (f"{prefix}.{name}" in held if prefix else False)

    return sorted(n for n in expected if not present(n))


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars, log lines and deprecation warnings stay out of attnconv's output within
    this block (attnconv shows its own progress); the previous settings come back after it."""
    from transformers.utils import logging as hf_logging

    bars, level = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def load_causal_lm(src: str | Path | ModelFolder, dtype: str | torch.dtype | None = None, allow_pickle: bool = False,
                   attn_implementation: str | None = "sdpa"):
    """AutoModelForCausalLM in eval mode, through every check of this module."""
    from transformers import AutoModelForCausalLM

    folder = src if isinstance(src, ModelFolder) else resolve_source(src, allow_pickle)
    files, fmt = weight_files(folder, allow_pickle)
    raw = read_config(folder)
    tensors = _checkpoint_tensors(files, fmt)
    check_layers(raw, list(tensors), folder.path)
    config = load_config(folder)
    held = sum(_numel(s) for s in tensors.values())
    try:
        expected, names, prefix = _expected_parameters(config)
    except Exception as e:
        raise AttnconvError(f"{folder.spec}: transformers cannot build its architecture ({first_line(e)})") from None
    if expected > held:
        missing = _missing_names(names, set(tensors), prefix)
        what = f"missing {', '.join(missing[:3])}" if missing else f"{held:,} of {expected:,} parameters"
        raise AttnconvError(f"{folder.spec}: its weights do not match its architecture ({what}); the config does "
                            "not belong to these weights, or the weights are incomplete")
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                folder.path, config=config, dtype=torch_dtype(dtype) or "auto", trust_remote_code=False,
                use_safetensors=fmt == "safetensors", attn_implementation=attn_implementation,
                output_loading_info=True)
    except Exception as e:  # corrupt files, shapes that do not fit: transformers' message, on one line
        raise AttnconvError(f"{folder.spec}: transformers could not load it ({first_line(e)})") from None
    problems = [f"{kind} {', '.join(sorted(info.get(key) or [])[:3])}"
                for key, kind in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                                  ("mismatched_keys", "mis-shaped")) if info.get(key)]
    if problems:
        raise AttnconvError(f"{folder.spec}: its weights do not match its architecture ({'; '.join(problems)}); "
                            "download or convert the model again")
    return model.eval()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def load_tokenizer(src: str | Path | ModelFolder, tokenizer: str | Path | None = None):
    """The model's tokenizer, or the one named by --tokenizer (a folder, or a hub id)."""
    from transformers import AutoTokenizer

    where = tokenizer if tokenizer is not None else src
    try:
        if isinstance(where, ModelFolder):
            path = where.path
        elif tokenizer is not None and Path(str(tokenizer)).expanduser().is_dir():
            path = Path(str(tokenizer)).expanduser()  # a tokenizer-only folder has no config.json
            folder = ModelFolder(str(path), path, path.resolve())
            for p in path.iterdir():
                folder.inside(p)
        else:
            path = resolve_source(where).path
        loaded = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except AttnconvError:
        raise
    except Exception:
        loaded = None
    hint = "" if tokenizer else "; pass --tokenizer PATH_OR_ID"
    spec = where.spec if isinstance(where, ModelFolder) else where
    if loaded is None:
        raise AttnconvError(f"no tokenizer could be loaded from {spec}{hint}")
    # Without tokenizer.json (or vocab files) transformers builds a tokenizer with no vocabulary, which turns
    # every text into no tokens: say so here rather than "the data has 0 tokens" later.
    if not loaded("The tokenizer works.", add_special_tokens=False)["input_ids"]:
        raise AttnconvError(f"the tokenizer of {spec} has no vocabulary ({len(loaded)} token(s)): its "
                            f"tokenizer.json or vocabulary files are missing{hint}")
    return loaded
