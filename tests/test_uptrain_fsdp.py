"""attnconv uptrain under FSDP2 (2 and 3 CPU processes over gloo, launched with the recipe accelerate config):
losses, clipping, evaluation and the final model match one process with the same global batch; a killed run resumes
from its sharded checkpoint, on the same or another number of processes. Plus the recipes and the refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from attnconv.errors import AttnconvError
from attnconv.testing import build_tiny_model
from attnconv.textdata import tinyshakespeare_split
from attnconv.uptrain import sharded
from attnconv.uptrain.api import uptrain
from attnconv.uptrain.checkpoint import KILL_AFTER_ENV, latest_checkpoint
from attnconv.uptrain.settings import UptrainSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"
# Global batch 12: 1 process x 6, 2 x 3 or 3 x 2 sequences, 2 micro-steps each. 7 eval windows split unevenly.
RUN = dict(steps=4, seq_len=16, lr=1e-2, grad_accum=2, save_every=2, eval_every=2, max_eval_windows=7, quiet=True)


def _flags(**kw) -> list[str]:
    return [x for k, v in kw.items() for x in ((f"--{k.replace('_', '-')}",) if v is True else
                                                (f"--{k.replace('_', '-')}", str(v)))]


def _launch(processes: int, model, out, data, eval_data, cache, batch_size: int, *extra: str,
            kill_after=None) -> subprocess.Popen:
    """Starts the launch; `_finished` waits for it. Port 0: accelerate picks a free one (tests run side by side)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / "fsdp_1node.yaml"),
           "--num_processes", str(processes), "--main_process_port", "0", "-m", "attnconv", "uptrain", str(model),
           str(out), "--data", str(data), "--eval-data", str(eval_data), "--batch-size", str(batch_size),
           *_flags(**RUN), *extra]
    env = {**os.environ, "ATTNCONV_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    if kill_after is not None:
        env[KILL_AFTER_ENV] = str(kill_after)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _finished(proc: subprocess.Popen) -> tuple[int, str]:
    """(exit code, the end of stderr) of a launch."""
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err[-3000:]


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def _close(a: list[dict], b: list[dict], key: str, tol: float, relative: bool = False) -> float:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    gaps = [abs(x[key] - y[key]) / (abs(x[key]) if relative else 1.0) for x, y in zip(a, b, strict=True) if key in x]
    assert gaps and max(gaps) < tol, (key, [x.get(key) for x in a], [y.get(key) for y in b])
    return max(gaps)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes_on_another_process_count(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_tiny_model("llama", tmp_path / "m", with_tokenizer=True, n_heads=4, n_kv_heads=2, hidden=32)
    data, held_out = tmp_path / "train.txt", tmp_path / "test.txt"
    data.write_text(tinyshakespeare_split("train")[:20_000])
    held_out.write_text(tinyshakespeare_split("test")[:3_000])
    cache = tmp_path / "cache"
    # 2 processes, killed right after the checkpoint of step 2 (both processes SIGKILL themselves).
    two = tmp_path / "two"
    killed = _launch(2, model, two, data, held_out, cache, 3, kill_after=2)
    # The one-process run, here while the launch starts (a token cache is written under a name of its own, then
    # renamed: they may share it).
    one = uptrain(UptrainSettings(str(model), str(tmp_path / "one"), data=str(data), eval_data=str(held_out),
                                  batch_size=6, cache_dir=str(cache), **RUN))
    code, err = _finished(killed)
    assert code != 0 and not two.exists(), err
    ckpt = latest_checkpoint(tmp_path / "two.uptrain-run" / "checkpoints")
    assert ckpt is not None, err
    state = json.loads((ckpt / "state.json").read_text())
    assert ckpt.name == "step-0000002" and state["format"] == sharded.SHARDED_FORMAT and state["world"] == 2
    assert (ckpt / sharded.SHARDS / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    shutil.copytree(tmp_path / "two.uptrain-run", tmp_path / "three.uptrain-run")
    # Resumed on the same 2 processes, and on 3 (DCP reshards; 3 x 2 sequences is the same global batch of 12),
    # side by side: each run has its own copy of the checkpoint.
    resumes = [(out, processes, _launch(processes, model, out, data, held_out, cache, batch, "--resume"))
               for out, processes, batch in ((two, 2, 3), (tmp_path / "three", 3, 2))]
    finished = [(out, processes, *_finished(launch)) for out, processes, launch in resumes]  # both, then the checks
    for out, processes, code, err in finished:
        assert code == 0, err
        record = json.loads((out / "attnconv.json").read_text())["uptrain"]
        assert record["settings"]["fsdp"] and record["settings"]["processes"] == processes
        assert record["results"]["resumed_from"] == 2
        log = _log(out)
        _close(one["log"], log, "loss", 1e-5)
        _close(one["log"], log, "eval_ppl", 1e-5, relative=True)  # uneven windows: a process scores a spare batch
        # The norm over all shards: clipping is active (norms > 1) and a per-shard norm would be ~1/sqrt(2) off.
        _close(one["log"], log, "grad_norm", 1e-3, relative=True)
        assert max(r["grad_norm"] for r in log) > 1.0
    # The final model is a plain transformers folder equal to the one-process result.
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    ids = torch.arange(40).view(2, 20) * 7
    for out in (two, tmp_path / "three"):
        got = AutoModelForCausalLM.from_pretrained(out)
        assert type(got) is type(ref) and got.config.architectures == ["LlamaForCausalLM"]
        ref_sd, got_sd = ref.state_dict(), got.state_dict()
        assert ref_sd.keys() == got_sd.keys()
        assert max((ref_sd[k] - got_sd[k]).abs().max().item() for k in ref_sd) < 1e-4
        with torch.no_grad():
            assert torch.allclose(ref(ids).logits, got(ids).logits, atol=1e-4, rtol=0)
    assert not (tmp_path / "two.uptrain-run").exists()  # removed after a successful run, as without FSDP


def test_recipes_parse_and_use_real_launch_options():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    options = {a.dest for a in launch_command_parser()._actions}
    names = sorted(p.name for p in RECIPES.glob("*.yaml"))
    assert names == ["ddp_1node.yaml", "fsdp_1node.yaml", "fsdp_multinode.yaml", "single_gpu.yaml"]
    for name in names:
        path = RECIPES / name
        config = load_config_from_file(str(path))  # raises on keys accelerate does not know
        header = path.read_text().split("\ncompute_environment")[0]
        assert f"accelerate launch --config_file recipes/accelerate/{name}" in header
        assert "-m attnconv uptrain" in header
        fsdp = yaml.safe_load(path.read_text()).get("fsdp_config") or {}
        assert set(fsdp) <= options, set(fsdp) - options
        if name.startswith("fsdp"):
            assert config.distributed_type == "FSDP" and fsdp["fsdp_version"] == 2 and config.num_processes >= 2
            assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and fsdp["fsdp_reshard_after_forward"]
    assert load_config_from_file(str(RECIPES / "fsdp_multinode.yaml")).num_machines == 2


@pytest.fixture
def tiny(tmp_path):
    model = build_tiny_model("llama", tmp_path / "m", with_tokenizer=True, n_heads=4, hidden=32)
    (tmp_path / "train.txt").write_text(tinyshakespeare_split("train")[:5_000])
    return UptrainSettings(str(model), str(tmp_path / "o"), data=str(tmp_path / "train.txt"), steps=1, seq_len=16,
                           cache_dir=str(tmp_path / "cache"), quiet=True)


@pytest.mark.parametrize(("version", "message"), [("2", "on one process: sharding needs 2 or more"),
                                                  ("1", "FSDP2 only.*version 1; set fsdp_version: 2")])
def test_bad_fsdp_requests_are_one_line_errors(tiny, monkeypatch, version, message):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    with pytest.raises(AttnconvError, match=message) as e:
        uptrain(tiny)
    assert "\n" not in str(e.value) and not Path(tiny.out).exists()


def test_sharded_checkpoints_resume_with_another_split_of_the_same_global_batch(tmp_path):
    base = {"lr": 0.01, "batch_size": 3, "grad_accum": 2, "processes": 2, "seed": 0}
    same = sharded.resume_identity({**base, "batch_size": 2, "processes": 3})
    assert same == sharded.resume_identity(base) and same["global_batch"] == 12
    assert sharded.resume_identity({**base, "batch_size": 2}) != sharded.resume_identity(base)
    with pytest.raises(AttnconvError, match="holds FSDP shards and this run does not use FSDP"):
        sharded.check_resume(tmp_path, {"format": sharded.SHARDED_FORMAT}, sharded_now=False)
    with pytest.raises(AttnconvError, match="written without FSDP and this run uses FSDP"):
        sharded.check_resume(tmp_path, {}, sharded_now=True)


def test_plain_model_rebuilds_a_tied_model_from_its_gathered_state(tmp_path):
    """The final save of an FSDP run: a model built on the meta device around the gathered tensors, ties restored,
    non-persistent buffers (rotary frequencies) copied; it computes and saves what the trained model does."""
    from transformers import AutoModelForCausalLM

    src = AutoModelForCausalLM.from_pretrained(build_tiny_model("gemma", tmp_path / "g", n_heads=4, hidden=32))
    full = {k: v.clone() for k, v in src.state_dict().items()}
    plain = sharded.plain_model(src, full)
    assert sharded.plain_model(src, {}) is None  # processes other than the main one get nothing
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    ids = torch.arange(24).view(2, 12)
    with torch.no_grad():
        assert torch.equal(src(ids).logits, plain(ids).logits)
    plain.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")(ids).logits, src(ids).logits)


def test_decoder_layers_are_wrapped_where_the_model_names_no_class(tmp_path, monkeypatch):
    """TRANSFORMER_BASED_WRAP without a class: accelerate reads `_no_split_modules`; without them, the decoder layer
    class is named (else FSDP would gather the whole layer stack at once)."""
    from types import SimpleNamespace

    from accelerate import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    net = AutoModelForCausalLM.from_pretrained(build_tiny_model("qwen2", tmp_path / "q", n_heads=4, hidden=32))
    for no_split, expected in ((net._no_split_modules, None), (None, ["Qwen2DecoderLayer"])):
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
        net._no_split_modules = no_split
        sharded.wrap_decoder_layers(SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin)), net)
        assert plugin.transformer_cls_names_to_wrap == expected
