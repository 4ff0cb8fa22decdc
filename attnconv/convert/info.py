"""`attnconv info`: a model's attention shape and what its KV cache costs, as is and for every group count."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attnconv.errors import AttnconvError
from attnconv.hub import parse_dtype, resolve_source, weight_files
from attnconv.kv import CacheShape, cache_shape, dtype_bytes, max_positions


@dataclass
class ModelInfo:
    path: Path
    architecture: str
    model_type: str
    shape: CacheShape
    parameters: int
    checkpoint_dtype: str
    max_positions: int | None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def model_info(model: str | Path) -> ModelInfo:
    """Read config.json and the weight headers (no tensor is loaded)."""
    from transformers import AutoConfig

    from attnconv.convert.tensor_io import CheckpointReader

    path = resolve_source(model)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as e:
        raise AttnconvError(f"{path}/config.json could not be read by transformers ({str(e).splitlines()[0]})") \
            from None
    files, fmt = weight_files(path)
    if fmt == "safetensors":
        tensors = CheckpointReader(files, fmt).tensors.values()
        params = sum(m.nbytes // m.dtype.itemsize for m in tensors)
        dtypes = sorted({str(m.dtype).removeprefix("torch.") for m in tensors})
    else:  # never unpickle just to count: estimate from the file sizes and the config's dtype
        params, dtypes = 0, [str(getattr(config, "dtype", "unknown")).removeprefix("torch.")]
    raw = json.loads((path / "config.json").read_text())
    return ModelInfo(path, ", ".join(raw.get("architectures") or ["?"]), raw.get("model_type", "?"),
                     cache_shape(config), params, "/".join(dtypes), max_positions(config))


def kv_table_rows(shape: CacheShape, batch: int, context: int, nbytes: int) -> list[dict]:
    """One row per KV-head count that divides the query heads (the current one marked)."""
    rows = []
    for n_kv in [d for d in range(shape.n_heads, 0, -1) if shape.n_heads % d == 0]:
        s = CacheShape(shape.layers, shape.n_heads, n_kv, shape.head_dim, 2 * n_kv * shape.head_dim)
        kind = "MHA" if n_kv == shape.n_heads else "MQA" if n_kv == 1 else f"GQA-{n_kv}"
        rows.append({"kind": kind, "kv_heads": n_kv, "current": n_kv == shape.n_kv_heads,
                     "reachable": n_kv <= shape.n_kv_heads and shape.n_kv_heads % n_kv == 0,
                     "bytes_per_token": s.bytes_per_token(nbytes), "total_bytes": s.bytes(batch, context, nbytes)})
    return rows


def print_info(model: str | Path, batch: int = 1, context: int | None = None, dtype: str = "bfloat16",
               console: Console | None = None) -> ModelInfo:
    console = console or Console()
    info = model_info(model)
    nbytes = dtype_bytes(parse_dtype(dtype) or parse_dtype("bfloat16"))
    context = context or info.max_positions or 4096
    s = info.shape
    console.print(f"[bold]{info.path}[/bold]  {info.architecture} ({info.model_type})")
    params = f"{info.parameters:,}" if info.parameters else "?"
    console.print(f"layers {s.layers}  heads {s.n_heads}  KV heads {s.n_kv_heads}  head_dim {s.head_dim}  "
                  f"parameters {params}  checkpoint dtype {info.checkpoint_dtype}")
    table = Table(title=f"KV cache, batch {batch} x context {context}, {dtype} "
                        "(layers x batch x kv_heads x head_dim x context x 2 x bytes)")
    for col in ("attention", "KV heads", "per token", "total", "vs now", ""):
        table.add_column(col, justify="right" if col not in ("attention", "") else "left")
    rows = kv_table_rows(s, batch, context, nbytes)
    now = next(r["total_bytes"] for r in rows if r["current"])
    for r in rows:
        note = "this model" if r["current"] else ("" if r["reachable"] else "needs more KV heads than it has")
        table.add_row(r["kind"], str(r["kv_heads"]), human_bytes(r["bytes_per_token"]), human_bytes(r["total_bytes"]),
                      f"{r['total_bytes'] / now:.3g}x", note)
    console.print(table)
    return info
