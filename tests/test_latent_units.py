"""Uptraining attnconv's DeepSeek-V3 output: its linear latent norm is trained in units AdamW can step in."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attnconv.uptrain.latent_units import LinearLatentNorm, from_training_units, to_training_units


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from attnconv.convert.api import convert
    from attnconv.convert.settings import ConvertSettings
    from attnconv.testing import build_tiny_model

    root = tmp_path_factory.mktemp("latent")
    build_tiny_model("llama", root / "src", hidden=64, n_heads=4, layers=2, seed=3)
    convert(ConvertSettings(root / "src", root / "ds", to="mla", kv_rank=(24,), rope_dim=8, init="svd",
                            phases=False, q_rank=32), progress=False)  # a query latent below the hidden size too
    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()  # noqa: E731
    return load(root / "src"), load(root / "ds")


def _kl(student, teacher, ids) -> torch.Tensor:  # KL(teacher || student), per sequence
    with torch.no_grad():
        target = F.log_softmax(teacher(ids).logits, -1)
    return F.kl_div(F.log_softmax(student(ids).logits, -1), target, log_target=True, reduction="batchmean")


def test_training_units_keep_the_function_and_restore_the_weights(models):
    _, ds = models
    ds = copy.deepcopy(ds)
    before = {k: v.clone() for k, v in ds.state_dict().items()}
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ds(ids).logits
        units = to_training_units(ds)
        assert len(units) == 4 and all(isinstance(norm, LinearLatentNorm) for m in ds.model.layers
                                       for norm in (m.self_attn.kv_a_layernorm, m.self_attn.q_a_layernorm))
        for rows in (ds.model.layers[0].self_attn.kv_a_proj_with_mqa.weight[:24],
                     ds.model.layers[0].self_attn.q_a_proj.weight):
            assert 0.5 < rows.square().sum(1).mean().sqrt() < 2  # unit scale: what AdamW's absolute steps need
        torch.testing.assert_close(ds(ids).logits, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        from_training_units(ds, units)
    after = ds.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-6, atol=0)


def test_one_adamw_step_repairs_instead_of_destroying(models):
    """The bug: AdamW's absolute step replaced latent rows of size ~1e-7 and the KL rose; in training units the
    same step lowers it."""
    src, ds = models
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    start = _kl(ds, src, ids).item()
    ends = {}
    for units in (False, True):
        model = copy.deepcopy(ds).train()
        if units:
            handle = to_training_units(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        _kl(model, src, ids).backward()
        opt.step()
        if units:
            from_training_units(model, handle)
        ends[units] = _kl(model.eval(), src, ids).item()
    assert ends[True] < start < ends[False]


def test_an_ordinary_deepseek_model_is_left_as_it_is():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16,
                              q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                              n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=1)
    model = DeepseekV3ForCausalLM(config)
    assert to_training_units(model) == {}
    assert not isinstance(model.model.layers[0].self_attn.kv_a_layernorm, LinearLatentNorm)
