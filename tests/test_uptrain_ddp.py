"""attnconv uptrain under torchrun: 2 processes (DDP over gloo, CPU) give the losses of 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from attnconv.testing import build_tiny_model
from attnconv.textdata import tinyshakespeare_split
from attnconv.uptrain.api import uptrain
from attnconv.uptrain.settings import UptrainSettings


@pytest.mark.slow
def test_two_processes_match_one_process_with_same_global_batch(tmp_path, one_torch_thread):  # as the children
    model = build_tiny_model("llama", tmp_path / "m", with_tokenizer=True, n_heads=4, n_kv_heads=2, hidden=32)
    data = tmp_path / "train.txt"
    data.write_text(tinyshakespeare_split("train")[:20_000])
    cache = str(tmp_path / "cache")
    common = ["--steps", "4", "--seq-len", "16", "--lr", "1e-2", "--grad-accum", "2", "--quiet"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "attnconv", "uptrain", str(model), str(tmp_path / "two"), "--data", str(data),
           "--batch-size", "2", *common]
    env = {**os.environ, "ATTNCONV_CACHE": cache, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # The one-process run, here while the launch starts (a token cache is written under a name of its own, then
    # renamed: the two may share it).
    one = uptrain(UptrainSettings(str(model), str(tmp_path / "one"), data=str(data), steps=4, seq_len=16, lr=1e-2,
                                  batch_size=4, grad_accum=2, cache_dir=cache, quiet=True))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    log = [json.loads(x) for x in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert json.loads((tmp_path / "two" / "attnconv.json").read_text())["uptrain"]["settings"]["processes"] == 2
    a, b = [r["loss"] for r in one["log"]], [r["loss"] for r in log]
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, (a, b)
