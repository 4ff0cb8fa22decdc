"""Stopping a training run cleanly on Ctrl-C (SIGINT) or SIGTERM.

The first signal asks the loop to stop after the optimizer step under way; the loop then writes a checkpoint and
ends with a message saying where and how to resume (exit 130 or 143). A second signal stops at once (the previous
checkpoint, if any, is intact: checkpoints are published by rename). With several processes the request is shared
at each step, so all of them stop after the same step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from attnconv.errors import Terminated


class StopRequest:
    """Set by the first SIGINT/SIGTERM; `signum` says which."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __bool__(self) -> bool:
        return self.signum is not None

    def agreed(self, accelerator) -> bool:
        """Whether any process was asked to stop (one small all-reduce with several processes)."""
        if accelerator.num_processes == 1:
            return bool(self)
        flag = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        flag = accelerator.reduce(flag, reduction="sum")
        if flag.item() and self.signum is None:
            self.signum = signal.SIGTERM
        return bool(flag.item())


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within this block, the first SIGINT/SIGTERM sets the yielded StopRequest; a second one interrupts at once."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum, frame):
        if request:
            raise KeyboardInterrupt if signum == signal.SIGINT else Terminated()
        request.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
