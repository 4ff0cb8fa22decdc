"""Process settings applied before torch loads: transparent huge pages for torch's CPU allocator."""

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


def _probe(user_value: str | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=_clean_env(user_value),
                         check=True)
    took, huge_kb = out.stdout.split()
    return took, int(huge_kb)


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
    took, huge_kb = _probe()
    assert took == "True"
    assert huge_kb >= 32 << 10  # most of the 64 MiB tensor
    if "[madvise]" in _mode():  # only madvised memory gets huge pages: the user's 0 leaves them off
        took, huge_kb = _probe("0")
        assert (took, huge_kb) == ("False", 0)


@pytest.mark.skipif("[madvise]" not in _mode() and "[always]" not in _mode(), reason="the kernel has THP off")
def test_the_command_applies_it_before_torch_loads():
    code = ("import os, sys\nsys.argv = ['attnconv', '--version']\nfrom attnconv.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint(os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(), check=True)
    assert out.stdout.split()[-1] == "1"
