"""Nothing non-finite is ever written: degenerate heads (zero key rows) get finite merges, NaN or Inf in a source
tensor or in calibration statistics is refused in one line naming where, and a seeded fuzz of calibration
statistics (zero rows, NaN, Inf, constant inputs) ends in such a line or in finite tensors, never a traceback."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from attnconv.convert.attention_weights import from_hf_attention
from attnconv.convert.gqa.calibrated import convert_layer
from attnconv.convert.mla.attnconv_format import convert_attnconv_layer
from attnconv.convert.mla.calibration import InputMoments
from attnconv.convert.mla.deepseek import convert_deepseek_layer
from attnconv.convert.mla.rope import select_pairs
from attnconv.errors import AttnconvError
from attnconv.testing import assert_one_line_error, build_tiny_model

K = "model.layers.0.self_attn.k_proj.weight"
CALIBRATE = ["--calibrate", "tinyshakespeare:train", "--calib-tokens", "256", "--calib-seq-len", "32"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_model("llama", tmp_path_factory.mktemp("nonfinite") / "m", with_tokenizer=True, hidden=64,
                            n_heads=4, max_positions=64)


def _edited(model, dest, edit):
    shutil.copytree(model, dest)
    state = load_file(model / "model.safetensors")
    edit(state)
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("method", ["fit", "grouped+aligned+fit"])
def test_a_group_of_zero_keys_merges_to_finite_weights_and_json(model, tmp_path, cli, method):
    src = _edited(model, tmp_path / "src", lambda s: s[K][:32].zero_())  # KV heads 0 and 1 (head_dim 16)
    code, _, err = cli("convert", src, tmp_path / "out", "--to", "gqa", "--kv-heads", "2", "--method", method,
                       *CALIBRATE)
    assert code == 0, err
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in out.values())
    groups = _strict_json(tmp_path / "out" / "attnconv.json")["conversion"]["layers"]["0"]["groups"]
    for g, heads in enumerate(groups):  # where the two zero heads merged together, the merged key is zero
        if sorted(heads) == [0, 1]:
            assert out[K][16 * g:16 * (g + 1)].abs().max() == 0
    assert method != "fit" or groups == [[0, 1], [2, 3]]


@pytest.mark.parametrize("args", [["--to", "mla", "--kv-rank", "16", *CALIBRATE],
                                  ["--to", "mla", "--format", "attnconv", "--kv-rank", "16", *CALIBRATE],
                                  ["--to", "gqa", "--kv-heads", "2", "--method", "grouped+aligned+fit", *CALIBRATE],
                                  ["--to", "gqa", "--kv-heads", "2"]])
def test_nan_in_a_source_tensor_is_refused_naming_it(model, tmp_path, cli, args):
    src = _edited(model, tmp_path / "src", lambda s: s[K].__setitem__((3, 5), float("nan")))
    code, _, err = cli("convert", src, tmp_path / "out", *args)
    assert_one_line_error(code, err, K, "NaN or Inf")
    assert not (tmp_path / "out").exists()


def test_activations_that_overflow_are_refused_naming_the_layer(model, tmp_path, cli):
    """Finite weights whose activations leave the float range: layer 1's statistics are not finite."""
    src = _edited(model, tmp_path / "src", lambda s: s["model.layers.0.mlp.down_proj.weight"].fill_(3e38))
    code, _, err = cli("convert", src, tmp_path / "out", "--to", "mla", "--format", "attnconv", "--kv-rank", "16",
                       *CALIBRATE)
    assert_one_line_error(code, err, "calibration statistics of layer 1", "NaN or Inf")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = build_tiny_model("llama", tmp_path_factory.mktemp("w"), n_heads=4, n_kv_heads=4, hidden=32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return from_hf_attention(model.model.layers[0].self_attn, model.config)


def _moments(rng: random.Random, hidden: int) -> InputMoments:
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    x = torch.randn(200, hidden, generator=g, dtype=torch.float64)
    kind = rng.choice(["zero rows", "nan", "inf", "constant", "zero", "few tokens"])
    if kind == "constant":
        x = x[:1].expand(200, hidden)
    elif kind == "few tokens":
        x = x[:3]
    elif kind == "zero":
        x = torch.zeros_like(x)
    elif kind == "zero rows":
        x[:, rng.sample(range(hidden), hidden // 2)] = 0
    m = InputMoments(x.mean(0), x.T @ x / len(x), len(x))
    if kind in ("nan", "inf"):
        i, j = rng.randrange(hidden), rng.randrange(hidden)
        m.second[i, j] = float("nan") if kind == "nan" else float("inf")
    return m


def _zeroed(w, rng: random.Random):
    """The layer with some of its heads' key, value or query rows zero."""
    d = w.shape.head_dim
    which, head = rng.choice(["k", "v", "q", None]), rng.randrange(w.shape.n_kv_heads)
    if which is None:
        return w
    t = getattr(w, which).clone()
    t[head * d:(head + 1) * d] = 0
    return replace(w, **{which: t})


def _augmented(m: InputMoments) -> torch.Tensor:
    h = m.mean.shape[0]
    s = torch.empty(h + 1, h + 1, dtype=torch.float64)
    s[:h, :h], s[:h, h], s[h, :h], s[h, h] = m.second, m.mean, m.mean, 1.0
    return s


def test_fuzzed_calibration_statistics_end_in_one_line_or_finite_weights(weights):
    rng = random.Random(0)
    outcomes = {"refused": 0, "finite": 0}
    for case in range(21):
        w, m = _zeroed(weights, rng), _moments(rng, weights.shape.hidden)
        try:
            if case % 3 == 0:
                out = convert_attnconv_layer(w, kv_rank=24, pairs=select_pairs("high", w.shape, 4), init="pca",
                                             moments=m)
            elif case % 3 == 1:
                out = convert_deepseek_layer(w, kv_rank=24, rope_dim=8, init="pca", moments=m)
            else:
                out = convert_layer(w, _augmented(m), 2, "grouped+aligned+fit")[0]
        except AttnconvError as e:
            assert "\n" not in str(e) and "NaN or Inf" in str(e), str(e)
            outcomes["refused"] += 1
            continue
        tensors = out.values() if isinstance(out, dict) else [out.q, out.k, out.v, out.o]
        assert all(torch.isfinite(t).all() for t in tensors if t is not None), case
        outcomes["finite"] += 1
    assert outcomes["refused"] > 3 and outcomes["finite"] > 8, outcomes
