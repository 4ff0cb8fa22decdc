"""attnconv uptrain: exact resume after SIGKILL, atomic checkpoints (disk full), NaN stop, bad input."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnconv.errors import AttnconvError
from attnconv.patches import fused_loss as fused_loss_mod
from attnconv.testing import build_tiny_model
from attnconv.textdata import tinyshakespeare_split
from attnconv.uptrain import checkpoint as ckpt_mod
from attnconv.uptrain.api import uptrain
from attnconv.uptrain.checkpoint import KILL_AFTER_ENV, latest_checkpoint
from attnconv.uptrain.settings import UptrainSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")
RUN = dict(seq_len=32, batch_size=4, lr=1e-2, warmup=2, quiet=True)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = build_tiny_model("llama", root / "mqa", with_tokenizer=True, n_heads=4, n_kv_heads=1,
                             hidden=32)
    (root / "train.txt").write_text(tinyshakespeare_split("train")[:30_000])
    return {"root": root, "model": str(model), "train": str(root / "train.txt"), "cache": str(root / "cache")}


def _losses(out):
    return [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_resume_after_sigkill_is_exact(env):
    """Killed after the checkpoint of step 3 of 6: mid-schedule (2 warmup steps, then cosine decay)."""
    root = env["root"]
    out = root / "killed"
    cmd = [sys.executable, "-m", "attnconv", "uptrain", env["model"], str(out), "--data", env["train"],
           "--steps", "6", "--save-every", "3", "--seq-len", "32", "--batch-size", "4", "--lr", "1e-2",
           "--warmup", "2", "--quiet"]
    child_env = {**os.environ, KILL_AFTER_ENV: "3", "ATTNCONV_CACHE": env["cache"], "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The uninterrupted run, here while the child starts (a token cache is written under a name of its own, then
    # renamed: the two may share it).
    straight = uptrain(UptrainSettings(env["model"], str(root / "straight"), data=env["train"], steps=6,
                                       save_every=3, cache_dir=env["cache"], **RUN))
    _, err = child.communicate(timeout=300)
    assert child.returncode == -9, err[-2000:]
    assert not out.exists()
    assert latest_checkpoint(root / "killed.uptrain-run" / "checkpoints").name == "step-0000003"
    with pytest.raises(AttnconvError, match="--resume"):
        uptrain(UptrainSettings(env["model"], str(out), data=env["train"], steps=6, cache_dir=env["cache"], **RUN))
    resumed = uptrain(UptrainSettings(env["model"], str(out), data=env["train"], steps=6, save_every=3, resume=True,
                                      cache_dir=env["cache"], **RUN))
    assert resumed["results"]["resumed_from"] == 3
    a, b = [r["loss"] for r in straight["log"]], _losses(out)
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-6, (a, b)
    wa, wb = load_file(root / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)


def test_disk_full_while_saving_keeps_previous_checkpoint(env, monkeypatch):
    out = env["root"] / "enospc"
    real, calls = ckpt_mod.save_model, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_model", failing_save)
    with pytest.raises(AttnconvError, match="disk is full.*step-0000002.*intact"):
        uptrain(UptrainSettings(env["model"], str(out), data=env["train"], steps=4, save_every=2,
                                cache_dir=env["cache"], **RUN))
    ckpts = env["root"] / "enospc.uptrain-run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"] and not out.exists()
    monkeypatch.setattr(ckpt_mod, "save_model", real)
    with pytest.raises(AttnconvError, match="different run.*lr: 0.01 -> 0.02"):
        uptrain(UptrainSettings(env["model"], str(out), data=env["train"], steps=4, save_every=2, resume=True,
                                cache_dir=env["cache"], **{**RUN, "lr": 2e-2}))
    r = uptrain(UptrainSettings(env["model"], str(out), data=env["train"], steps=4, save_every=2, resume=True,
                                cache_dir=env["cache"], **RUN))
    assert r["results"]["resumed_from"] == 2 and [x["step"] for x in r["log"]] == list(range(1, 5))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(env, monkeypatch):
    # The default path computes the loss in the output layer (fused linear cross-entropy).
    real, calls = fused_loss_mod.linear_cross_entropy, []

    def nan_at_step_3(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(fused_loss_mod, "linear_cross_entropy", nan_at_step_3)
    out = env["root"] / "nan"
    with pytest.raises(AttnconvError, match="loss became nan at step 3.*step-0000002") as e:
        uptrain(UptrainSettings(env["model"], str(out), data=env["train"], steps=5, save_every=1,
                                cache_dir=env["cache"], **RUN))
    # --resume refuses another --lr (test above): the advice is the one that works
    assert "--resume" not in str(e.value) and "run again with --overwrite and a lower --lr" in str(e.value)
    last = latest_checkpoint(env["root"] / "nan.uptrain-run" / "checkpoints")
    assert last.name == "step-0000002" and not out.exists()
    assert all(torch.isfinite(t).all() for t in load_file(last / "model.safetensors").values())


def test_nan_weights_stop_at_step_1(env, tmp_path):
    bad = build_tiny_model("llama", tmp_path / "bad", with_tokenizer=True, n_heads=4, n_kv_heads=1)
    w = load_file(bad / "model.safetensors")
    w["model.norm.weight"][0] = float("inf")
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AttnconvError, match="at step 1; .*no checkpoint was saved yet"):
        uptrain(UptrainSettings(str(bad), str(tmp_path / "o"), data=env["train"], steps=2, cache_dir=env["cache"],
                                **RUN))


def test_bad_input_is_one_line_error(env, tmp_path):
    m, d, c = env["model"], env["train"], env["cache"]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("To be, or not to be.")
    other = build_tiny_model("llama", tmp_path / "other", with_tokenizer=True, n_heads=4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<attnconv-extra>"])
    tok.save_pretrained(other)
    (tmp_path / "exists").mkdir()
    cases = [
        (dict(data=d, seq_len=600), "beyond the model's maximum of 512"),
        (dict(data=str(tmp_path / "empty.txt")), "empty"),
        (dict(data=str(tmp_path / "short.txt")), "blocks but one step needs 4"),
        (dict(data=d, teacher=str(tmp_path / "missing")), "no such folder"),
        (dict(data=d, teacher=str(other)), "another tokenizer"),
        (dict(data=d, eval_every=2), "--eval-every needs --eval-data"),
        (dict(data=d, steps=2, tokens=100), "not both"),
        (dict(data=d, schedule="cyclic"), "--schedule"),
        (dict(data=d, teacher=m, distill_weight=1.5), "--distill-weight"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(AttnconvError, match=msg):
            uptrain(UptrainSettings(m, str(tmp_path / "o"), cache_dir=c, quiet=True, **{"seq_len": 32, **kwargs}))
    with pytest.raises(AttnconvError, match="already exists.*--overwrite"):
        uptrain(UptrainSettings(m, str(tmp_path / "exists"), data=d, cache_dir=c, quiet=True))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.uptrain-run").exists()


def test_cli_prints_one_line_error(env, tmp_path, monkeypatch, capsys):
    from attnconv import cli

    (tmp_path / "exists").mkdir()
    monkeypatch.setattr(sys, "argv", ["attnconv", "uptrain", env["model"], str(tmp_path / "exists"),
                                      "--data", env["train"]])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "--overwrite" in err[0]


def test_checkpoints_reach_the_disk_before_they_are_published(tmp_path, monkeypatch):
    # Every file of a checkpoint is fsynced before the rename that makes it the latest one (a power cut
    # must not leave a published checkpoint with unwritten contents, and the previous one already deleted).
    from accelerate import Accelerator

    synced, order = set(), []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        synced.add(os.path.realpath(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def rename(src, dst):
        files = {os.path.realpath(p) for p in Path(src).rglob("*")}
        order.append((Path(dst).name, files <= synced and os.path.realpath(src) in synced))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(ckpt_mod.os, "rename", rename)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc = Accelerator(cpu=True)
    for step in (1, 2):
        ckpt_mod.save_checkpoint(acc, tmp_path / "ckpt", model, opt, sched, {"step": step})
    assert order == [("step-0000001", True), ("step-0000002", True)]
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-0000002"]


class _Killed(BaseException):
    """What the SIGKILL after a checkpoint becomes in this process (test_resume_after_sigkill_is_exact kills one)."""


def test_resume_refuses_every_change_that_makes_another_run(env, tmp_path, monkeypatch):
    """A checkpoint resumes only the run that wrote it: each setting that changes the run's mathematics, and each
    input's content, is compared, and a difference is refused with what differs: a setting's before the model is
    loaded, an input's once it is read."""
    from attnconv.uptrain import api

    out = tmp_path / "run"

    def killed(pid, signum):
        raise _Killed

    monkeypatch.setenv(KILL_AFTER_ENV, "2")
    monkeypatch.setattr(ckpt_mod.os, "kill", killed)
    with pytest.raises(_Killed):
        uptrain(UptrainSettings(env["model"], str(out), data=env["train"], steps=4, save_every=2, seq_len=32,
                                batch_size=4, cache_dir=env["cache"], quiet=True))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "run.uptrain-run" / "checkpoints").name == "step-0000002"
    other_data = tmp_path / "other.txt"
    other_data.write_text(tinyshakespeare_split("train")[30_000:60_000])
    changed_model = tmp_path / "changed"
    import shutil

    shutil.copytree(env["model"], changed_model)
    weights = load_file(changed_model / "model.safetensors")
    weights["model.norm.weight"] += 1.0
    save_file(weights, changed_model / "model.safetensors", metadata={"format": "pt"})
    base = dict(data=env["train"], steps=4, save_every=2, seq_len=32, batch_size=4, resume=True,
                cache_dir=env["cache"], quiet=True)
    loads, load = [], api.load_causal_lm
    monkeypatch.setattr(api, "load_causal_lm", lambda *a, **kw: loads.append(a[0]) or load(*a, **kw))
    cases = [({"dtype": "bf16"}, "dtype: 'float32' -> 'bfloat16'"),
             ({"teacher": env["model"]}, "teacher: None -> "),
             ({"loss_kernel": "reference"}, "loss_kernel: 'auto' -> 'reference'"),
             ({"train": "only-attention"}, "train: 'all' -> 'only-attention'"),
             ({"data": str(other_data)}, "data_key: "),
             ({"seed": 3}, "seed: 0 -> 3"),
             ({"max_grad_norm": 0.5}, "max_grad_norm: 1.0 -> 0.5")]
    for change, needle in cases:
        loads.clear()
        with pytest.raises(AttnconvError, match="written by a different run") as e:
            uptrain(UptrainSettings(env["model"], str(out), **{**base, **change}))
        assert needle in str(e.value), str(e.value)
        assert bool(loads) == bool({"teacher", "data"} & set(change)), (change, loads)
    with pytest.raises(AttnconvError, match="model_sha256: "):
        uptrain(UptrainSettings(str(changed_model), str(out), **base))
    # Display-only settings may change; the run then finishes from its checkpoint.
    r = uptrain(UptrainSettings(env["model"], str(out), **{**base, "save_every": 3, "keep_checkpoints": True}))
    assert r["results"]["resumed_from"] == 2 and r["results"]["steps_this_run"] == 2


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    from attnconv.uptrain.trainer import read_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_log(log, upto=3)] == [1, 2]


def test_teacher_settings_count_only_with_a_teacher(env):
    plain = UptrainSettings(env["model"], "o", data="d").run_values()
    assert "distill_weight" not in plain and "temperature" not in plain
    taught = UptrainSettings(env["model"], "o", data="d", teacher="t", temperature=2.0).run_values()
    assert taught["temperature"] == 2.0 and "quiet" not in taught and "save_every" not in taught


@pytest.mark.parametrize("error", [RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter "
                                                "failed writing file data/0: file write failed"),
                                   "safetensors"])
def test_a_full_disk_in_torch_or_safetensors_words_keeps_the_previous_checkpoint(env, tmp_path, monkeypatch, error):
    """torch.save and safetensors report a full disk as their own exceptions, not OSError: the same outcome."""
    from safetensors import SafetensorError

    if error == "safetensors":
        error = SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                                "\"No space left on device\" })")
    real, calls = ckpt_mod.save_model, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod, "save_model", failing_save)
    out = tmp_path / "full"
    with pytest.raises(AttnconvError, match="disk is full.*step-0000002.*intact"):
        uptrain(UptrainSettings(env["model"], str(out), data=env["train"], steps=4, save_every=2,
                                cache_dir=env["cache"], **RUN))
    ckpts = tmp_path / "full.uptrain-run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"] and not out.exists()


def test_a_run_reads_its_tokenizers_vocabulary_once(env, tmp_path, monkeypatch):
    """Its fingerprint and size serve the training data, the held-out data and the run's identity: reading and
    hashing a 50k-token vocabulary takes ~0.3 s, and a run with --eval-data read it five times."""
    from attnconv.uptrain import api

    reads, load = [], api.load_tokenizer

    def counted(*args, **kwargs):
        tok = load(*args, **kwargs)
        get_vocab = tok.get_vocab
        tok.get_vocab = lambda: reads.append(1) or get_vocab()
        return tok

    monkeypatch.setattr(api, "load_tokenizer", counted)
    uptrain(UptrainSettings(env["model"], str(tmp_path / "o"), data=env["train"], eval_data=env["train"], steps=1,
                            seq_len=16, batch_size=1, cache_dir=env["cache"], quiet=True))
    assert len(reads) == 1
