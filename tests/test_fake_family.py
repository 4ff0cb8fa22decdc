"""A family is one record: a Llama clone under a new model_type, added only by `register_family` (and its
transformers classes registered with the Auto classes, as any new architecture is), converts to GQA, MQA and both
MLA formats, each output reproducing transformers' own forward of the source where the settings are lossless."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, LlamaModel

from attnconv.convert.api import convert
from attnconv.convert.settings import ConvertSettings
from attnconv.errors import AttnconvError
from attnconv.eval.decode import greedy_generate
from attnconv.families import (
    FAMILIES,
    ROPE_FAMILIES,
    SOURCE_FAMILIES,
    Family,
    llama_tiny_config,
    register_family,
    unregister_family,
)
from attnconv.loading import load_causal_lm
from attnconv.models.mla import CLASSES
from attnconv.testing import build_tiny_model

NAME = "fakellama"
FAKE = Family(NAME, (NAME,), "example/fake-llama", decode=True, hf_name="FakeLlama", tiny_config=llama_tiny_config)
D = 16  # head_dim of the tiny model: hidden 64 / 4 heads


class FakeLlamaConfig(LlamaConfig):
    model_type = NAME


class FakeLlamaModel(LlamaModel):
    config_class = FakeLlamaConfig


class FakeLlamaForCausalLM(LlamaForCausalLM):
    config_class = FakeLlamaConfig


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny fakellama checkpoint with 4 heads whose keys and values are all equal (so merging them into 2 or 1
    KV heads, or one shared DeepSeek RoPE key, loses nothing)."""
    AutoConfig.register(NAME, FakeLlamaConfig, exist_ok=True)  # transformers has no unregister: the name is unique
    AutoModel.register(FakeLlamaConfig, FakeLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(FakeLlamaConfig, FakeLlamaForCausalLM, exist_ok=True)
    register_family(FAKE)
    try:
        path = build_tiny_model(NAME, tmp_path_factory.mktemp("fake") / "src", n_heads=4, n_kv_heads=4)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.weight.copy_(proj.weight[:D].repeat(4, 1))
        model.save_pretrained(path)
        yield path
    finally:
        unregister_family(NAME)


IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def reference(source):
    """transformers' own forward of the source (FakeLlamaForCausalLM, i.e. Llama's)."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    assert type(model) is FakeLlamaForCausalLM
    with torch.no_grad():
        return model(IDS).logits


def _check_output(path, reference, atol: float):
    """The output loads (through attnconv's checks), reproduces the source's logits, and attnconv's decode loop
    (the cache and attention its family record names) continues the prompt as the forward does."""
    model = load_causal_lm(path, dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference, atol=atol, rtol=0)
    assert torch.equal(greedy_generate(model, IDS, 2).tokens[:, 0], reference[:, -1].argmax(-1))
    return model


def test_registering_a_record_is_all_it_takes_and_unregistering_undoes_it(source):
    def known() -> list[bool]:
        return [NAME in SOURCE_FAMILIES, NAME in ROPE_FAMILIES, f"{NAME}_mla" in FAMILIES["attnconv_mla"].model_types,
                NAME in CLASSES]  # the last: attnconv's MLA classes for it, registered with transformers

    assert known() == [True] * 4
    with pytest.raises(AttnconvError, match="already known"):
        register_family(FAKE)
    try:
        unregister_family(NAME)
        assert known() == [False] * 4
    finally:
        register_family(FAKE)
    assert known() == [True] * 4
    unknown = dataclasses.replace(FAKE, name="fakellama2", model_types=("fakellama2",))
    with pytest.raises(AttnconvError, match="transformers does not know model_type 'fakellama2'"):
        register_family(unknown)
    assert "fakellama2" not in FAMILIES


@pytest.mark.parametrize("settings", [dict(to="gqa", kv_heads=2), dict(to="mqa")])
def test_gqa_and_mqa_reproduce_the_source(source, reference, tmp_path, settings):
    convert(ConvertSettings(source, tmp_path / "out", **settings), progress=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == NAME and config["num_key_value_heads"] == settings.get("kv_heads", 1)
    _check_output(tmp_path / "out", reference, atol=1e-5)


@pytest.mark.parametrize("fmt, kv_rank, architecture", [
    ("attnconv", 4 * (2 * D - D), "FakeLlamaMLAForCausalLM"),  # every NoPE key and value dim of every KV head
    ("deepseek-v3", D, "DeepseekV3ForCausalLM"),  # equal heads: one shared RoPE key, the latent the values
])
def test_both_mla_formats_reproduce_the_source(source, reference, tmp_path, fmt, kv_rank, architecture):
    convert(ConvertSettings(source, tmp_path / "mla", to="mla", format=fmt, kv_rank=(kv_rank,), rope_dim=D,
                            init="svd", phases=False), progress=False)
    config = json.loads((tmp_path / "mla" / "config.json").read_text())
    assert config["architectures"] == [architecture]
    assert type(_check_output(tmp_path / "mla", reference, atol=1e-4)).__name__ == architecture

