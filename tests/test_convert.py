"""convert: equivalence on tiny real HF models of every family, against transformers' own forward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from attnconv.convert.api import convert
from attnconv.convert.gqa.pool import tensor_generator
from attnconv.convert.plan import make_plan
from attnconv.convert.settings import ConvertSettings
from attnconv.testing import FAMILIES, build_tiny_model

IDS = torch.randint(0, 250, (2, 11), generator=torch.Generator().manual_seed(0))
LLAMA_LIKE = [f for f in FAMILIES if f != "gpt2"]


def logits(path, ids=IDS):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def all_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    return {f: build_tiny_model(f, root / f, seed=1) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_same_kv_heads_reproduces_source_logits(models, family, tmp_path):
    convert(ConvertSettings(models[family], tmp_path / "out", kv_heads=4), progress=False)
    ref, got = logits(models[family]), logits(tmp_path / "out")
    assert (ref - got).abs().max().item() <= 1e-5


def _equalise_groups(src, dst, group: int, family: str):
    """A source whose K/V heads are equal within each group of `group` heads (so pooling is lossless)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    sd = load_file(src / "model.safetensors")
    hd = 16
    for name, t in sd.items():
        if family == "gpt2" and name.endswith("c_attn.weight"):  # Conv1D [hidden, 3 hidden]
            q, k, v = t.split(64, dim=1)
            k, v = (x.reshape(64, 4, hd)[:, ::group].repeat_interleave(group, 1).reshape(64, 64) for x in (k, v))
            sd[name] = torch.cat([q, k, v], dim=1)
        elif family == "gpt2" and name.endswith("c_attn.bias"):
            q, k, v = t.split(64)
            k, v = (x.reshape(4, hd)[::group].repeat_interleave(group, 0).reshape(64) for x in (k, v))
            sd[name] = torch.cat([q, k, v])
        elif family == "phi3" and name.endswith("qkv_proj.weight"):
            q, k, v = t.split(64)
            k, v = (x.reshape(4, hd, 64)[::group].repeat_interleave(group, 0).reshape(64, 64) for x in (k, v))
            sd[name] = torch.cat([q, k, v])
        elif any(name.endswith(s) for s in ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            heads = t.reshape(4, hd, *t.shape[1:])
            sd[name] = heads[::group].repeat_interleave(group, 0).reshape(t.shape).contiguous()
    save_file({k: v.contiguous() for k, v in sd.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("family", FAMILIES)
def test_equal_heads_within_groups_convert_losslessly(models, family, tmp_path):
    group = 4 if family == "gpt2" else 2
    src = _equalise_groups(models[family], tmp_path / "src", group, family)
    convert(ConvertSettings(src, tmp_path / "out", kv_heads=4 // group), progress=False)
    assert (logits(src) - logits(tmp_path / "out")).abs().max().item() <= 1e-5


def test_mean_first_random_give_the_heads_they_claim(models, tmp_path):
    src = models["qwen2"]  # q/k/v biases
    sd = load_file(src / "model.safetensors")
    name, bias = "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.k_proj.bias"
    heads = sd[name].reshape(4, 16, 64)
    for method in ("mean", "first", "random"):
        convert(ConvertSettings(src, tmp_path / method, kv_heads=2, method=method, seed=7), progress=False)
        out = load_file(tmp_path / method / "model.safetensors")
        got, got_b = out[name].reshape(2, 16, 64), out[bias].reshape(2, 16)
        if method == "mean":
            want = torch.stack([(heads[0] + heads[1]) / 2, (heads[2] + heads[3]) / 2])
            want_b = torch.stack([sd[bias].reshape(4, 16)[i:i + 2].sum(0) / 2 for i in (0, 2)])
        elif method == "first":
            want, want_b = heads[[0, 2]], sd[bias].reshape(4, 16)[[0, 2]]
        else:
            groups = heads.reshape(2, 2, 16, 64)
            want = torch.randn((2, 16, 64), generator=tensor_generator(7, name)) * groups.std()
            want_b = torch.zeros(2, 16)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got_b, want_b, rtol=1e-6, atol=1e-7)
    convert(ConvertSettings(src, tmp_path / "random2", kv_heads=2, method="random", seed=8), progress=False)
    assert not torch.equal(load_file(tmp_path / "random2" / "model.safetensors")[name],
                           load_file(tmp_path / "random" / "model.safetensors")[name])


def test_gqa_source_reduced_further_equals_pooling_twice(tmp_path):
    src = build_tiny_model("mistral", tmp_path / "src", n_heads=8, n_kv_heads=4)
    convert(ConvertSettings(src, tmp_path / "kv2", kv_heads=2), progress=False)
    convert(ConvertSettings(tmp_path / "kv2", tmp_path / "kv1", kv_heads=1), progress=False)
    convert(ConvertSettings(src, tmp_path / "direct", kv_heads=1), progress=False)
    a, b = all_tensors(tmp_path / "kv1"), all_tensors(tmp_path / "direct")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "kv1" / "config.json").read_text())["num_key_value_heads"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_output_generates_the_same_with_and_without_cache(models, family, tmp_path):
    convert(ConvertSettings(models[family], tmp_path / "out", to="mqa"), progress=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("num_key_value_heads", 1 if cfg.get("multi_query") else None) == 1
    prompt = IDS[:, :5]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kw)
        uncached = model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    assert cached.shape[1] == 13


def test_sharded_checkpoint_converts_to_the_same_tensors(tmp_path):
    one = build_tiny_model("llama", tmp_path / "one", seed=3)
    many = build_tiny_model("llama", tmp_path / "many", seed=3, max_shard_size="60KB")
    assert len(list(many.glob("*.safetensors"))) > 2
    convert(ConvertSettings(one, tmp_path / "o1", kv_heads=2), progress=False)
    convert(ConvertSettings(many, tmp_path / "o2", kv_heads=2), progress=False)
    a, b = all_tensors(tmp_path / "o1"), all_tensors(tmp_path / "o2")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    index = json.loads((tmp_path / "o2" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b)
    for name, shard in index["weight_map"].items():
        with safe_open(tmp_path / "o2" / shard, "pt") as f:
            assert name in f.keys()
    torch.testing.assert_close(logits(tmp_path / "o1"), logits(tmp_path / "o2"), rtol=0, atol=0)


def test_source_hash_over_mapped_windows(tmp_path, monkeypatch):
    """The provenance hash maps the file window by window: sizes around the window edges and an empty file."""
    import hashlib
    import mmap
    import os

    from attnconv import fingerprint

    monkeypatch.setenv("ATTNCONV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "HASH_WINDOW", mmap.ALLOCATIONGRANULARITY)
    sizes = [0, 1, mmap.ALLOCATIONGRANULARITY, 3 * mmap.ALLOCATIONGRANULARITY + 5]
    files = []
    for size in sizes:
        files.append(tmp_path / f"f{size}.safetensors")
        files[-1].write_bytes(os.urandom(size))
    got: dict[str, str] = {}
    fingerprint.sha256_files(files, got)
    assert got == {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_source_hash_is_remembered_only_while_the_file_is_unchanged(tmp_path, monkeypatch):
    """A second conversion of one source does not read it again; a file rewritten in place, even with the same
    size and mtime, is hashed anew."""
    import hashlib
    import os

    from attnconv import fingerprint

    monkeypatch.setenv("ATTNCONV_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"a" * 1000)
    assert fingerprint.sha256_file(f) == hashlib.sha256(b"a" * 1000).hexdigest()
    reads = []
    real = fingerprint._sha256_uncached
    monkeypatch.setattr(fingerprint, "_sha256_uncached", lambda p: reads.append(p) or real(p))
    assert fingerprint.sha256_file(f) == hashlib.sha256(b"a" * 1000).hexdigest() and reads == []
    st = f.stat()
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime; ctime moves on
    assert fingerprint.sha256_file(f) == hashlib.sha256(b"b" * 1000).hexdigest() and reads == [f]
    (tmp_path / "not-a-folder").write_text("")  # a cache that cannot be written only costs a re-hash
    monkeypatch.setenv("ATTNCONV_CACHE", str(tmp_path / "not-a-folder"))
    assert fingerprint.sha256_file(f) == hashlib.sha256(b"b" * 1000).hexdigest() and reads == [f, f]


def test_hub_cache_files_are_named_by_their_sha256(tmp_path, monkeypatch):
    """A weight file in the huggingface_hub cache (snapshots/<rev>/<file> -> blobs/<sha256>) is not read to hash
    it; a link to anything else, a git blob's sha1 name included, is hashed."""
    import hashlib

    from huggingface_hub import constants

    from attnconv import fingerprint

    monkeypatch.setenv("ATTNCONV_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    lfs, git = hashlib.sha256(b"weights").hexdigest(), "d" * 40
    (repo / "blobs" / lfs).write_bytes(b"weights")
    (repo / "blobs" / git).write_bytes(b"{}")
    (snap / "model.safetensors").symlink_to(f"../../blobs/{lfs}")
    (snap / "config.json").symlink_to(f"../../blobs/{git}")
    other = tmp_path / "elsewhere" / ("e" * 64)
    other.parent.mkdir()
    other.write_bytes(b"x")
    (snap / "linked.safetensors").symlink_to(other)
    reads = []
    real = fingerprint._sha256_uncached
    monkeypatch.setattr(fingerprint, "_sha256_uncached", lambda p: reads.append(p.name) or real(p))
    assert fingerprint.sha256_file(snap / "model.safetensors") == lfs and reads == []
    assert fingerprint.sha256_file(snap / "config.json") == hashlib.sha256(b"{}").hexdigest()
    assert fingerprint.sha256_file(snap / "linked.safetensors") == hashlib.sha256(b"x").hexdigest()
    assert reads == ["config.json", "linked.safetensors"]
    # The same layout outside the hub cache folder (a local folder made to look like it) is read and hashed.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert fingerprint.sha256_file(snap / "model.safetensors") == lfs and reads[-1] == "model.safetensors"
    local = tmp_path / "local"
    (local / "blobs").mkdir(parents=True)
    fake = "f" * 64
    (local / "blobs" / fake).write_bytes(b"not what the name says")
    (local / "model.safetensors").symlink_to(f"blobs/{fake}")
    assert fingerprint.sha256_file(local / "model.safetensors") == hashlib.sha256(b"not what the name says").hexdigest()


def test_provenance_config_and_copied_files(tmp_path):
    src = build_tiny_model("llama", tmp_path / "src", with_tokenizer=True)
    convert(ConvertSettings(src, tmp_path / "out", kv_heads=2, dtype="bfloat16"), progress=False)
    out = tmp_path / "out"
    prov = json.loads((out / "attnconv.json").read_text())
    assert prov["conversion"]["groups"] == [[0, 1], [2, 3]]
    assert prov["conversion"]["method"] == "mean" and prov["conversion"]["kv_heads_after"] == 2
    import hashlib

    assert prov["source_weight_sha256"]["model.safetensors"] == hashlib.sha256(
        (src / "model.safetensors").read_bytes()).hexdigest()
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert (out / "generation_config.json").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["dtype"] == "bfloat16"
    sd_out, sd_src = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in sd_out.values())
    k = "model.layers.0.self_attn.v_proj.weight"
    want = sd_src[k].reshape(2, 2, 16, 64).mean(1).reshape(32, 64).to(torch.bfloat16)  # pooled in fp32, then cast
    assert torch.equal(sd_out[k], want)


def test_dry_run_plan_writes_nothing(models, tmp_path):
    plan = convert(ConvertSettings(models["phi3"], tmp_path / "out", kv_heads=2, dry_run=True))
    assert not (tmp_path / "out").exists()
    qkv = [s for s in plan.steps if s.op == "fused_qkv"]
    assert len(qkv) == 2 and qkv[0].shape == ((4 + 2 * 2) * 16, 64)
    assert plan.bytes_written == plan.bytes_read - 2 * 2 * 2 * 16 * 64 * 4
    gpt = make_plan(ConvertSettings(models["gpt2"], kv_heads=1, dry_run=True))
    c_attn = [s for s in gpt.steps if s.op == "gpt2_c_attn"]
    assert {s.shape for s in c_attn} == {(64 + 2 * 16, 64), (64 + 2 * 16,)}
    assert sum(s.op == "transpose" for s in gpt.steps) == 3 * 2
