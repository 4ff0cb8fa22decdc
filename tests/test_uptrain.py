"""attnconv uptrain in one process: loss falls after MQA conversion, distillation, only-attention, SDPA GQA path."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from attnconv.testing import build_tiny_model
from attnconv.textdata import tinyshakespeare_split
from attnconv.uptrain.api import uptrain
from attnconv.uptrain.data import BlockSchedule, pack_blocks, tokenize_cached
from attnconv.uptrain.distill import DistillConfig, kl_teacher_student, training_loss
from attnconv.uptrain.settings import UptrainSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
STEPS = dict(seq_len=32, batch_size=4, quiet=True)


def mqa_copy(src, dst):
    """Mean-pool K/V heads into one (the GQA paper's conversion), written by hand here as an independent path."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    state = model.state_dict()
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            w = state[name]  # [n_kv * hd, hidden]
            state[name] = w.view(cfg.num_key_value_heads, hd, -1).mean(0)  # [hd, hidden]
    cfg.num_key_value_heads = 1
    mqa = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    mqa.load_state_dict(state)
    mqa.save_pretrained(dst)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "vocab", "merges", "special")):
            shutil.copy(f, dst / f.name)
    (dst / "attnconv.json").write_text(json.dumps({"convert": {"method": "mean", "n_kv_heads": 1}}))
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("uptrain")
    mha = build_tiny_model("llama", root / "mha", with_tokenizer=True, n_heads=4, hidden=64, layers=2)
    mqa = mqa_copy(mha, root / "mqa")
    (root / "train.txt").write_text(tinyshakespeare_split("train")[:40_000])
    (root / "test.txt").write_text(tinyshakespeare_split("test")[:8_000])
    return {"root": root, "mha": mha, "mqa": mqa, "train": str(root / "train.txt"), "test": str(root / "test.txt"),
            "cache": str(root / "cache")}


def _windows(env, seq_len=32, n=8):
    from attnconv.loading import load_tokenizer

    stream, _ = tokenize_cached([open(env["test"]).read()], load_tokenizer(env["mha"]), env["cache"])
    return pack_blocks(stream, seq_len + 1)[:n]  # [n, seq_len + 1]


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_loss_falls_after_mqa_conversion_and_output_loads(env, monkeypatch):
    from attnconv.uptrain import api, data

    fingerprints = []  # each one sorts and serialises GPT-2's 50,257-token vocabulary: once per run
    for module in (api, data):
        monkeypatch.setattr(module, "tokenizer_facts",
                            lambda tok, real=data.tokenizer_facts: fingerprints.append(1) or real(tok))
    out = env["root"] / "mqa-up"
    r = uptrain(UptrainSettings(str(env["mqa"]), str(out), data=env["train"], steps=10, lr=1e-2, warmup=2,
                                eval_data=env["test"], eval_every=5, max_eval_windows=16, cache_dir=env["cache"],
                                **STEPS))
    assert len(fingerprints) == 1
    losses = [row["loss"] for row in r["log"]]
    assert len(losses) == 10 and losses[-1] < losses[0] - 1.5, losses
    # Step 1's logged loss equals transformers' own LM loss of the input model on the same blocks.
    from attnconv.loading import load_tokenizer

    stream, _ = tokenize_cached([open(env["train"]).read()], load_tokenizer(env["mqa"]), env["cache"])
    blocks = pack_blocks(stream, 33)
    idx = BlockSchedule(len(blocks), 4, 1, 1, 0).micro_batches(0, 0)[0]
    with torch.no_grad():
        ref = _load(env["mqa"])(input_ids=blocks[idx], labels=blocks[idx]).loss  # HF shifts labels itself
    assert abs(losses[0] - ref.item()) < 1e-4
    # The output loads with from_pretrained, keeps one KV head and its held-out ppl matches the log.
    trained = _load(out)
    assert trained.config.num_key_value_heads == 1
    w = _windows(env)
    with torch.no_grad():
        nll = trained(input_ids=w[:, :-1], labels=w[:, :-1]).loss
    assert nll.item() < math.log(50257)
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == list(range(1, 11)) and "eval_ppl" in log[4] and "eval_ppl" in log[9]
    assert abs(log[9]["eval_ppl"] - r["results"]["eval_ppl"]) < 1e-9
    prov = json.loads((out / "attnconv.json").read_text())
    assert prov["convert"] == {"method": "mean", "n_kv_heads": 1}
    assert prov["uptrain"]["settings"]["steps"] == 10 and prov["uptrain"]["results"]["final_loss"] == losses[-1]
    assert (out / "tokenizer.json").is_file() and not (env["root"] / "mqa-up.uptrain-run").exists()


def test_kl_matches_closed_form():
    torch.manual_seed(0)
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    for temp in (1.0, 2.0):
        ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=t / temp),
                                                torch.distributions.Categorical(logits=s / temp)).mean()
        assert abs(kl_teacher_student(s, t, temp).item() - ref.item()) < 1e-6
    targets = torch.randint(0, 11, (2, 3))
    loss, parts = training_loss(s, targets, t, DistillConfig(weight=0.25, temperature=2.0))
    ce = torch.nn.functional.cross_entropy(s.view(-1, 11), targets.view(-1))
    assert abs(loss.item() - (0.75 * ce + 0.25 * 4.0 * parts["kl"]).item()) < 1e-6


def test_distillation_reaches_lower_kl_than_lm_loss(env):
    kls = {}
    w = _windows(env)
    with torch.no_grad():
        teacher_logits = _load(env["mha"])(input_ids=w[:, :-1]).logits
        start = kl_teacher_student(_load(env["mqa"])(input_ids=w[:, :-1]).logits, teacher_logits).item()
    for name, extra in (("lm", {}), ("distill", {"teacher": str(env["mha"]), "distill_weight": 1.0})):
        out = env["root"] / f"kl-{name}"
        uptrain(UptrainSettings(str(env["mqa"]), str(out), data=env["train"], steps=6, lr=5e-3, cache_dir=env["cache"],
                                **STEPS, **extra))
        with torch.no_grad():
            kls[name] = kl_teacher_student(_load(out)(input_ids=w[:, :-1]).logits, teacher_logits).item()
    assert kls["distill"] < 0.9 * kls["lm"] and kls["distill"] < 0.9 * start, (start, kls)


def test_only_attention_changes_only_attention(env):
    out = env["root"] / "attn-only"
    uptrain(UptrainSettings(str(env["mqa"]), str(out), data=env["train"], steps=2, lr=1e-3, train="only-attention",
                            cache_dir=env["cache"], **STEPS))
    before, after = load_file(env["mqa"] / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    attn = {k for k in before if ".self_attn." in k}
    assert changed == attn and len(attn) == 8


def test_training_attention_runs_sdpa_with_enable_gqa(env, monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False), kwargs.get("attn_mask")))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    uptrain(UptrainSettings(str(env["mqa"]), str(env["root"] / "sdpa"), data=env["train"], steps=1, lr=1e-3,
                            cache_dir=env["cache"], **STEPS))
    assert calls and all(c[:3] == (4, 1, True) and c[3] is None for c in calls), calls[:2]


def test_bf16_autocast_and_accumulation_keep_input_dtype(env, tmp_path):
    src = build_tiny_model("qwen2", tmp_path / "q", with_tokenizer=True, n_heads=4, n_kv_heads=2,
                           dtype=torch.bfloat16)
    r = uptrain(UptrainSettings(str(src), str(tmp_path / "o"), data=env["train"], steps=3, lr=1e-3, dtype="bf16",
                                grad_accum=2, cache_dir=env["cache"], seq_len=32, batch_size=2, quiet=True,
                                gradient_checkpointing=True))
    assert all(math.isfinite(x["loss"]) for x in r["log"]) and r["results"]["tokens"] == 3 * 2 * 2 * 32
    saved = load_file(tmp_path / "o" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}


@pytest.mark.parametrize("family", ["llama", "gemma"])  # gemma ties lm_head to the embeddings
def test_fused_loss_kernel_gives_the_reference_losses(env, tmp_path, family):
    src = build_tiny_model(family, tmp_path / family, with_tokenizer=True, n_heads=4, n_kv_heads=2)
    runs = {}
    for kernel in ("reference", "torch"):
        r = uptrain(UptrainSettings(str(src), str(tmp_path / kernel), data=env["train"], steps=4, lr=1e-2,
                                    cache_dir=env["cache"], loss_kernel=kernel, eval_data=env["test"], eval_every=2,
                                    max_eval_windows=8, **STEPS))
        assert r["settings"]["loss_kernel"] == kernel
        runs[kernel] = r
    for key in ("loss", "grad_norm", "eval_ppl"):
        got, want = [[row[key] for row in runs[k]["log"] if key in row] for k in ("torch", "reference")]
        assert len(got) == len(want) > 0
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), key
    a, b = load_file(tmp_path / "torch" / "model.safetensors"), load_file(tmp_path / "reference" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        # Adam turns a rounding-level difference in a near-zero gradient into up to lr per step: all weights
        # agree to 1e-3 (lr is 1e-2), and all but 0.1% of them to 1e-4.
        diff = (a[name] - b[name]).abs()
        assert diff.max() <= 1e-3 and (diff > 1e-4 + 1e-4 * b[name].abs()).float().mean() <= 1e-3, name


def test_wsd_schedule_warms_up_holds_then_decays_as_one_minus_sqrt(env, tmp_path):
    """MHA2MLA's schedule: linear warmup, a constant stage, then lr x (1 - sqrt(progress)) over the last
    --decay-fraction of the steps; the rate each step used, against the closed form."""
    steps, warmup, lr = 10, 2, 1e-3
    r = uptrain(UptrainSettings(str(env["mqa"]), str(tmp_path / "wsd"), data=env["train"], steps=steps, lr=lr,
                                warmup=warmup, schedule="wsd", decay_fraction=0.3, cache_dir=env["cache"], **STEPS))
    decay = 3
    stable = steps - warmup - decay

    def closed_form(i: int) -> float:  # the rate of the i-th update (0-based)
        if i < warmup:
            return lr * i / warmup
        if i < warmup + stable:
            return lr
        return lr * (1 - math.sqrt((i - warmup - stable) / decay))

    assert [row["lr"] for row in r["log"]] == pytest.approx([closed_form(i) for i in range(steps)], abs=1e-12)
