"""Find a model (local folder or hub id) and load it safely: no pickles unless asked, no remote code."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from attnconv.errors import AttnconvError

if TYPE_CHECKING:
    import torch

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# What a conversion or an evaluation needs from a hub repo: never the pickles or other frameworks' weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.md", "*.py"]


def canonical_dtype(name: str | torch.dtype | None) -> str | None:
    """'auto'/None -> None (keep the checkpoint's dtype); otherwise torch's name for it ('bfloat16', ...)."""
    if name is None or name == "auto":
        return None
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise AttnconvError(f"unknown dtype {key!r}; use one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'auto'/None -> None (keep the checkpoint's dtype); otherwise a torch dtype."""
    canonical = canonical_dtype(name)
    if canonical is None:
        return None
    import torch

    return getattr(torch, canonical)


def resolve_source(src: str | Path, allow_pickle: bool = False) -> Path:
    """A local model folder, or a hub id downloaded with huggingface_hub (online users only)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AttnconvError(f"{src} is a file; pass the model's folder (the one holding config.json)")
        if not (path / "config.json").is_file():
            raise AttnconvError(f"{src} is not a model folder: it has no config.json")
        return path
    if not _HUB_ID.match(str(src)):
        raise AttnconvError(f"{src}: no such folder, and it is not a hub id (name or org/name)")
    try:
        from huggingface_hub import snapshot_download

        patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
        return Path(snapshot_download(str(src), allow_patterns=patterns))
    except Exception as e:  # network, auth, missing repo: all mean the same to a user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AttnconvError(f"{src}: no such folder, and the hub could not provide it ({first})") from None


def weight_files(path: Path) -> tuple[list[Path], str]:
    """The checkpoint's weight files and their format ('safetensors' or 'pickle')."""
    st = sorted(path.glob("*.safetensors"))
    if st:
        return st, "safetensors"
    pk = sorted(p for p in path.glob("*.bin") if p.name.startswith("pytorch_model"))
    if pk:
        return pk, "pickle"
    raise AttnconvError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")


def check_weights_allowed(path: Path, allow_pickle: bool) -> None:
    _, fmt = weight_files(path)
    if fmt == "pickle" and not allow_pickle:
        raise AttnconvError(
            f"{path} holds pickle weights (pytorch_model*.bin), which can run code when loaded; "
            "pass --allow-pickle to load them with torch.load(weights_only=True)"
        )


def load_causal_lm(src: str | Path, dtype: str | torch.dtype | None = None, allow_pickle: bool = False,
                   attn_implementation: str | None = "sdpa"):
    """AutoModelForCausalLM in eval mode; never trusts remote code."""
    from transformers import AutoModelForCausalLM

    import attnconv.models  # noqa: F401  (registers attnconv's own architectures with the Auto classes)

    path = resolve_source(src, allow_pickle)
    check_weights_allowed(path, allow_pickle)
    if isinstance(dtype, str) or dtype is None:
        dtype = parse_dtype(dtype) if dtype else None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype or "auto", trust_remote_code=False, use_safetensors=not allow_pickle,
            attn_implementation=attn_implementation,
        )
    except (ValueError, OSError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AttnconvError(f"{src}: transformers could not load it ({msg})") from None
    return model.eval()


def load_tokenizer(src: str | Path, tokenizer: str | Path | None = None):
    """The model's tokenizer, or the one named by --tokenizer."""
    from transformers import AutoTokenizer

    where = tokenizer if tokenizer is not None else src
    try:
        if tokenizer is not None and Path(str(tokenizer)).expanduser().is_dir():
            path = Path(str(tokenizer)).expanduser()  # a tokenizer-only folder has no config.json
        else:
            path = resolve_source(where)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except AttnconvError:
        raise
    except Exception:
        hint = "" if tokenizer else "; pass --tokenizer PATH_OR_ID"
        raise AttnconvError(f"no tokenizer could be loaded from {where}{hint}") from None
