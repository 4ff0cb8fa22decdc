"""Ctrl-C and SIGTERM through a real `attnconv` process: exit 130/143, one line saying what was kept, nothing
half-written; an interrupted uptrain checkpoints, and --resume finishes it (and succeeds again once finished)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from attnconv.testing import build_tiny_model
from attnconv.textdata import tinyshakespeare_split


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    model = build_tiny_model("llama", root / "m", with_tokenizer=True, hidden=32, n_heads=4, n_kv_heads=1)
    (root / "train.txt").write_text(tinyshakespeare_split("train")[:20_000])
    return root, model


def _patched_attnconv(patch: str) -> list[str]:
    """`python -c` running the `attnconv` command line after PATCH, which imports (torch with it) what it patches:
    the allocator settings the command applies before torch is imported come first."""
    return [sys.executable, "-c", "from attnconv.runtime import prefer_huge_pages\nprefer_huge_pages()\n" + patch
            + "import sys\nfrom attnconv.cli import run\nsys.argv = ['attnconv', *sys.argv[1:]]\nrun()\n"]


def _start(args, root, patch=None):
    env = {**os.environ, "ATTNCONV_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = _patched_attnconv(patch) if patch else [sys.executable, "-m", "attnconv"]
    return subprocess.Popen([*command, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(predicate, proc, timeout=120):
    t0 = time.perf_counter()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.perf_counter() - t0 < timeout
        time.sleep(0.05)


def _uptrain_args(model, out, train, steps):
    return ["uptrain", model, out, "--data", train, "--steps", steps, "--seq-len", 16, "--batch-size", 2,
            "--lr", "1e-3", "--quiet"]


STEPS = 16
# Each step of the signalled process ends with a pause (sleeping, no CPU): the run is still going when the signal
# comes after step 2, however busy the machine, and the resume here trains only the few steps left.
_SLOW_STEPS = """
import time
import attnconv.uptrain.trainer as trainer
clip_and_step = trainer.clip_and_step
def slow(*args, **kwargs):
    result = clip_and_step(*args, **kwargs)
    time.sleep(0.4)
    return result
trainer.clip_and_step = slow
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_uptrain_stops_after_the_step_with_a_checkpoint_and_resumes(env, cli, one_torch_thread, monkeypatch,
                                                                    signum, code):
    root, model = env
    out = root / f"up-{code}"
    args = _uptrain_args(model, out, root / "train.txt", STEPS)
    proc = _start(args, root, _SLOW_STEPS)
    log = root / f"up-{code}.uptrain-run" / "train_log.jsonl"
    _wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 2, proc)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: interrupted after step "), err
    assert "checkpoint saved in" in lines[0] and "--resume" in lines[0] and "Traceback" not in err
    assert not out.exists()
    step = int(lines[0].split("after step ")[1].split()[0])
    assert 2 <= step < STEPS
    # The resumes run the same command in this process (the signal needed a process of its own): no torch import.
    monkeypatch.setenv("ATTNCONV_CACHE", str(root / "cache"))
    done, _, err = cli(*args[:5], "--steps", step + 3, *args[7:], "--resume")
    assert done != 0 and f"steps: {STEPS} -> " in err  # another length is another run
    done, _, err = cli(*args, "--resume", "--save-every", "1000")
    assert done == 0, err
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    again, _, err = cli(*args, "--resume")
    assert again == 0 and "already holds this finished run" in err, err


# A line on stdout as the decode benchmark starts, so the signal comes while the evaluation works.
_DECODE_MARKER = """
import attnconv.eval.api as api
measure_decode = api.measure_decode
def marked(*args, **kwargs):
    print("decoding", flush=True)
    return measure_decode(*args, **kwargs)
api.measure_decode = marked
"""


def test_eval_terminated_leaves_no_output(env):
    root, model = env
    out = root / "report"
    # torch's decode loop: the native kernel would first be compiled into this test's cache (the signal is the point).
    proc = _start(["eval", model, "--no-perplexity", "--decode", "--contexts", "8,16,32,48", "--batches", "1,2,3",
                   "--new-tokens", 32, "--repeats", 50, "--decode-kernel", "torch", "--out", out], root, _DECODE_MARKER)
    assert proc.stdout.readline().startswith("decoding"), proc.communicate()
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1].startswith("error: terminated") and "Traceback" not in err
    assert not out.exists() and not [p for p in root.iterdir() if "attnconv-" in p.name]


# A line on stdout as each calibration layer starts, so the test signals mid-calibration.
_CALIBRATION_MARKER = """
import attnconv.calibration.runner as runner
run_layer = runner.LayerwiseModel.run_layer
def marked(self, index, *args, **kwargs):
    print("calibrating layer", index, flush=True)
    return run_layer(self, index, *args, **kwargs)
runner.LayerwiseModel.run_layer = marked
"""


def test_calibrated_conversion_stops_within_two_seconds(tmp_path):
    """The signal stops the calibration after its current batch, not after every queued layer (7-20 s here before)."""
    src = build_tiny_model("llama", tmp_path / "src", with_tokenizer=True, hidden=64, n_heads=4, layers=4,
                           max_positions=512)
    out = tmp_path / "mla"
    proc = _start(["convert", src, out, "--to", "mla", "--format", "attnconv", "--kv-rank", "16", "--calibrate",
                   "tinyshakespeare:train", "--calib-tokens", "16384", "--calib-seq-len", "512"], tmp_path,
                  _CALIBRATION_MARKER)
    first = proc.stdout.readline()
    if first.startswith("note: "):  # what the calibration reads and why, said before it starts
        first = proc.stdout.readline()
    assert first.startswith("calibrating layer 0"), proc.communicate()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    t0 = time.perf_counter()
    _, err = proc.communicate(timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: terminated"), err
    assert elapsed < 2, f"exited {elapsed:.1f} s after the signal"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "attnconv-" in p.name]
