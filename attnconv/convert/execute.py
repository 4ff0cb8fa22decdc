"""Run a plan into a folder: unchanged tensors copied as bytes (in a thread), converted ones computed ahead."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from attnconv import finite
from attnconv.convert.ops import Step
from attnconv.convert.plan import Plan
from attnconv.convert.raw_copy import RawCopier
from attnconv.errors import Cancelled

LOOKAHEAD_BYTES = 256 << 20  # converted tensors computed ahead of the writer; as much again may wait for a shard


def _computed_ahead(plan: Plan, steps: list[Step]) -> Iterator[tuple[Step, torch.Tensor]]:
    """Yield each step with its tensor, computing upcoming ones in a thread (at most LOOKAHEAD_BYTES ahead).

    The thread reads and pools while the main thread writes, so compute hides behind IO.
    """
    todo, pending, waiting = deque(steps), deque(), 0
    # GQA by mean/first/random: one torch thread in the worker: pooling is small and memory-bound, and more
    # threads spin-wait between torch's parallel regions, taking cores from the copy. A layer at a time (MLA,
    # calibrated GQA): every thread, for the calibration forward passes and the factorisations. torch's thread
    # count is process-wide once set from any thread before the main thread asked for it, so the caller's count
    # is read first and put back after (a library caller, the demo, goes on training and measuring in this
    # process).
    caller = torch.get_num_threads()
    threads = 1 if plan.target is None else caller

    def run(s: Step) -> torch.Tensor:
        if plan.stop.is_set():
            raise Cancelled("conversion stopped")
        return plan.run_step(s, plan.step_inputs(s))

    pool = ThreadPoolExecutor(max_workers=1, initializer=torch.set_num_threads, initargs=(threads,))
    try:
        while todo or pending:
            while todo and (not pending or waiting < LOOKAHEAD_BYTES):
                s = todo.popleft()
                pending.append((s, pool.submit(run, s)))
                waiting += s.nbytes
            step, fut = pending.popleft()
            waiting -= step.nbytes
            yield step, fut.result()
    except BaseException:  # Ctrl-C, SIGTERM, an error, or the writer leaving: the steps under way stop at once
        plan.stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # the step under way ends at its next check of plan.stop
        torch.set_num_threads(caller)


def _write_all(writer, held: list[tuple[Step, torch.Tensor]], advance) -> list:
    for step, tensor in held:
        writer.write(step.output, finite.output_tensor(step.output, tensor))
        advance(step.nbytes)
    return []


def _write_shards(plan: Plan, copier: RawCopier, computed: Iterator, advance, flusher) -> list:
    """Write every shard: its unchanged tensors (copied), then its converted ones as they come; returns the
    flushes under way."""
    flushes = []
    for shard, steps in plan.shards().items():
        writer, held = None, []
        for _ in (s for s in steps if not s.raw):
            held.append(next(computed))
            # Converted tensors follow the shard's unchanged ones: hold them until those are copied.
            if writer is None and (copier.ready(shard) or sum(s.nbytes for s, _ in held) >= LOOKAHEAD_BYTES):
                writer = copier.writer(shard)
            if writer is not None:
                held = _write_all(writer, held, advance)
        writer = writer or copier.writer(shard)
        _write_all(writer, held, advance)
        if writer.names != [s.output for s in steps]:
            raise RuntimeError(f"{shard}: tensors written out of plan order")
        flushes.append(flusher.submit(writer.close))
    return flushes


def write_plan(plan: Plan, out_dir: Path, progress: bool = True, copier: RawCopier | None = None) -> None:
    """Execute every step, a few tensors in memory at a time.

    copier: a RawCopier already copying this plan's unchanged tensors into out_dir (convert starts it
    before torch is imported); without one, it is started here.
    """
    if copier is None:
        with RawCopier(plan.layout, out_dir) as own:
            return write_plan(plan, out_dir, progress, own)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    # A finished shard is flushed to disk (fsync) in a thread while the next one is written.
    with Progress(*columns, transient=True, disable=not progress) as bar, ThreadPoolExecutor(1) as flusher:
        task = bar.add_task("converting", total=plan.bytes_written)
        copier.report_progress(lambda n: bar.advance(task, n))
        computed = _computed_ahead(plan, [s for s in plan.steps if not s.raw])
        try:
            flushes = _write_shards(plan, copier, computed, lambda n: bar.advance(task, n), flusher)
        finally:
            computed.close()  # stops the steps under way now, not when the traceback is freed
        for f in flushes:
            f.result()  # re-raises a failed flush
    if len(plan.shards()) > 1:
        index = {"metadata": {"total_size": plan.bytes_written},
                 "weight_map": {s.output: s.shard for s in plan.steps}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
