"""info (KV-cache table against the closed form) and hub ids (downloaded through huggingface_hub)."""

from __future__ import annotations

import pytest

from attnconv.convert.info import kv_table_rows, model_info
from attnconv.loading import resolve_source
from attnconv.testing import assert_one_line_error, build_tiny_model


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    return build_tiny_model("mistral", tmp_path_factory.mktemp("m") / "mistral", n_heads=8, n_kv_heads=4)


def test_info_reads_heads_and_parameters_without_loading(mistral):
    from transformers import AutoModelForCausalLM

    info = model_info(mistral)
    model = AutoModelForCausalLM.from_pretrained(mistral)
    assert info.parameters == sum(p.numel() for p in model.parameters())
    assert (info.shape.layers, info.shape.n_heads, info.shape.n_kv_heads, info.shape.head_dim) == (2, 8, 4, 8)


def test_kv_table_is_the_closed_form(mistral):
    shape = model_info(mistral).shape
    rows = kv_table_rows(shape, batch=3, context=100, nbytes=2)
    assert [r["kv_heads"] for r in rows] == [8, 4, 2, 1]
    for r in rows:
        assert r["total_bytes"] == 2 * 3 * r["kv_heads"] * 8 * 100 * 2 * 2  # l x b x n_kv x hd x s x 2 x bytes
    assert [r["current"] for r in rows] == [False, True, False, False]
    assert [r["reachable"] for r in rows] == [False, True, True, True]
    mla = kv_table_rows(shape, batch=3, context=100, nbytes=2, kv_rank=12, rope_dim=4)[4:]
    assert [r["total_bytes"] for r in mla] == [2 * 3 * 100 * (12 + 4) * 2, 2 * 3 * 100 * (12 + 4 * 4) * 2]


@pytest.mark.parametrize("args, needle", [
    (["--rope-dim", "4"], "--rope-dim needs --kv-rank"),
    (["--kv-rank", "12", "--rope-dim", "5"], "an even number"),
    (["--kv-rank", "12", "--rope-dim", "64"], "exceeds the 8 RoPE dims of a head"),  # head_dim 8
])
def test_info_refuses_mla_rows_it_cannot_size(cli, mistral, args, needle):
    code, _, err = cli("info", mistral, *args)
    assert_one_line_error(code, err, needle)


def test_info_shows_no_mla_rows_where_convert_cannot_reach_them(cli, tmp_path):
    gpt2 = build_tiny_model("gpt2", tmp_path / "gpt2")
    code, _, err = cli("info", gpt2, "--kv-rank", "12")
    assert_one_line_error(code, err, "gpt2 has no RoPE attention")


def test_info_cli_prints_the_table(cli, mistral):
    code, out, err = cli("info", mistral, "--batch", "2", "--context", "64")
    assert code == 0, err
    assert "KV heads 4" in out and "GQA-4" in out and "MQA" in out and "this model" in out
    code, _, err = cli("info", mistral.parent / "missing")
    assert_one_line_error(code, err, "no such folder")


def test_hub_ids_download_only_safe_files(monkeypatch, mistral):
    calls = {}

    def fake_snapshot_download(repo_id, allow_patterns=None, **kw):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(mistral)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_source("someorg/some-model").path == mistral
    assert calls["repo_id"] == "someorg/some-model"
    assert "*.safetensors" in calls["allow_patterns"] and not any("bin" in p for p in calls["allow_patterns"])
    resolve_source("gpt2", allow_pickle=True)
    assert "*.bin" in calls["allow_patterns"]


def test_offline_hub_id_is_a_one_line_error(cli, monkeypatch, tmp_path):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, _, err = cli("convert", "someorg/some-model", tmp_path / "o", "--to", "mqa")
    assert_one_line_error(code, err, "someorg/some-model", "could not provide it")


def test_help_reads_as_a_manual(cli):
    code, out, _ = cli("--help")
    assert code == 0 and all(c in out for c in ("convert", "info", "eval", "uptrain"))
    code, out, _ = cli("convert", "--help")
    assert code == 0 and "--kv-heads" in out and "--dry-run" in out and "mean" in out
