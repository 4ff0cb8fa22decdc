"""Evaluation reports: a rich table in the terminal, results.json, results.md and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

AGREEMENT_KEYS = ("kl", "top1_agreement", "ppl_ratio")


def _fmt(v, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, int):
        return f"{v:,}"
    return format(v, spec)


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.3g}"


def finite_or_none(value: Any) -> Any:
    """NaN and infinities as None, recursively: results.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def model_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the per-model table (shared by the terminal and markdown)."""
    with_ref = any("kl" in m for m in results["models"])
    with_ppl = any("token_perplexity" in m for m in results["models"])
    header = (["model", "architecture", "heads", "kv heads", "KV B/token", "params"]
              + (["token ppl", "word ppl", "byte ppl", "bits/byte"] if with_ppl else [])
              + (["KL(src||model)", "top-1 agree", "ppl ratio"] if with_ref else []))
    rows = []
    for m in results["models"]:
        name = m["name"] + (" (reference)" if m.get("is_reference") else "")
        row = [name, m["architecture"], _fmt(m["n_heads"]), _fmt(m["n_kv_heads"]), _fmt(m["kv_bytes_per_token"]),
               f"{m['params'] / 1e6:.2f}M"]
        if with_ppl:
            row += [_fmt(m.get("token_perplexity")), _fmt(m.get("word_perplexity")), _fmt(m.get("byte_perplexity")),
                    _fmt(m.get("bits_per_byte"))]
        if with_ref:
            row += [_fmt(m.get("kl")), _fmt(m.get("top1_agreement")), _fmt(m.get("ppl_ratio"))]
        rows.append(row)
    return header, rows


def _spread(r: dict) -> str:
    low, high = r.get("tokens_per_s_min"), r.get("tokens_per_s_max")
    if low is None or high is None or r.get("runs", 1) < 2:
        return "-"
    return f"{low:.0f}-{high:.0f}"


def decode_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "impl", "batch", "context", "prefill s", "tokens/s", "spread", "ms/token", "KV MiB (theory)",
              "KV MiB (measured)", "peak MiB", "roofline tok/s", "of roofline"]
    rows = []
    for name, bench in results.get("decode", {}).items():
        for r in bench.get("rows", []):
            frac = r.get("bandwidth_fraction")
            rows.append([name, str(r["impl"]), _fmt(r["batch"]), _fmt(r["context"]), _fmt(r["prefill_s"], ".3f"),
                         _fmt(r["tokens_per_s"], ".1f"), _spread(r), _fmt(r["ms_per_token"], ".2f"),
                         _mib(r.get("kv_bytes_theoretical")), _mib(r.get("kv_bytes_measured")),
                         _mib(r.get("peak_mem_bytes")), _fmt(r.get("roofline_tokens_per_s"), ".1f"),
                         "-" if frac is None else f"{frac:.0%}"])
    return header, rows


def summary_line(results: dict) -> str:
    counts = sorted({m["n_tokens"] for m in results["models"] if "n_tokens" in m})
    if not counts:
        return "decode speed only (no perplexity)"
    tokens = f"{counts[0]:,}" if len(counts) == 1 else "/".join(f"{c:,}" for c in counts)
    return (f"data {results['data']}: {results['n_documents']} document(s), {tokens} scored tokens, "
            f"{results['n_words']:,} words, {results['n_bytes']:,} bytes; windows L={results['max_length']} "
            f"S={results['stride']}")


def _task_scores(results: dict) -> dict[str, dict]:
    return {m["name"]: {"harness": results.get("tasks_harness"), "limit": results.get("tasks_limit"),
                        "num_fewshot": results.get("tasks_num_fewshot"), "tasks": m["tasks"]}
            for m in results["models"] if "tasks" in m}


def _table(title: str, header: list[str], rows: list[list[str]], caption: str | None = None) -> Table:
    """A terminal table: the first two columns are names, the rest numbers."""
    table = Table(title=title, caption=caption)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*r)
    return table


def print_table(results: dict, console: Console) -> None:
    console.print(_table("attnconv eval", *model_rows(results), caption=summary_line(results)))
    if any("tasks" in m for m in results["models"]):
        from attnconv.eval.tasks import task_rows

        console.print(_table("downstream tasks (lm-evaluation-harness)", *task_rows(_task_scores(results))))
    dheader, drows = decode_rows(results)
    if drows:
        console.print(_table("decode speed", dheader, drows))
        for name, bench in results["decode"].items():
            for note in bench.get("notes", []):
                console.print(f"note ({name}): {note}")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [line(header), "|" + "|".join("---" for _ in header) + "|"] + [line(r) for r in rows]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    parts = ["# attnconv eval", "", summary_line(results) + ".", "",
             "Token perplexity is exp(total NLL / scored tokens) over strided windows (Hugging Face perplexity "
             "guide); word/byte perplexity and bits per byte follow lm-evaluation-harness, counted on the "
             "original text.", "", _md_table(*model_rows(results)), ""]
    dheader, drows = decode_rows(results)
    if drows:
        parts += ["## Decode speed", "", _md_table(dheader, drows), ""]
        for name, bench in results["decode"].items():
            parts += [f"- {name}: {note}" for note in bench.get("notes", [])]
    if any("tasks" in m for m in results["models"]):
        from attnconv.eval.tasks import tasks_markdown

        parts += [tasks_markdown(_task_scores(results))]
    if results.get("notes"):
        parts += ["## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(parts).rstrip() + "\n"


def plot_perplexity_vs_kv(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    same_tokens = len({m["n_tokens"] for m in models}) == 1
    key, label = ("token_perplexity", "token perplexity") if same_tokens else ("word_perplexity", "word perplexity")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for m in models:
        x, y = m["kv_bytes_per_token"], m[key]
        ax.scatter([x], [y], marker="*" if m.get("is_reference") else "o", s=70)
        ax.annotate(Path(m["name"]).name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("KV-cache bytes per token")
    ax.set_ylabel(label)
    ax.set_title(f"{label} vs KV cache\n{Path(results['data']).name}, L={results['max_length']}, "
                 f"S={results['stride']}", fontsize=10)
    ax.margins(0.15)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_decode(results: dict, path: Path) -> None:
    """Decode speed vs context, one column per batch size: attnconv's loop, one line per model (top), and its
    speed-up over the faster generate() cache at each point (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, r) for name, bench in results["decode"].items() for r in bench.get("rows", [])]
    batches = sorted({r["batch"] for _, r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(5.2 * len(batches), 7.2), squeeze=False, sharex="col")
    for col, batch in enumerate(batches):
        speed, gain = axes[0][col], axes[1][col]
        for i, name in enumerate(results["decode"]):
            mine = {r["context"]: r for n, r in rows if n == name and r["batch"] == batch and r["impl"] == "attnconv"}
            best = {}
            for n, r in rows:
                if n == name and r["batch"] == batch and r["impl"] != "attnconv":
                    best[r["context"]] = max(best.get(r["context"], 0.0), r["tokens_per_s"])
            contexts = sorted(mine)
            if not contexts:
                continue
            label, color = Path(name).name, f"C{i % 10}"
            speed.errorbar(contexts, [mine[c]["tokens_per_s"] for c in contexts], marker="o", color=color, label=label,
                           yerr=[[mine[c]["tokens_per_s"] - mine[c].get("tokens_per_s_min", mine[c]["tokens_per_s"])
                                  for c in contexts],
                                 [mine[c].get("tokens_per_s_max", mine[c]["tokens_per_s"]) - mine[c]["tokens_per_s"]
                                  for c in contexts]], capsize=3)
            shared = [c for c in contexts if best.get(c)]
            if shared:
                gain.plot(shared, [mine[c]["tokens_per_s"] / best[c] for c in shared], marker="o", color=color,
                          label=label)
        speed.set_title(f"batch {batch}")
        speed.set_ylabel("decode tokens/s (attnconv loop)")
        gain.set_ylabel("speed-up over best generate()")
        gain.axhline(1.0, color="grey", linewidth=0.8)
        gain.set_xlabel("context length (tokens)")
        for ax in (speed, gain):
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, max(1, len(labels))), fontsize=8)
    fig.suptitle("decode speed vs context (median of the timed runs; bars: fastest and slowest)")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict, folder: Path) -> list[Path]:
    """results.json, results.md, perplexity_vs_kv.png and, with decode rows, decode_tokens_per_s.png."""
    folder = Path(folder)
    written = [folder / "results.json", folder / "results.md", folder / "perplexity_vs_kv.png"]
    written[0].write_text(json.dumps(finite_or_none(results), indent=2, default=str, allow_nan=False) + "\n",
                          encoding="utf-8")
    written[1].write_text(markdown(results), encoding="utf-8")
    if any("token_perplexity" in m for m in results["models"]):
        plot_perplexity_vs_kv(results, written[2])
    else:
        written.pop()
    if any(b.get("rows") for b in results.get("decode", {}).values()):
        written.append(folder / "decode_tokens_per_s.png")
        plot_decode(results, written[-1])
    return written
