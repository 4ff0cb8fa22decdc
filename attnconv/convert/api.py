"""`convert()`: run a plan shard by shard into a temporary folder that becomes OUT only when complete."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import mmap
import os
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from attnconv import __version__
from attnconv.convert.layout import inspect_source
from attnconv.convert.raw_copy import RawCopier
from attnconv.errors import AttnconvError
from attnconv.outputs import atomic_output_dir, check_output_dir

if TYPE_CHECKING:  # torch and the plan load only once the copy of unchanged tensors is under way
    from attnconv.convert.plan import Plan

TARGETS = ("gqa", "mqa")
HASH_WINDOW = 64 << 20  # a multiple of mmap.ALLOCATIONGRANULARITY


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
            size = os.fstat(fh.fileno()).st_size
            # Hash the page cache in place, one mapped window at a time: read() would copy every byte once
            # more (~1 s of CPU for 3 GB here), and one whole-file map would count the file in our RSS.
            for start in range(0, size, HASH_WINDOW):
                with mmap.mmap(fh.fileno(), min(HASH_WINDOW, size - start), access=mmap.ACCESS_READ,
                               offset=start) as window:
                    h.update(window)  # hashlib releases the GIL: this runs beside the copy
        into[f.name] = h.hexdigest()


def _revision(path: Path) -> str | None:
    """The hub commit when the source came from the huggingface_hub cache (…/snapshots/<sha>)."""
    return path.name if path.parent.name == "snapshots" else None


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
            "kv_bytes_per_token_before": plan.kv_bytes_per_token("before"),
            "kv_bytes_per_token_after": plan.kv_bytes_per_token("after"),
        },
    }


def convert(source: str | Path, out: str | Path | None, *, to: str = "gqa", kv_heads: int | None = None,
            method: str = "mean", seed: int = 0, dtype: str = "auto", dry_run: bool = False,
            overwrite: bool = False, allow_pickle: bool = False, progress: bool = True) -> Plan:
    """Convert SOURCE (folder or hub id) to GQA/MQA in OUT. Returns the plan (executed unless dry_run)."""
    source_info = inspect_source(source, resolve_kv_heads(to, kv_heads), dtype, allow_pickle)  # no torch yet
    if dry_run:
        from attnconv.convert.plan import plan_for

        return plan_for(source_info, method, seed)
    if out is None:
        raise AttnconvError("an output folder is needed (or pass --dry-run to only print the plan)")
    out_path = check_output_dir(out, overwrite)
    src = source_info.path.resolve()
    if out_path.resolve() == src or src in out_path.resolve().parents or out_path.resolve() in src.parents:
        raise AttnconvError(f"{out} overlaps the source {source_info.path}; the source is never modified: "
                            "choose another output folder")
    with atomic_output_dir(out_path, overwrite) as tmp, RawCopier(source_info, tmp) as copier:
        # The unchanged tensors are being copied from here on, while torch loads and the plan is made.
        from attnconv.convert.execute import write_plan
        from attnconv.convert.plan import plan_for

        plan = plan_for(source_info, method, seed)
        # Hashing the source for provenance waits until torch is loaded: on few cores both compete with
        # the copy for CPU, and by now the copy has brought the first shards into the page cache.
        hashes: dict[str, str] = {}
        files = sorted({m.file for m in source_info.reader.tensors.values()})
        hasher = threading.Thread(target=_sha256_files, args=(files, hashes), daemon=True)
        hasher.start()
        write_plan(plan, tmp, progress, copier)
        (tmp / "config.json").write_text(json.dumps(plan.config_out, indent=2, sort_keys=True) + "\n")
        for name in plan.files_to_copy:
            shutil.copy2(plan.source / name, tmp / name)
        hasher.join()
        (tmp / "attnconv.json").write_text(json.dumps(provenance(plan, hashes), indent=2) + "\n")
    return plan
