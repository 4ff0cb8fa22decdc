"""convert IO: shards written header-last, unchanged tensors copied before torch loads, clean failure mid-copy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from attnconv.convert.api import convert
from attnconv.convert.layout import inspect_source, raw_runs
from attnconv.convert.plan import make_plan
from attnconv.convert.settings import ConvertSettings
from attnconv.errors import AttnconvError
from attnconv.tensor_io import CheckpointReader, ShardWriter, header_reserve
from attnconv.testing import build_tiny_model


def test_header_reserve_bounds_renamed_widened_reordered_tensors(tmp_path):
    # The worst a conversion does to a header: longer names (GPT-2's missing prefix), F8 -> F32, new order.
    src = {f"h.{i}.w": torch.randn(3 + i, 70).to(torch.float8_e4m3fn) for i in range(12)}
    src["wte"] = torch.randn(1000, 7).to(torch.float8_e4m3fn)
    save_file(src, tmp_path / "src.safetensors")
    metas = list(CheckpointReader([tmp_path / "src.safetensors"], "safetensors").tensors.values())
    writer = ShardWriter(tmp_path / "out.safetensors", header_reserve(metas))
    for m in reversed(metas):
        writer.write("transformer." + m.name, src[m.name].float())
    writer.close()
    out = load_file(tmp_path / "out.safetensors")  # safetensors' own reader accepts the padded header
    assert set(out) == {"transformer." + k for k in src}
    assert all(torch.equal(out["transformer." + k], v.float()) for k, v in src.items())
    raw = (tmp_path / "out.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0 and json.loads(raw[8:8 + n])["__metadata__"] == {"format": "pt"}


def test_raw_copy_matches_source_bytes_and_keeps_tensor_order(tmp_path):
    src = build_tiny_model("llama", tmp_path / "src", seed=2, max_shard_size="60KB")
    convert(ConvertSettings(src, tmp_path / "out", kv_heads=2), progress=False)
    plan = make_plan(ConvertSettings(src, kv_heads=2, dry_run=True))
    source = {}
    for f in sorted(src.glob("*.safetensors")):
        source.update(load_file(f))
    for shard, steps in plan.shards().items():
        with safe_open(tmp_path / "out" / shard, "pt") as f:
            assert set(f.keys()) == {s.output for s in steps}
            for s in steps:
                if s.raw:
                    assert torch.equal(f.get_tensor(s.output), source[s.inputs[0]])
        # byte order in the file follows the plan: unchanged tensors first, then the converted ones
        raw = (tmp_path / "out" / shard).read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        starts = [header[s.output]["data_offsets"][0] for s in steps]
        assert starts == sorted(starts)
    assert any(s.raw for s in plan.steps) and any(not s.raw for s in plan.steps)


def test_unchanged_tensors_are_copied_without_importing_torch(tmp_path):
    src = build_tiny_model("qwen2", tmp_path / "src", seed=0)
    script = f"""
import sys
from pathlib import Path
from attnconv.convert.layout import inspect_source
from attnconv.convert.raw_copy import RawCopier
from attnconv.convert.settings import ConvertSettings
s = inspect_source(ConvertSettings({str(src)!r}, kv_heads=2, dry_run=True))
out = Path({str(tmp_path / 'copy')!r}); out.mkdir()
with RawCopier(s, out) as c:
    names = c.writer("model.safetensors").names
print("torch" in sys.modules, ",".join(names))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    torch_loaded, names = done.stdout.split()
    assert torch_loaded == "False"
    plan = make_plan(ConvertSettings(src, kv_heads=2, dry_run=True))
    assert names.split(",") == [s.output for s in plan.steps if s.raw]


def test_raw_runs_merge_only_adjacent_bytes(tmp_path):
    src = build_tiny_model("llama", tmp_path / "src", seed=0)
    entries = inspect_source(ConvertSettings(src, kv_heads=1, dry_run=True)).shards["model.safetensors"]
    runs = raw_runs(entries)
    assert sum(len(r) for r in runs) == sum(e.raw for e in entries)
    for r in runs:
        assert all(a.meta.end == b.meta.start for a, b in zip(r, r[1:], strict=False))
    for a, b in zip(runs, runs[1:], strict=False):
        assert a[-1].meta.end != b[0].meta.start  # a K/V tensor (not copied) lies between


def test_error_after_copy_started_leaves_nothing(tmp_path, monkeypatch):
    # An error once the unchanged tensors started copying (here: making the plan) must leave nothing behind.
    from attnconv.convert import plan as plan_module

    src = build_tiny_model("llama", tmp_path / "src", seed=0)

    def broken(source):
        raise AttnconvError("the plan failed")

    monkeypatch.setattr(plan_module, "plan_for", broken)
    with pytest.raises(AttnconvError, match="the plan failed"):
        convert(ConvertSettings(src, tmp_path / "out", kv_heads=2), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_conversion_leaves_the_callers_torch_threads_as_they_were(tmp_path):
    """The pooling worker runs torch single-threaded; in a fresh process that setting would become process-wide,
    slowing whatever the caller (the demo, a recipe) trains or measures next."""
    src = build_tiny_model("llama", tmp_path / "src", seed=0)
    script = (f"import torch\nfrom attnconv.convert.api import convert\n"
              f"from attnconv.convert.settings import ConvertSettings\n"
              f"convert(ConvertSettings({str(src)!r}, {str(tmp_path / 'out')!r}, kv_heads=2), progress=False)\n"
              f"print(torch.get_num_threads())")
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}
    # Side by side: each process mostly imports torch. The fresh one must be another process: asking torch for
    # its count before converting would itself keep the count (the bug left it alone in that order).
    done, fresh = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
                   for code in (script, "import torch; print(torch.get_num_threads())")]
    (out, err), (fresh_out, _) = done.communicate(timeout=120), fresh.communicate(timeout=120)
    assert done.returncode == 0, err
    assert out.split()[-1] == fresh_out.split()[-1]
