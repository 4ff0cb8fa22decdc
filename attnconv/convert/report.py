"""What `convert` prints: the plan of a dry run, and a summary when done."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attnconv.convert.info import human_bytes
from attnconv.convert.ops import OPS
from attnconv.convert.plan import Plan


def plan_summary(plan: Plan) -> dict:
    return {
        "source": str(plan.source), "family": plan.family.name, "method": plan.method.name,
        "heads": plan.layout_in.n_heads, "kv_heads_before": plan.layout_in.n_kv_heads,
        "kv_heads_after": plan.layout_out.n_kv_heads, "tensors_read": len(plan.reader.tensors),
        "tensors_written": len(plan.steps), "bytes_read": plan.bytes_read, "bytes_written": plan.bytes_written,
        "shards": len(plan.shards()), "files_copied": plan.files_to_copy,
        "kv_bytes_per_token_before": plan.kv_bytes_per_token("before"),
        "kv_bytes_per_token_after": plan.kv_bytes_per_token("after"),
        "ops": dict(Counter(s.op for s in plan.steps)),
    }


def _header(plan: Plan, console: Console) -> None:
    s = plan_summary(plan)
    console.print(f"{s['family']}: {s['heads']} heads, KV heads {s['kv_heads_before']} -> {s['kv_heads_after']} "
                  f"({plan.method.name}); KV cache per token {human_bytes(s['kv_bytes_per_token_before'])} -> "
                  f"{human_bytes(s['kv_bytes_per_token_after'])} "
                  f"({s['kv_bytes_per_token_before'] / s['kv_bytes_per_token_after']:.3g}x smaller)")
    console.print(f"read {s['tensors_read']} tensors ({human_bytes(s['bytes_read'])}), write {s['tensors_written']} "
                  f"in {s['shards']} shard(s) ({human_bytes(s['bytes_written'])}); copy {len(s['files_copied'])} "
                  f"other file(s): {', '.join(s['files_copied']) or '-'}")


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = console or Console()
    console.print("[bold]plan (dry run: nothing is written)[/bold]")
    _header(plan, console)
    table = Table(show_lines=False)
    for col in ("shard", "output tensor", "from", "step", "shape in", "shape out", "dtype"):
        table.add_column(col)
    for step in plan.steps:
        meta = plan.reader.tensors[step.inputs[0]]
        same = step.output == step.inputs[0]
        table.add_row(step.shard, step.output, "" if same else ", ".join(step.inputs), OPS[step.op].help,
                      "x".join(map(str, meta.shape)), "x".join(map(str, step.shape)),
                      str(step.dtype).removeprefix("torch."))
    console.print(table)


def print_result(plan: Plan, out: str | Path, console: Console | None = None) -> None:
    console = console or Console()
    _header(plan, console)
    console.print(f"[green]wrote[/green] {out}  (provenance in {Path(out) / 'attnconv.json'})")
