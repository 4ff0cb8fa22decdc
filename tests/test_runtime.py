"""Process settings: transparent huge pages for torch's CPU allocator, a malloc that keeps freed memory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from attnconv import runtime

# Allocates 64 MiB through torch and reports how much of the process is in huge pages (kB).
_PROBE = """
import re, sys
from attnconv.runtime import prefer_huge_pages
print(prefer_huge_pages())
import torch
x = torch.ones(16 << 20)  # 64 MiB of float32, touched
print(sum(int(k) for k in re.findall(r"AnonHugePages:\\s+(\\d+)", open("/proc/self/smaps").read())))
"""


def _clean_env(user_value: str | None = None) -> dict[str, str]:
    """This environment without the setting, or with the user's own value."""
    env = {k: v for k, v in os.environ.items() if k != runtime.HUGE_PAGES_ENV}
    return env if user_value is None else {**env, runtime.HUGE_PAGES_ENV: user_value}


def _side_by_side(*children: tuple[list[str], dict[str, str]]) -> list[list[str]]:
    """The words each `python ARGS` child (args, env) prints, the children run side by side: each is mostly
    importing torch, and what they measure is their own process's. One OpenMP thread each: filling the tensors
    with two beside another process spin-waits (measured: more CPU side by side than one after another)."""
    procs = [subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "OMP_NUM_THREADS": "1"}) for args, env in children]
    words = []
    for proc in procs:
        out, err = proc.communicate()
        assert proc.returncode == 0, err
        words.append(out.split())
    return words


def _probes(*user_values: str | None) -> list[tuple[str, int]]:
    return [(took, int(huge_kb)) for took, huge_kb in _side_by_side(*[(["-c", _PROBE], _clean_env(v))
                                                                      for v in user_values])]


def _mode() -> str:
    try:
        return runtime._THP_MODE.read_text()
    except OSError:
        return ""


def test_env_adds_the_setting_only_where_the_kernel_has_thp(tmp_path, monkeypatch):
    mode = tmp_path / "enabled"
    monkeypatch.setattr(runtime, "_THP_MODE", mode)
    mode.write_text("always [madvise] never\n")
    assert runtime.attnconv_env({"PATH": "/bin"}) == {"PATH": "/bin", runtime.HUGE_PAGES_ENV: "1"}
    assert runtime.attnconv_env({runtime.HUGE_PAGES_ENV: "0"}) == {runtime.HUGE_PAGES_ENV: "0"}  # the user's say
    mode.write_text("always madvise [never]\n")
    assert runtime.attnconv_env({"PATH": "/bin"}) == {"PATH": "/bin"}
    mode.unlink()  # not Linux, or no THP
    assert runtime.attnconv_env({}) == {}


def test_too_late_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401  (the allocator has read its setting)

    monkeypatch.delenv(runtime.HUGE_PAGES_ENV, raising=False)
    assert runtime.prefer_huge_pages() is False
    assert runtime.HUGE_PAGES_ENV not in os.environ


@pytest.mark.skipif("[madvise]" not in _mode() and "[always]" not in _mode(), reason="the kernel has THP off")
def test_torch_allocates_large_tensors_in_huge_pages():
    madvise = "[madvise]" in _mode()  # only madvised memory gets huge pages: the user's 0 leaves them off
    (took, huge_kb), *users = _probes(None, *(["0"] if madvise else []))
    assert took == "True"
    assert huge_kb >= 32 << 10  # most of the 64 MiB tensor
    if madvise:
        assert users == [("False", 0)]


@pytest.mark.skipif("[madvise]" not in _mode() and "[always]" not in _mode(), reason="the kernel has THP off")
def test_the_command_applies_it_before_torch_loads():
    code = ("import os, sys\nsys.argv = ['attnconv', '--version']\nfrom attnconv.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), check=True)
    assert out.stdout.split()[-1] == "1"


# Allocates and frees the same tensors step after step, like training, and counts each step's page faults.
_REUSE_PROBE = """
import resource, sys
from attnconv.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
import torch
faults = []
for step in range(int(sys.argv[2])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x, y = torch.ones(64 << 20), torch.ones(16 << 20)  # 256 + 64 MiB, touched
    del x, y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, max(faults[-2:]))
"""


def _reuse_probes(*runs: tuple[str, int, dict[str, str]]) -> list[tuple[str, int]]:
    """(applied, faults of the worse of the last two steps) of each (mode, steps, extra env) probe."""
    base = {k: v for k, v in _clean_env("0").items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return [(applied, int(faults)) for applied, faults in _side_by_side(
        *[(["-c", _REUSE_PROBE, mode, str(steps)], {**base, **env}) for mode, steps, env in runs])]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_is_reused_without_page_faults():
    # 4 KiB pages (huge pages off): fresh blocks fault 81920 times a step; once the heap holds them, never. The
    # heap holds them from step 5 or step 7 (both seen, run to run), so 10 steps; without it every step faults.
    kept, default, users = _reuse_probes(("keep", 10, {}), ("default", 3, {}),
                                         ("keep", 3, {"MALLOC_TRIM_THRESHOLD_": "131072"}))
    assert kept[0] == "True" and kept[1] < 1000
    assert default[0] == "False" and default[1] > 30000
    # A user's own malloc tunables win: nothing is changed.
    assert users[0] == "False" and users[1] > 30000


def test_uptrain_command_keeps_freed_memory(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from attnconv.cli import app

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    result = CliRunner().invoke(app, ["uptrain", str(tmp_path / "missing"), str(tmp_path / "out"), "--data",
                                      str(tmp_path / "none.txt"), "--steps", "1"])
    assert result.exit_code != 0 and calls == [1]  # applied before the model (missing here) is loaded


def test_keep_freed_memory_is_a_no_op_without_glibc(monkeypatch):
    class NoGlibc:  # musl, macOS: no gnu_get_libc_version
        mallopt = staticmethod(lambda *a: 1)

    for var in (*runtime._MALLOC_ENV, "GLIBC_TUNABLES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: NoGlibc())
    assert runtime.keep_freed_memory() is False
