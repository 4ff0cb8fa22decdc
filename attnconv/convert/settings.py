"""The settings of `attnconv convert` and `attnconv info` (see attnconv/settings.py)."""

from __future__ import annotations

from dataclasses import dataclass

from attnconv.convert.methods import METHODS
from attnconv.dtypes import ALIASES, DTYPES
from attnconv.errors import AttnconvError
from attnconv.settings import Settings, option

TARGETS = ("gqa", "mqa")


@dataclass(frozen=True)
class ConvertSettings(Settings):
    command_name = "convert"

    source: str = option(help="Source checkpoint: a local folder (with config.json) or a hub id.", argument=True,
                         io="model")
    out: str | None = option(None, help="Output folder (written to a temporary sibling, renamed when complete).",
                             argument=True, run=False, io="out")
    to: str = option("gqa", help="Target attention: gqa (needs --kv-heads) or mqa (1 KV head).", choices=TARGETS)
    kv_heads: int | None = option(None, help="KV heads to keep; must divide the query and KV heads.", minimum=1)
    method: str = option("mean", help="How each group's K/V heads become one: "
                         + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values()) + ".", choices=tuple(METHODS))
    seed: int = option(0, help="Seed for --method random.", minimum=0)
    dtype: str = option("auto", help="Output dtype; auto keeps the source's. Pooling is computed in float32 either "
                        "way.", choices=("auto", *DTYPES), aliases=ALIASES)
    dry_run: bool = option(False, help="Print the plan (tensors, sizes, KV cache) and exit.", run=False)
    overwrite: bool = option(False, help="Replace OUT if it exists.", run=False)
    allow_pickle: bool = option(False, help="Accept pytorch_model*.bin pickles (read with weights_only=True).")

    def check(self) -> None:
        to, kv = self.label("to"), self.label("kv_heads")
        if self.to == "mqa" and self.kv_heads not in (None, 1):
            raise AttnconvError(f"{to} mqa means one KV head; drop {kv} {self.kv_heads} or use {to} gqa")
        if self.to == "gqa" and self.kv_heads is None:
            raise AttnconvError(f"{to} gqa needs {kv} N (the number of KV heads to keep)")
        if self.out is None and not self.dry_run:
            raise AttnconvError(f"an output folder {self.label('out')} is needed (or pass --dry-run to only print "
                                "the plan)")

    @property
    def target_kv_heads(self) -> int:
        return 1 if self.to == "mqa" else self.kv_heads


@dataclass(frozen=True)
class InfoSettings(Settings):
    command_name = "info"

    model: str = option(help="A model folder or hub id.", argument=True)
    batch: int = option(1, help="Batch size for the KV-cache table.", minimum=1)
    context: int | None = option(None, help="Context length (default: the model's maximum).", minimum=1)
    dtype: str = option("bfloat16", help="Cache dtype for the table.", choices=DTYPES, aliases=ALIASES)
    kv_rank: int | None = option(None, help="Also show MLA's cache for a latent of this many values.", minimum=1)
    rope_dim: int | None = option(None, help="RoPE dims of MLA's key (default head_dim / 2), with --kv-rank.",
                                  minimum=2)
