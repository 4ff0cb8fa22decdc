"""What `convert` prints: the plan of a dry run, and a summary when done."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attnconv.convert.info import human_bytes
from attnconv.convert.ops import OPS
from attnconv.convert.plan import Plan
from attnconv.textdata import CALIBRATION_SPEC


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


def _what(plan: Plan, s: dict) -> str:
    if plan.target is not None:  # MLA, calibrated GQA/MQA: the target says
        return plan.target.describe(s["kv_heads_before"])
    return f"KV heads {s['kv_heads_before']} -> {s['kv_heads_after']} ({plan.method.name})"


def _console(console: Console | None) -> Console:
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: room for the whole table
            console.width = 200
    return console


def _header(plan: Plan, console: Console) -> None:
    s = plan_summary(plan)
    console.print(f"{s['family']}: {s['heads']} heads, {_what(plan, s)}; KV cache per token "
                  f"{human_bytes(s['kv_bytes_per_token_before'])} -> {human_bytes(s['kv_bytes_per_token_after'])} "
                  f"({s['kv_bytes_per_token_before'] / s['kv_bytes_per_token_after']:.3g}x smaller)")
    if plan.target is not None:
        for note in plan.target.notes:
            console.print(f"note: {note}")
        if plan.settings.needs_calibration:
            console.print(_calibration_line(plan))
    console.print(f"read {s['tensors_read']} tensors ({human_bytes(s['bytes_read'])}), write {s['tensors_written']} "
                  f"in {s['shards']} shard(s) ({human_bytes(s['bytes_written'])}); copy {len(s['files_copied'])} "
                  f"other file(s): {', '.join(s['files_copied']) or '-'}")


def _calibration_line(plan: Plan) -> str:
    from attnconv.calibration import estimate_memory

    s = plan.settings
    seq_len = s.calibration_seq_len(plan.layout.config_in)
    memory = estimate_memory(plan.layout.config_in, s.calib_tokens, plan.target.collector_bytes(seq_len),
                             seq_len=seq_len)
    tokens = -(-s.calib_tokens // seq_len) * seq_len
    data = s.calibrate or f"{CALIBRATION_SPEC} (the default; --calibrate DATA to choose)"
    return (f"calibration: {tokens:,} tokens of {data} in sequences of {seq_len}, for "
            f"{', '.join(s.calibration_uses)}, run layer by layer (about {human_bytes(memory)} beside the conversion)")


def print_plan(plan: Plan, console: Console | None = None) -> None:
    console = _console(console)
    console.print("[bold]plan (dry run: nothing is written)[/bold]")
    _header(plan, console)
    table = Table(show_lines=False)
    for col in ("shard", "output tensor", "from", "step", "shape in", "shape out", "dtype"):
        table.add_column(col)
    for step in plan.steps:
        meta = plan.reader.tensors[step.inputs[0]]
        if step.layer is not None:  # one output of a whole layer's attention
            source, shape_in = f"layer {step.layer}'s attention ({len(step.inputs)} tensors)", "-"
        else:
            source = "" if step.output == step.inputs[0] else ", ".join(step.inputs)
            shape_in = "x".join(map(str, meta.shape))
        table.add_row(step.shard, step.output, source, OPS[step.op].help, shape_in, "x".join(map(str, step.shape)),
                      str(step.dtype).removeprefix("torch."))
    console.print(table)


def print_result(plan: Plan, out: str | Path, console: Console | None = None) -> None:
    console = _console(console)
    _header(plan, console)
    console.print(f"[green]wrote[/green] {out}  (provenance in {Path(out) / 'attnconv.json'})")
