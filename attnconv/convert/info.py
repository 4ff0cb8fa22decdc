"""`attnconv info`: a model's attention shape and what its KV cache costs, as is and for every group count."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from attnconv.convert.settings import InfoSettings
from attnconv.dtypes import dtype_bytes
from attnconv.engines import ENGINES
from attnconv.errors import AttnconvError
from attnconv.families import cache_shape, family_of
from attnconv.loading import check_layers, load_config, read_config, resolve_source, weight_files
from attnconv.model_shape import CacheShape, max_positions


@dataclass
class ModelInfo:
    path: Path
    architecture: str
    model_type: str
    shape: CacheShape
    parameters: int
    checkpoint_dtype: str
    max_positions: int | None
    config: Any = None  # transformers' config


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def model_info(model: str | Path) -> ModelInfo:
    """Read config.json and the weight headers (no tensor is loaded, no pickle is opened)."""
    from attnconv.tensor_io import CheckpointReader

    folder = resolve_source(model, allow_pickle=True)  # pickles are only listed here, never loaded
    raw = read_config(folder)
    config = load_config(folder)
    files, fmt = weight_files(folder, allow_pickle=True)
    if fmt == "safetensors":
        tensors = CheckpointReader(files, fmt).tensors
        check_layers(raw, list(tensors), folder.path)
        params = sum(m.nbytes // m.dtype.itemsize for m in tensors.values())
        dtypes = sorted({str(m.dtype).removeprefix("torch.") for m in tensors.values()})
    else:  # never unpickle just to count
        params, dtypes = 0, [str(raw.get("dtype") or raw.get("torch_dtype") or "unknown")]
    return ModelInfo(folder.path, ", ".join(raw.get("architectures") or ["?"]), raw["model_type"],
                     cache_shape(config), params, "/".join(dtypes), max_positions(config), config)


def kv_table_rows(shape: CacheShape, batch: int, context: int, nbytes: int, kv_rank: int | None = None,
                  rope_dim: int | None = None) -> list[dict]:
    """One row per KV-head count that divides the query heads (the current one marked). For an MLA model its own
    latent row comes first, the K/V rows of its value head size beside it for comparison. With `kv_rank`, the two
    MLA forms a conversion could reach: a latent of kv_rank values plus one shared RoPE key of rope_dim (DeepSeek-V3),
    or plus rope_dim per KV head (attnconv's format)."""
    rows = [{"kind": "MLA", "kv_heads": "latent", "current": True, "reachable": True,
             "bytes_per_token": shape.bytes_per_token(nbytes), "total_bytes": shape.bytes(batch, context, nbytes)}
            ] if shape.latent else []
    for n_kv in [d for d in range(shape.n_heads, 0, -1) if shape.n_heads % d == 0]:
        s = CacheShape(shape.layers, shape.n_heads, n_kv, shape.head_dim, 2 * n_kv * shape.head_dim)
        kind = "MHA" if n_kv == shape.n_heads else "MQA" if n_kv == 1 else f"GQA-{n_kv}"
        rows.append({"kind": kind, "kv_heads": n_kv, "current": not shape.latent and n_kv == shape.n_kv_heads,
                     "reachable": not shape.latent and n_kv <= shape.n_kv_heads and shape.n_kv_heads % n_kv == 0,
                     "bytes_per_token": s.bytes_per_token(nbytes), "total_bytes": s.bytes(batch, context, nbytes)})
    if kv_rank is not None:
        d_r = shape.head_dim // 2 if rope_dim is None else rope_dim
        for kind, values in ((f"MLA r={kv_rank} + shared RoPE {d_r}", kv_rank + d_r),
                             (f"MLA r={kv_rank} + {shape.n_kv_heads} x RoPE {d_r}", kv_rank + shape.n_kv_heads * d_r)):
            s = CacheShape(shape.layers, shape.n_heads, shape.n_kv_heads, shape.head_dim, values)
            rows.append({"kind": kind, "kv_heads": "latent", "current": False, "reachable": True,
                         "bytes_per_token": s.bytes_per_token(nbytes), "total_bytes": s.bytes(batch, context, nbytes)})
    return rows


def _check_mla_rows(info: ModelInfo, settings: InfoSettings) -> None:
    """--kv-rank shows what `convert --to mla` would reach: only for a model it converts, with a RoPE size its
    heads have."""
    family = family_of(info.config)
    if family is None or not family.source or family.rope == "none":
        what = "is MLA already" if info.shape.latent else "has no RoPE attention that --to mla converts"
        raise AttnconvError(f"--kv-rank shows the cache `convert --to mla` would reach; {info.model_type} {what}")
    if settings.rope_dim is not None:
        from attnconv.convert.attention_weights import shape_of
        from attnconv.convert.mla.rope import check_rope_dim

        check_rope_dim(settings.rope_dim, shape_of(info.config))


def print_info(settings: InfoSettings, console: Console | None = None) -> ModelInfo:
    console = console or Console()
    info = model_info(settings.model)
    nbytes = dtype_bytes(settings.dtype)
    batch, context = settings.batch, settings.context or info.max_positions or 4096
    s = info.shape
    console.print(f"[bold]{info.path}[/bold]  {info.architecture} ({info.model_type})")
    params = f"{info.parameters:,}" if info.parameters else "?"
    cached = (f"MLA latent + RoPE keys {s.values_per_layer:g} values per token and layer" if s.latent
              else f"KV heads {s.n_kv_heads}  head_dim {s.head_dim}")
    console.print(f"layers {s.layers}  heads {s.n_heads}  {cached}  parameters {params}  "
                  f"checkpoint dtype {info.checkpoint_dtype}")
    table = Table(title=f"KV cache, batch {batch} x context {context}, {settings.dtype} "
                        "(layers x batch x context x values per token and layer x bytes)")
    for col in ("attention", "KV heads", "per token", "total", "vs now", ""):
        table.add_column(col, justify="right" if col not in ("attention", "") else "left")
    if settings.kv_rank is not None:
        _check_mla_rows(info, settings)
    rows = kv_table_rows(s, batch, context, nbytes, settings.kv_rank, settings.rope_dim)
    now = next((r["total_bytes"] for r in rows if r["current"]), s.bytes(batch, context, nbytes))
    for r in rows:
        note = ("this model" if r["current"] else "for comparison" if s.latent
                else "" if r["reachable"] else "needs more KV heads than it has")
        table.add_row(r["kind"], str(r["kv_heads"]), human_bytes(r["bytes_per_token"]), human_bytes(r["total_bytes"]),
                      f"{r['total_bytes'] / now:.3g}x", note)
    console.print(table)
    if settings.kv_rank is not None:
        console.print(engines_line(settings.kv_rank, settings.rope_dim or s.head_dim // 2, s.head_dim))
    return info


def engines_line(kv_rank: int, rope_dim: int, nope_dim: int) -> str:
    """Which serving engines run a DeepSeek-V3 MLA of this latent and RoPE key (attnconv/engines.py), and why
    the others do not."""
    problems = {e.name: e.setting_problem(kv_rank, rope_dim, nope_dim) for e in ENGINES.values()}
    served = [name for name, p in problems.items() if p is None]
    line = (f"DeepSeek-V3 MLA r={kv_rank} + shared RoPE {rope_dim}: served by: {', '.join(served) or 'none'}")
    others = "; ".join(p for p in problems.values() if p is not None)
    return line + (f". Not by: {others}" if others else "")
