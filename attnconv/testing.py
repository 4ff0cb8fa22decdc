"""Tiny real Hugging Face checkpoints, built from transformers config classes (tests, demo, benchmarks).

`save_pretrained` writes the same layout as a hub checkpoint, so converting and loading them exercises
the same code paths as a real model, in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from attnconv.families import FAMILIES as ALL_FAMILIES
from attnconv.families import SOURCE_FAMILIES

TOKENIZER_DIR = Path(__file__).resolve().parent / "data" / "gpt2-tokenizer"
FAMILIES = SOURCE_FAMILIES  # every family attnconv converts has a tiny test model here


def tiny_config(family: str, *, n_heads: int = 4, n_kv_heads: int | None = None, hidden: int = 64,
                layers: int = 2, vocab: int = 256, max_positions: int = 512, init_std: float = 0.1,
                extra: dict | None = None):
    """A transformers config of the given family, small enough for a unit test (`extra`: more config fields).
    Its fields are the family record's `tiny_config`; its class is the one transformers maps its model_type to."""
    from transformers import AutoConfig

    record = ALL_FAMILIES.get(family)
    if record is None or not record.source or record.tiny_config is None:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    kwargs = record.tiny_config(vocab=vocab, hidden=hidden, layers=layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                                max_positions=max_positions, init_std=init_std)
    return AutoConfig.for_model(record.model_types[0], **{**kwargs, **(extra or {})})


def build_tiny_model(family: str, out: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     max_shard_size: str | None = None, with_tokenizer: bool = False,
                     randomize_biases: bool = True, **config_kwargs) -> Path:
    """Build a randomly initialised model of FAMILY and `save_pretrained` it to OUT (safetensors).

    with_tokenizer: use the GPT-2 vocabulary (50257) and copy its tokenizer files beside the weights.
    randomize_biases/norms: HF initialises biases to 0 and norms to 1; random values make tests able to
    see a bias or norm that a conversion dropped or misplaced.
    """
    from transformers import AutoModelForCausalLM

    if with_tokenizer:
        config_kwargs["vocab"] = 50257
    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if randomize_biases:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "norm" in name or "ln_" in name:
                    p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    out = Path(out)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    from attnconv.loading import quiet_transformers

    with quiet_transformers():
        model.save_pretrained(out, **kwargs)
    if with_tokenizer:
        for f in TOKENIZER_DIR.iterdir():
            if f.name != "NOTICE":
                shutil.copy(f, out / f.name)
    return out


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A bad input gives a non-zero exit and one `error:` line that says what is wrong, never a traceback."""
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def add_massive_dimension(model, *, dim: int = 0, size: float = 30.0, norm_weight: float = 0.02, seed: int = 0):
    """Give a loaded Llama-like model a massive activation, as real LMs have, in place: embedding channel DIM
    takes a size drawn per token in [0, SIZE], and every input norm reads it at NORM_WEIGHT. After the norm
    the other channels then shrink or grow with that size, so what attention reads varies in scale across
    tokens (SmolLM2: one direction holds ~50% of the normalised input), which random tiny models lack."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[:, dim] = size * torch.rand(emb.shape[0], generator=g).to(emb.dtype)
        for layer in model.model.layers:
            layer.input_layernorm.weight[dim] = norm_weight
    return model
