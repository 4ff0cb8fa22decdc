"""`convert()`: run a plan shard by shard into a temporary folder that becomes OUT only when complete."""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from attnconv import __version__
from attnconv.convert.layout import inspect_source
from attnconv.convert.raw_copy import RawCopier
from attnconv.convert.settings import ConvertSettings
from attnconv.fingerprint import sha256_files
from attnconv.outputs import atomic_output_dir, check_output_dir, protect_inputs

if TYPE_CHECKING:  # torch and the plan load only once the copy of unchanged tensors is under way
    from attnconv.convert.plan import Plan



def _revision(path: Path) -> str | None:
    """The hub commit when the source came from the huggingface_hub cache (…/snapshots/<sha>)."""
    return path.name if path.parent.name == "snapshots" else None


def _conversion(plan: Plan) -> dict:
    lay_in, lay_out = plan.layout_in, plan.layout_out
    common = {"n_heads": lay_in.n_heads, "kv_heads_before": lay_in.n_kv_heads, "head_dim": lay_in.head_dim,
              "dtype": str(plan.out_dtype).removeprefix("torch.") if plan.out_dtype else "auto",
              "kv_bytes_per_token_before": plan.kv_bytes_per_token("before"),
              "kv_bytes_per_token_after": plan.kv_bytes_per_token("after")}
    if plan.target is not None:  # a layer at a time: what each layer chose
        return plan.target.conversion_record(common, plan.calibration())
    return {"to": "mqa" if lay_out.n_kv_heads == 1 else "gqa", "method": plan.method.name,
            "seed": plan.settings.seed if plan.method.uses_seed else None, "kv_heads_after": lay_out.n_kv_heads,
            "groups": [list(range(g * lay_in.n_kv_heads // lay_out.n_kv_heads,
                                  (g + 1) * lay_in.n_kv_heads // lay_out.n_kv_heads))
                       for g in range(lay_out.n_kv_heads)], **common}


def provenance(plan: Plan, hashes: dict[str, str]) -> dict:
    return {
        "attnconv_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": plan.settings.source,
        "source_path": str(plan.source.absolute()),
        "source_revision": _revision(plan.source),
        "source_weight_sha256": hashes,
        "source_family": plan.family.name,
        "settings": plan.settings.record(),
        "conversion": _conversion(plan),
    }


def convert(settings: ConvertSettings, progress: bool = True) -> Plan:
    """Convert settings.source (folder or hub id) into settings.out. Returns the plan (executed unless dry_run)."""
    source_info = inspect_source(settings)  # no torch yet
    if settings.dry_run:
        from attnconv.convert.plan import plan_for

        return plan_for(source_info)
    out_path = check_output_dir(settings.out, settings.overwrite)
    protect_inputs(out_path, [source_info.path])
    with atomic_output_dir(out_path, settings.overwrite, [source_info.path]) as tmp, \
            RawCopier(source_info, tmp) as copier:
        # The unchanged tensors are being copied from here on, while torch loads and the plan is made.
        from attnconv.convert.execute import write_plan
        from attnconv.convert.plan import plan_for

        plan = plan_for(source_info)
        plan.progress = progress
        # Hashing the source for provenance waits until torch is loaded: on few cores both compete with
        # the copy for CPU, and by now the copy has brought the first shards into the page cache.
        hashes: dict[str, str] = {}
        files = sorted({m.file for m in source_info.reader.tensors.values()})
        hasher = threading.Thread(target=sha256_files, args=(files, hashes), daemon=True)
        hasher.start()
        write_plan(plan, tmp, progress, copier)
        if plan.target is not None:  # the config may record what the layers chose (MLA's RoPE pairs)
            dtype = str(plan.out_dtype).removeprefix("torch.") if plan.out_dtype is not None else None
            plan.config_out = plan.target.finished_config(plan.config_out, dtype)
        (tmp / "config.json").write_text(json.dumps(plan.config_out, indent=2, sort_keys=True, allow_nan=False) + "\n")
        for name in plan.files_to_copy:
            shutil.copy2(plan.source / name, tmp / name)
        hasher.join()
        (tmp / "attnconv.json").write_text(json.dumps(provenance(plan, hashes), indent=2, allow_nan=False) + "\n")
    return plan
