"""A model folder checked before anything is loaded from it: the first half of the loading gate (attnconv/loading.py).

- A source is a local folder with config.json, or a hub id downloaded with huggingface_hub (online users only).
- Weights are the files transformers itself would load (model.safetensors, or the files its index lists), and
  only safetensors unless `allow_pickle`: an index may not point at pickles or outside the folder.
- No file the command reads may be a symbolic link that leaves the folder (a hub snapshot may link into its own
  cache repo, nowhere else).
- config.json is checked before anything is allocated: a JSON object, sizes that are positive integers within
  bounds, and as many layers as the weights hold. Nothing here imports torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnconv.errors import AttnconvError, first_line

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
