"""The one loading gate: every command that reads a model folder goes through here.

- A source is a local folder with config.json, or a hub id downloaded with huggingface_hub (online users only).
- Weights are the files transformers itself would load (model.safetensors, or the files its index lists), and
  only safetensors unless `allow_pickle`: an index may not point at pickles or outside the folder.
- No file the command reads may be a symbolic link that leaves the folder (a hub snapshot may link into its own
  cache repo, nowhere else).
- config.json is checked before anything is allocated: a JSON object, sizes that are positive integers within
  bounds, as many layers as the weights hold, and no more parameters than the weights hold.
- Loading refuses missing, unexpected or mis-shaped tensors: a randomly initialised parameter is never scored,
  trained or pushed. Remote code is never trusted.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from attnconv.dtypes import torch_dtype
from attnconv.errors import AttnconvError, first_line

if TYPE_CHECKING:
    import torch

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# What a conversion or an evaluation needs from a hub repo: never pickles or other frameworks' weights.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.md"]
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Config sizes that decide allocations: positive integers below these bounds (far above any released model).
_SIZE_KEYS = {"num_hidden_layers": 4096, "n_layer": 4096, "hidden_size": 1 << 18, "n_embd": 1 << 18,
              "num_attention_heads": 1 << 14, "n_head": 1 << 14, "num_key_value_heads": 1 << 14,
              "head_dim": 1 << 14, "intermediate_size": 1 << 20, "n_inner": 1 << 20, "vocab_size": 1 << 24,
              "max_position_embeddings": 1 << 26, "n_positions": 1 << 26, "kv_lora_rank": 1 << 16,
              "q_lora_rank": 1 << 16, "qk_rope_head_dim": 1 << 14, "qk_nope_head_dim": 1 << 14,
              "v_head_dim": 1 << 14}
# Norm epsilons: a division by sqrt(variance + eps) needs eps > 0 (a negative one gives NaN on a zero input).
_EPS_KEYS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")


def is_hub_id(spec: str) -> bool:
    """Whether SPEC has the form of a hub model id: `name` or `org/name`."""
    return _HUB_ID.match(spec) is not None


@dataclass(frozen=True)
class ModelFolder:
    """A checked source: its folder, and the root its files may link into (the folder, or a hub cache repo)."""

    spec: str
    path: Path
    root: Path
    from_hub: bool = False

    def inside(self, file: Path) -> Path:
        """FILE resolved, refused when a link takes it out of the folder."""
        target = file.resolve()
        if target != self.root and self.root not in target.parents:
            raise AttnconvError(f"{file} is a link to {target}, outside the model folder; copy the file into "
                                f"{self.path} or remove the link")
        return target


def resolve_source(src: str | Path, allow_pickle: bool = False) -> ModelFolder:
    """A local model folder, or a hub id downloaded with huggingface_hub."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise AttnconvError(f"{src} is a file; pass the model's folder (the one holding config.json)")
        if not (path / "config.json").is_file():
            raise AttnconvError(f"{src} is not a model folder: it has no config.json")
        folder = ModelFolder(str(src), path, path.resolve())
    else:
        if not is_hub_id(str(src)):
            raise AttnconvError(f"{src}: no such folder, and it is not a hub id (name or org/name)")
        try:
            from huggingface_hub import snapshot_download

            patterns = HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
            path = Path(snapshot_download(str(src), allow_patterns=patterns))
        except Exception as e:  # network, auth, missing repo: all mean the same to a user
            raise AttnconvError(f"{src}: no such folder, and the hub could not provide it ({first_line(e)})") from None
        # huggingface_hub's cache: snapshots/<rev>/file -> ../../blobs/<sha>, inside the repo's cache folder.
        root = path.parent.parent if path.parent.name == "snapshots" else path
        folder = ModelFolder(str(src), path, root.resolve(), from_hub=True)
    for p in folder.path.iterdir():
        if p.is_symlink() or p.is_file():
            folder.inside(p)
    read_config(folder)  # its sizes checked before anything else reads the folder
    return folder


def read_config(folder: ModelFolder) -> dict[str, Any]:
    """config.json as a dict, its allocation-deciding sizes checked (positive integers within bounds)."""
    path = folder.path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AttnconvError(f"{path} is not valid JSON ({first_line(e)}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise AttnconvError(f"{path} is not a JSON object; restore the model's config.json")
    if not isinstance(config.get("model_type"), str):
        raise AttnconvError(f"{path} has no model_type; restore the model's config.json")
    for key, bound in _SIZE_KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        for v in _per_layer(config, key, value, path):
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= bound:
                raise AttnconvError(f"{path}: {key} is {value!r}, not a positive integer up to {bound}"
                                    f"{' (or one per layer)' if key == 'kv_lora_rank' else ''}; the config is damaged")
    for key in _EPS_KEYS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0 < value < 1):
            raise AttnconvError(f"{path}: {key} is {value!r}, not a small positive number (such as 1e-06); the "
                                "config is damaged")
    return config


def _per_layer(config: dict, key: str, value: Any, path: Path) -> list:
    """The values of a size: attnconv's MLA format may give kv_lora_rank per layer (convert --kv-rank R1,R2,...),
    as many as the config's layers."""
    from attnconv.families import FAMILIES, family_of

    if not (key == "kv_lora_rank" and isinstance(value, list) and family_of(config) is FAMILIES["attnconv_mla"]):
        return [value]
    layers = config.get("num_hidden_layers")
    if len(value) != layers:
        raise AttnconvError(f"{path}: kv_lora_rank gives {len(value)} ranks for {layers!r} layers; the config is "
                            "damaged")
    return value


def read_provenance(folder: str | Path) -> dict[str, Any]:
    """A model folder's attnconv.json (what convert and uptrain recorded), or {} when it has none or it is damaged."""
    path = Path(folder) / "attnconv.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def weight_files(folder: ModelFolder, allow_pickle: bool = False) -> tuple[list[Path], str]:
    """The weight files transformers would load, and their format ('safetensors' or 'pickle')."""
    path = folder.path
    for single, index, fmt in ((SAFETENSORS, SAFETENSORS_INDEX, "safetensors"), (PICKLE, PICKLE_INDEX, "pickle")):
        if (path / single).exists():
            files = [path / single]
        elif (path / index).exists():
            files = _index_files(folder, path / index, ".safetensors" if fmt == "safetensors" else ".bin")
        else:
            continue
        if fmt == "pickle" and not allow_pickle:
            raise AttnconvError(f"{path} holds pickle weights ({files[0].name}), which can run code when loaded; "
                                "pass --allow-pickle to load them with torch.load(weights_only=True)")
        for f in files:
            folder.inside(f)
        return files, fmt
    raise AttnconvError(f"{path} has no weights ({SAFETENSORS}, {SAFETENSORS_INDEX} or pytorch_model*.bin)")


def _index_files(folder: ModelFolder, index: Path, suffix: str) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
        raise AttnconvError(f"{index} is not a valid weight index; restore it from the model's source") from None
    files = []
    for name in names:
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(suffix):
            raise AttnconvError(f"{index} lists {name!r}; an index may name only {suffix} files inside the folder")
        if not (folder.path / name).is_file():
            raise AttnconvError(f"{index} lists {name}, which is missing; download the model again")
        files.append(folder.path / name)
    if not files:
        raise AttnconvError(f"{index} lists no files; restore it from the model's source")
    return files


def check_layers(config: dict, tensor_names: list[str], where: Path) -> None:
    """The config's layer count against the layers the weights hold, and every layer holding the same tensors
    (when the names show layers). Torch-free: convert and info check this from the headers alone."""
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    per_layer: dict[int, set[str]] = {}
    for name in tensor_names:
        if m := _LAYER_INDEX.search(name):
            per_layer.setdefault(int(m.group(1)), set()).add(name[m.end():])
    if not per_layer:
        return
    if layers and (max(per_layer) + 1 != layers or len(per_layer) != layers):
        raise AttnconvError(f"{where}/config.json says {layers} layers but the weights hold {len(per_layer)}; the "
                            "config does not belong to these weights")
    every = set.union(*per_layer.values())
    for index, names in sorted(per_layer.items()):
        if names != every:
            missing = sorted(every - names)[:3]
            raise AttnconvError(f"{where}: layer {index} lacks {', '.join(missing)} that other layers hold; the "
                                "weights are incomplete: download or convert the model again")


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
