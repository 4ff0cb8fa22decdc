"""Copy the tensors a conversion leaves unchanged, in a thread, from the moment the source is known.

Torch-free: `convert` starts this before importing torch, so the bulk of the bytes moves while torch
loads and the plan is made. Each output shard's writer is handed over once its unchanged tensors are
in; the caller appends the converted tensors and closes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from pathlib import Path

from attnconv.convert.layout import Source, raw_runs
from attnconv.tensor_io import ShardWriter


class RawCopier:
    """`with RawCopier(source, out_dir) as copier: ... copier.writer(shard)`; leaving early stops the copy."""

    def __init__(self, source: Source, out_dir: Path):
        self.source, self.out_dir = source, out_dir
        self._writers: dict[str, Future] = {shard: Future() for shard in source.shards}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._done_bytes = 0
        self._on_bytes: Callable[[int], None] | None = None
        self._thread = threading.Thread(target=self._run, name="attnconv-raw-copy", daemon=True)

    def __enter__(self) -> RawCopier:
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._stop.set()
        self._thread.join()
        if exc_type is not None:  # close the files of an abandoned conversion (closing twice is harmless)
            for fut in self._writers.values():
                if not fut.cancelled() and fut.exception() is None:
                    fut.result().abort()

    def report_progress(self, on_bytes: Callable[[int], None]) -> None:
        """Call on_bytes(n) for every n bytes copied from now on, and once now for those already copied."""
        with self._lock:
            self._on_bytes = on_bytes
            done = self._done_bytes
        on_bytes(done)

    def _advance(self, n: int) -> None:
        with self._lock:
            self._done_bytes += n
            callback = self._on_bytes
        if callback is not None:
            callback(n)

    def _run(self) -> None:
        for shard, entries in self.source.shards.items():
            fut = self._writers[shard]
            if self._stop.is_set():
                fut.cancel()
                continue
            try:
                writer = ShardWriter(self.out_dir / shard, self.source.reserve(shard))
                for run in raw_runs(entries):
                    if self._stop.is_set():
                        break
                    writer.copy_raw([(e.output, e.meta) for e in run])
                    self._advance(sum(e.meta.nbytes for e in run))
                fut.set_result(writer)
            except BaseException as e:  # handed to the main thread with the writer it waits for
                fut.set_exception(e)
                self._stop.set()

    def ready(self, shard: str) -> bool:
        """Whether the shard's unchanged tensors are all copied (or the copy failed)."""
        return self._writers[shard].done()

    def writer(self, shard: str) -> ShardWriter:
        """The shard's writer with every unchanged tensor written (waits for the copy; re-raises its error)."""
        try:
            return self._writers[shard].result()
        except CancelledError:
            raise RuntimeError(f"the copy into {shard} was stopped by an earlier error") from None
