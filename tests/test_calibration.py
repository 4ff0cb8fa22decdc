"""The layer-wise calibration runner against transformers' fully loaded model, and calibration tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attnconv.calibration import CovarianceCollector, calibrate_layers, calibration_tokens
from attnconv.calibration import runner as runner_module
from attnconv.calibration import tokens as tokens_module
from attnconv.errors import AttnconvError
from attnconv.families import ROPE_FAMILIES
from attnconv.testing import TOKENIZER_DIR, build_tiny_model
from attnconv.textdata import WIKITEXT2_TEST

FAMILIES = ROPE_FAMILIES


class StoreInputs:
    """A collector that keeps what it is fed (tests only: real collectors keep sums)."""

    def __init__(self):
        self.xs, self.positions = [], []

    def update(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        self.xs.append(x.clone())
        self.positions.append(positions.clone())


def hooked_attention_inputs(path, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's self_attn input ([n_tokens, hidden]) from one forward of the fully loaded HF model."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = [None] * model.config.num_hidden_layers

    def hook(i):
        def pre(module, args, kwargs):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            inputs[i] = x.reshape(-1, x.shape[-1]).clone()

        return pre

    for i, layer in enumerate(model.model.layers):
        layer.self_attn.register_forward_pre_hook(hook(i), with_kwargs=True)
    with torch.no_grad():
        model(tokens)
    return inputs


@pytest.mark.parametrize("n_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_runner_feeds_the_attention_inputs_of_the_loaded_model(tmp_path, family, n_kv):
    path = build_tiny_model(family, tmp_path / family, n_heads=4, n_kv_heads=n_kv, layers=3)
    tokens = torch.randint(0, 256, (5, 12), generator=torch.Generator().manual_seed(1))
    # 24 tokens per call: batches of 2, 2 and 1 sequences (the last batch's masks are built for its own size).
    got = {i: c for i, c in calibrate_layers(path, tokens, lambda i: [StoreInputs(), CovarianceCollector()],
                                             batch_tokens=24, progress=False)}
    expected = hooked_attention_inputs(path, tokens)
    assert sorted(got) == [0, 1, 2]
    for i, x_ref in enumerate(expected):
        store, cov = got[i]
        x = torch.cat(store.xs)  # [n_tokens, hidden]
        assert [len(b) for b in store.xs] == [24, 24, 12]
        assert x.dtype == torch.float32 and x.shape == x_ref.shape
        assert (x - x_ref).abs().max().item() <= 1e-5, (family, i)
        assert torch.equal(torch.cat(store.positions), torch.arange(12).repeat(5))
        # The covariance path equals the stored-activations path.
        x64 = x_ref.double()
        assert cov.count == 60
        torch.testing.assert_close(cov.second_moment(), x64.T @ x64 / 60, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(cov.mean(), x64.mean(0), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(cov.covariance(), torch.cov(x64.T, correction=0), rtol=1e-9, atol=1e-9)


def test_runner_is_lazy_and_frees_each_layer(tmp_path, monkeypatch):
    """Layer l + 1 is neither built nor computed until layer l's statistics are consumed, and every layer is
    back on the meta device when its statistics are handed out."""
    monkeypatch.setattr(runner_module, "PROGRESS_AFTER_S", 0.0)  # the bar is drawn from the first batch
    path = build_tiny_model("llama", tmp_path / "m", layers=3)
    asked = []

    def make(i):
        asked.append(i)
        return [CovarianceCollector()]

    model = runner_module.LayerwiseModel(path)
    run = runner_module._run(model, torch.randint(0, 256, (2, 8)), make, batch=1, progress=True)
    assert asked == []
    for index, _ in run:
        assert asked == list(range(index + 1))
        assert all(p.is_meta for p in model.model.parameters())


def test_runner_refuses_a_family_without_decoder_layers(tmp_path):
    path = build_tiny_model("gpt2", tmp_path / "gpt2")
    with pytest.raises(AttnconvError, match="self_attn") as e:
        calibrate_layers(path, torch.zeros(1, 4, dtype=torch.long), lambda i: [])
    assert "\n" not in str(e.value)


def gpt2_tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_calibration_tokens_are_the_start_of_the_text(monkeypatch):
    """Tokenised chunk by chunk (cut at lone line breaks), the ids equal those of the whole text at once."""
    tok = gpt2_tokenizer()
    monkeypatch.setattr(tokens_module, "CHUNK_CHARS", 500)
    ids = calibration_tokens(None, tok, 1000, 64)  # the default: the first half of the shipped WikiText-2 test split
    assert ids.shape == (16, 64) and ids.dtype == torch.long  # ceil(1000 / 64) rows
    whole = tok(WIKITEXT2_TEST.read_text(encoding="utf-8")[:20000], add_special_tokens=False)["input_ids"]
    assert ids.flatten().tolist() == whole[:1024]


def test_calibration_tokens_join_documents_with_eos_and_stop_reading_early(tmp_path):
    tok = gpt2_tokenizer()
    (tmp_path / "a.txt").write_text("First document here.\nIt has two lines.", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Second one, " * 20, encoding="utf-8")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe not UTF-8")  # never read: the first two files are enough
    a = tok((tmp_path / "a.txt").read_text(), add_special_tokens=False)["input_ids"]
    b = tok((tmp_path / "b.txt").read_text(), add_special_tokens=False)["input_ids"]
    ids = calibration_tokens(str(tmp_path), tok, len(a) + 5, len(a) + 5)
    assert ids.flatten().tolist() == (a + [tok.eos_token_id] + b)[:len(a) + 5]


def test_short_text_is_refused_in_one_line(tmp_path):
    tok = gpt2_tokenizer()
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of text.", encoding="utf-8")
    n = len(tok(short.read_text(), add_special_tokens=False)["input_ids"]) + 1  # + EOS
    with pytest.raises(AttnconvError) as e:
        calibration_tokens(str(short), tok, 4096, 4)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"only {n} tokens" in msg and "4096" in msg and "--calib-tokens" in msg and "--calibrate" in msg


def test_runner_replays_each_layers_own_mask(tmp_path):
    """Qwen2 with sliding-window layers after a full-attention one: each layer gets the mask of its type."""
    from attnconv.testing import tiny_config

    config = tiny_config("qwen2", layers=3)
    config.use_sliding_window, config.sliding_window = True, 4
    config.layer_types = ["full_attention", "sliding_attention", "sliding_attention"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    tokens = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(2))
    got = dict(calibrate_layers(tmp_path / "m", tokens, lambda i: [StoreInputs()], batch_tokens=20, progress=False))
    expected = hooked_attention_inputs(tmp_path / "m", tokens)
    for i, x_ref in enumerate(expected):
        assert (torch.cat(got[i][0].xs) - x_ref).abs().max().item() <= 1e-5, i


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_runner_reads_sharded_bf16_checkpoints(tmp_path, dtype):
    """A bf16 checkpoint in several shards, computed in DTYPE: the inputs transformers computes in that dtype."""
    path = build_tiny_model("qwen2", tmp_path / "m", dtype=torch.bfloat16, max_shard_size="20KB", n_kv_heads=2)
    assert len(list(path.glob("*.safetensors"))) > 2
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(3))
    got = dict(calibrate_layers(path, tokens, lambda i: [StoreInputs()], dtype=dtype, progress=False))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    expected = []
    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs: expected.append(kwargs["hidden_states"].reshape(-1, 64).float()), with_kwargs=True)
    with torch.no_grad():
        model(tokens)
    for i, x_ref in enumerate(expected):
        x = torch.cat(got[i][0].xs)
        assert x.dtype == torch.float32
        assert (x - x_ref).abs().max().item() <= (1e-5 if dtype == torch.float32 else 0.0), i


def test_runner_refuses_a_broken_config_in_one_line(tmp_path):
    path = build_tiny_model("llama", tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(AttnconvError, match="config.json is not valid JSON") as e:
        calibrate_layers(path, torch.zeros(1, 4, dtype=torch.long), lambda i: [])
    assert "\n" not in str(e.value)
