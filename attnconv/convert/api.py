"""`convert()`: run a plan shard by shard into a temporary folder that becomes OUT only when complete."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from attnconv import __version__
from attnconv.convert.plan import Plan, Step, make_plan
from attnconv.convert.tensor_io import ShardWriter
from attnconv.errors import AttnconvError
from attnconv.hub import parse_dtype
from attnconv.kv import DTYPE_BYTES
from attnconv.outputs import atomic_output_dir, check_output_dir

TARGETS = ("gqa", "mqa")


def resolve_kv_heads(to: str, kv_heads: int | None) -> int:
    """--to mqa means --kv-heads 1; --to gqa needs --kv-heads."""
    if to not in TARGETS:
        raise AttnconvError(f"--to {to!r} is not a target; choose one of {', '.join(TARGETS)}")
    if to == "mqa":
        if kv_heads not in (None, 1):
            raise AttnconvError(f"--to mqa means one KV head; drop --kv-heads {kv_heads} or use --to gqa")
        return 1
    if kv_heads is None:
        raise AttnconvError("--to gqa needs --kv-heads N (the number of KV heads to keep)")
    return kv_heads


def _sha256_files(files: list[Path], into: dict[str, str]) -> None:
    for f in files:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)  # hashlib releases the GIL: this runs beside the conversion
        into[f.name] = h.hexdigest()


def _revision(path: Path) -> str | None:
    """The hub commit when the source came from the huggingface_hub cache (…/snapshots/<sha>)."""
    return path.name if path.parent.name == "snapshots" else None


def kv_bytes_per_token(plan: Plan, which: str) -> int:
    layout = plan.layout_in if which == "before" else plan.layout_out
    dtype = plan.out_dtype if which == "after" and plan.out_dtype else None
    if dtype is None:
        k_name = next(s.inputs[0] for s in plan.steps if s.op != "copy")
        dtype = plan.reader.tensors[k_name].dtype
    return layout.layers * 2 * layout.n_kv_heads * layout.head_dim * DTYPE_BYTES.get(dtype, 4)


def provenance(plan: Plan, hashes: dict[str, str]) -> dict:
    lay_in, lay_out = plan.layout_in, plan.layout_out
    return {
        "attnconv_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": plan.source_spec,
        "source_path": str(plan.source.absolute()),
        "source_revision": _revision(plan.source),
        "source_weight_sha256": hashes,
        "source_family": plan.adapter.name,
        "conversion": {
            "to": "mqa" if lay_out.n_kv_heads == 1 else "gqa",
            "method": plan.method.name,
            "seed": plan.seed if plan.method.uses_seed else None,
            "n_heads": lay_in.n_heads,
            "kv_heads_before": lay_in.n_kv_heads,
            "kv_heads_after": lay_out.n_kv_heads,
            "head_dim": lay_in.head_dim,
            "groups": [list(range(g * lay_in.n_kv_heads // lay_out.n_kv_heads,
                                  (g + 1) * lay_in.n_kv_heads // lay_out.n_kv_heads))
                       for g in range(lay_out.n_kv_heads)],
            "dtype": str(plan.out_dtype).removeprefix("torch.") if plan.out_dtype else "auto",
            "kv_bytes_per_token_before": kv_bytes_per_token(plan, "before"),
            "kv_bytes_per_token_after": kv_bytes_per_token(plan, "after"),
        },
    }


LOOKAHEAD_BYTES = 512 << 20


def _computed_ahead(plan: Plan, steps: list[Step]) -> Iterator[tuple[Step, torch.Tensor | None]]:
    """Yield each step with its tensor (None for a raw copy), computing upcoming tensors in a thread.

    The thread reads and pools while the main thread writes, so compute hides behind IO; at most
    LOOKAHEAD_BYTES of results wait in memory.
    """
    todo = deque(i for i, s in enumerate(steps) if not plan.is_raw_copy(s))
    pending: deque = deque()
    waiting = 0
    with ThreadPoolExecutor(max_workers=1) as pool:
        for step in steps:
            while todo and (not pending or waiting < LOOKAHEAD_BYTES):
                s = steps[todo.popleft()]
                pending.append(pool.submit(lambda s=s: plan.run_step(s, [plan.reader.get(n) for n in s.inputs])))
                waiting += s.nbytes
            if plan.is_raw_copy(step):
                yield step, None
            else:
                waiting -= step.nbytes
                yield step, pending.popleft().result()


def write_plan(plan: Plan, out_dir: Path, progress: bool = True) -> None:
    """Execute every step, a few tensors in memory at a time; unchanged tensors are copied as bytes."""
    shards = plan.shards()
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    # A finished shard is flushed to disk (fsync) in a thread while the next one is written.
    with Progress(*columns, transient=True, disable=not progress) as bar, ThreadPoolExecutor(1) as flusher:
        task = bar.add_task("converting", total=plan.bytes_written)
        flushes = []
        for shard, steps in shards.items():
            writer = ShardWriter(out_dir / shard, [(s.output, s.dtype, s.shape) for s in steps])
            run: list = []  # raw copies whose source bytes follow each other: one kernel copy for all
            for step, tensor in _computed_ahead(plan, steps):
                meta = plan.reader.tensors[step.inputs[0]]
                if run and (tensor is not None or meta.file != run[-1][1].file or meta.start != run[-1][1].end):
                    writer.copy_raw(run)
                    run = []
                if tensor is None:
                    run.append((step.output, meta))
                else:
                    writer.write(step.output, tensor)
                bar.advance(task, step.nbytes)
            if run:
                writer.copy_raw(run)
            flushes.append(flusher.submit(writer.close))
        for f in flushes:
            f.result()  # re-raises a failed flush
    if len(shards) > 1:
        index = {"metadata": {"total_size": plan.bytes_written},
                 "weight_map": {s.output: s.shard for s in plan.steps}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert(source: str | Path, out: str | Path | None, *, to: str = "gqa", kv_heads: int | None = None,
            method: str = "mean", seed: int = 0, dtype: str = "auto", dry_run: bool = False,
            overwrite: bool = False, allow_pickle: bool = False, progress: bool = True) -> Plan:
    """Convert SOURCE (folder or hub id) to GQA/MQA in OUT. Returns the plan (executed unless dry_run)."""
    plan = make_plan(source, resolve_kv_heads(to, kv_heads), method, seed, parse_dtype(dtype), allow_pickle)
    if dry_run:
        return plan
    if out is None:
        raise AttnconvError("an output folder is needed (or pass --dry-run to only print the plan)")
    out_path = check_output_dir(out, overwrite)
    src = plan.source.resolve()
    if out_path.resolve() == src or src in out_path.resolve().parents or out_path.resolve() in src.parents:
        raise AttnconvError(f"{out} overlaps the source {plan.source}; the source is never modified: "
                            "choose another output folder")
    hashes: dict[str, str] = {}
    files = sorted({m.file for m in plan.reader.tensors.values()})
    hasher = threading.Thread(target=_sha256_files, args=(files, hashes), daemon=True)
    hasher.start()
    with atomic_output_dir(out_path, overwrite) as tmp:
        write_plan(plan, tmp, progress)
        (tmp / "config.json").write_text(json.dumps(plan.config_out, indent=2, sort_keys=True) + "\n")
        for name in plan.files_to_copy:
            shutil.copy2(plan.source / name, tmp / name)
        hasher.join()
        (tmp / "attnconv.json").write_text(json.dumps(provenance(plan, hashes), indent=2) + "\n")
    return plan
