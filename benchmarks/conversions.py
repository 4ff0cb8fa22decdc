"""Shared by the quality benchmarks: convert a source once into a work folder, calibrating only where the
conversion reads activations (convert refuses calibration it would not use)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from attnconv.convert.api import convert
from attnconv.convert.settings import ConvertSettings


def convert_if_absent(source: Path, out: Path, settings: dict, *, calibrate: str, calib_tokens: int,
                      calib_seq_len: int) -> Path:
    """OUT converted from SOURCE with SETTINGS (ConvertSettings fields), unless OUT exists from an earlier run."""
    if not out.exists():
        s = ConvertSettings(str(source), str(out), **settings)
        if s.needs_calibration:
            s = dataclasses.replace(s, calibrate=calibrate, calib_tokens=calib_tokens, calib_seq_len=calib_seq_len)
        convert(s, progress=False)
    return out
