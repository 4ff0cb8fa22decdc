"""The structure others build on: settings declared once, the op and family registries, and transformers patches
that do not outlive the block that uses them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnconv.cli import COMMANDS, app
from attnconv.convert.ops import OPS
from attnconv.errors import AttnconvError
from attnconv.families import FAMILIES, SOURCE_FAMILIES, cache_shape
from attnconv.testing import FAMILIES as TEST_FAMILIES
from attnconv.testing import build_tiny_model, tiny_config
from attnconv.uptrain.settings import UptrainSettings


def test_every_command_option_is_a_settings_field_and_back():
    import typer.main

    for name, entry in COMMANDS.items():
        click_command = typer.main.get_command(app).commands[name]
        options = {p.name for p in click_command.params}
        fields = {f.name for f in dataclasses.fields(entry.settings) if f.metadata["spec"].cli}
        assert options == fields, name


def test_settings_are_checked_in_one_place_whatever_the_source():
    with pytest.raises(AttnconvError, match=r"^--lr must be a number > 0, not -1.0$"):
        UptrainSettings("m", "o", data="d", lr=-1.0)
    with pytest.raises(AttnconvError, match=r"^uptrain.lr must be a number > 0, not -1.0$"):
        UptrainSettings.from_mapping({"model": "m", "out": "o", "data": "d", "lr": -1.0})
    with pytest.raises(AttnconvError, match=r"uptrain.seq_length is not a setting of uptrain; did you mean 'seq_len'"):
        UptrainSettings.from_mapping({"model": "m", "out": "o", "data": "d", "seq_length": 128})
    with pytest.raises(AttnconvError, match=r"uptrain.steps must be an integer >= 1, not True"):
        UptrainSettings.from_mapping({"model": "m", "out": "o", "data": "d", "steps": True})
    s = UptrainSettings.from_mapping({"model": "m", "out": "o", "data": "d", "dtype": "bf16", "lr": "3e-4"})
    assert (s.dtype, s.lr) == ("bfloat16", 3e-4)
    record = s.record()
    assert record["lr"] == 3e-4 and "quiet" not in record


def test_every_family_op_is_registered_and_explained():
    for family in FAMILIES.values():
        for op in family.ops.values():
            assert op in OPS, (family.name, op)
    assert all(op.help for op in OPS.values())


def test_each_target_and_format_has_its_own_layer_target_speaking_the_protocol():
    """layout.TARGETS is keyed by (--to, --format): each MLA format is its own target, GQA/MQA one target whatever
    --format says; every target has each method the plan, layout and report call (convert/target.py)."""
    from attnconv.convert.layout import layer_target
    from attnconv.convert.settings import MLA_FORMATS, ConvertSettings
    from attnconv.convert.target import LayerTarget

    config = tiny_config("llama", n_heads=4, n_kv_heads=2).to_dict()
    made = {fmt: layer_target(ConvertSettings("m", "o", to="mla", format=fmt, kv_rank=(8,), init="svd",
                                              phases=False), config, "llama") for fmt in MLA_FORMATS}
    made["gqa"] = layer_target(ConvertSettings("m", "o", to="gqa", kv_heads=1, method="grouped"), config, "llama")
    assert len({type(t) for t in made.values()}) == len(made) == 3
    protocol = {n for n in [*vars(LayerTarget), *LayerTarget.__annotations__] if not n.startswith("_")}
    for name, target in made.items():
        assert not [n for n in protocol if not hasattr(target, n)], name


def test_the_family_registry_drives_test_models_kv_arithmetic_and_decode():
    assert TEST_FAMILIES == SOURCE_FAMILIES
    for name in SOURCE_FAMILIES:
        config = tiny_config(name, n_heads=4, n_kv_heads=4 if name == "gpt2" else 2, hidden=32, layers=3)
        shape = cache_shape(config)
        kv = 4 if name == "gpt2" else 2
        assert (shape.layers, shape.n_kv_heads, shape.head_dim) == (3, kv, 8)
        assert shape.bytes_per_token(2) == 3 * 2 * kv * 8 * 2
    from transformers import GPTBigCodeConfig

    assert cache_shape(GPTBigCodeConfig(n_embd=32, n_head=4, n_layer=2, multi_query=True)).values_per_layer == 16
    from attnconv.eval.decode import check_supported

    model = build_tiny_model("gpt2", "/tmp/attnconv-test-gpt2-structure", hidden=32, n_heads=4)
    from attnconv.loading import load_causal_lm

    with pytest.raises(AttnconvError, match="supported: llama, mistral, qwen2, qwen3, gemma, phi3"):
        check_supported(load_causal_lm(model))


def test_decode_attention_runs_after_an_uptrain_in_the_same_process(tmp_path, monkeypatch):
    """The training attention and the decode attention have their own names and are undone after use: after an
    uptrain in this process, the decode loop still runs attnconv's decode attention, every layer, every step."""
    from transformers import AttentionInterface

    from attnconv.eval.decode import greedy_generate
    from attnconv.loading import load_causal_lm
    from attnconv.patches import decode_attention
    from attnconv.textdata import tinyshakespeare_split
    from attnconv.uptrain.api import uptrain

    model = build_tiny_model("llama", tmp_path / "m", with_tokenizer=True, hidden=32, n_heads=4, n_kv_heads=2)
    (tmp_path / "train.txt").write_text(tinyshakespeare_split("train")[:20_000])
    uptrain(UptrainSettings(str(model), str(tmp_path / "up"), data=str(tmp_path / "train.txt"), steps=2, seq_len=512,
                            batch_size=1, cache_dir=str(tmp_path / "cache"), quiet=True))
    calls = []
    real = decode_attention.sdpa_gqa_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_attention, "sdpa_gqa_attention", spy)
    net = load_causal_lm(tmp_path / "up", dtype="float32")
    greedy_generate(net, torch.arange(5)[None], 4)
    assert len(calls) == 2 * 4  # 2 layers x (prefill + 3 steps)
    assert net.config._attn_implementation == "sdpa"
    assert not [k for k in AttentionInterface._global_mapping if k.startswith("attnconv")]


@pytest.mark.parametrize("name", [*COMMANDS, "run"])
def test_help_is_readable_at_80_columns(name):
    """At 80 columns each option's text starts by column 40, so it wraps into lines of several words (rich's
    three-column table left it a 22-column strip: a word or two per line), and no line but an example is wider."""
    import re

    from typer.testing import CliRunner

    result = CliRunner().invoke(app, [name, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    starts = [m.start(2) for ln in lines if (m := re.match(r"^\s+(-\S.*?)\s{2,}(\S.*)$", ln))]
    assert len(starts) >= 3 and max(starts) <= 40, result.output
    assert max(len(ln) for ln in lines if not ln.lstrip().startswith("attnconv ")) <= 80, result.output


def test_common_options_read_the_same_in_every_command():
    from attnconv.convert.settings import ConvertSettings
    from attnconv.eval.settings import EvalSettings

    for option_name in ("overwrite", "allow_pickle", "quiet"):
        helps = {cls.__name__: f.metadata["spec"].help for cls in (ConvertSettings, EvalSettings, UptrainSettings)
                 for f in dataclasses.fields(cls) if f.name == option_name}
        assert len(helps) == 3, (option_name, helps)
        if option_name != "overwrite":  # overwrite names what it replaces: OUT or --out
            assert len(set(helps.values())) == 1, helps


def test_demo_and_uptrain_print_sentences_and_tables_not_json():
    import importlib.util
    from pathlib import Path

    from rich.console import Console

    from attnconv.uptrain.command import summary_line

    line = summary_line("out", {"steps": 140, "tokens": 71680, "final_loss": 3.2, "eval_ppl": 158.04,
                                "tokens_per_s": 1234.5})
    assert line == "uptrain: out: 140 steps, 71,680 tokens, final loss 3.2000, held-out perplexity 158.04, " \
                   "1,234 tokens/s"
    spec = importlib.util.spec_from_file_location("demo", Path(__file__).parents[1] / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    row = {"impl": "attnconv", "batch": 8, "context": 480}
    results = {"models": [{"name": "q", "kv_bytes_per_token": 3072}, {"name": "n", "kv_bytes_per_token": 1536}],
               "decode": {"q": {"rows": [{**row, "tokens_per_s": 3000.0, "tokens_per_s_min": 2900.0,
                                          "tokens_per_s_max": 3100.0}]},
                          "n": {"rows": [{**row, "tokens_per_s": 3000.0, "tokens_per_s_min": 900.0,
                                          "tokens_per_s_max": 3900.0}]}}}
    console = Console(width=100, record=True)
    console.print(demo.decode_table({"quiet": "q", "noisy": "n"}, results))
    text = console.export_text()
    quiet, noisy = (next(ln for ln in text.splitlines() if name in ln) for name in ("quiet", "noisy"))
    assert "3000" in quiet and "busy machine" not in quiet
    assert "busy machine" in noisy and " 3000 " not in noisy and "900-3900" in noisy
