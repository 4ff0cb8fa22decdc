"""Evaluation reports: a rich table in the terminal, results.json, results.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

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


def model_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the per-model table (shared by the terminal and markdown)."""
    with_ref = any("kl" in m for m in results["models"])
    header = ["model", "architecture", "heads", "kv heads", "KV B/token", "params", "token ppl", "word ppl",
              "byte ppl", "bits/byte"] + (["KL(src||model)", "top-1 agree", "ppl ratio"] if with_ref else [])
    rows = []
    for m in results["models"]:
        name = m["name"] + (" (reference)" if m.get("is_reference") else "")
        row = [name, m["architecture"], _fmt(m["n_heads"]), _fmt(m["n_kv_heads"]), _fmt(m["kv_bytes_per_token"]),
               f"{m['params'] / 1e6:.2f}M", _fmt(m["token_perplexity"]), _fmt(m["word_perplexity"]),
               _fmt(m["byte_perplexity"]), _fmt(m["bits_per_byte"])]
        if with_ref:
            row += [_fmt(m.get("kl")), _fmt(m.get("top1_agreement")), _fmt(m.get("ppl_ratio"))]
        rows.append(row)
    return header, rows


def decode_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "impl", "batch", "context", "prefill s", "tokens/s", "ms/token", "KV MiB (theory)",
              "KV MiB (measured)", "peak MiB", "roofline tok/s", "of roofline"]
    rows = []
    for name, bench in results.get("decode", {}).items():
        for r in bench.get("rows", []):
            frac = r.get("bandwidth_fraction")
            rows.append([name, str(r["impl"]), _fmt(r["batch"]), _fmt(r["context"]), _fmt(r["prefill_s"], ".3f"),
                         _fmt(r["tokens_per_s"], ".1f"), _fmt(r["ms_per_token"], ".2f"),
                         _mib(r.get("kv_bytes_theoretical")), _mib(r.get("kv_bytes_measured")),
                         _mib(r.get("peak_mem_bytes")), _fmt(r.get("roofline_tokens_per_s"), ".1f"),
                         "-" if frac is None else f"{frac:.0%}"])
    return header, rows


def summary_line(results: dict) -> str:
    counts = sorted({m["n_tokens"] for m in results["models"]})
    tokens = f"{counts[0]:,}" if len(counts) == 1 else "/".join(f"{c:,}" for c in counts)
    return (f"data {results['data']}: {results['n_documents']} document(s), {tokens} scored tokens, "
            f"{results['n_words']:,} words, {results['n_bytes']:,} bytes; windows L={results['max_length']} "
            f"S={results['stride']}")


def print_table(results: dict, console: Console) -> None:
    table = Table(title="attnconv eval", caption=summary_line(results))
    header, rows = model_rows(results)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for r in rows:
        table.add_row(*r)
    console.print(table)
    dheader, drows = decode_rows(results)
    if drows:
        dtable = Table(title="decode speed")
        for i, h in enumerate(dheader):
            dtable.add_column(h, justify="left" if i < 2 else "right")
        for r in drows:
            dtable.add_row(*r)
        console.print(dtable)
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
    """Tokens/s vs context: one panel per batch size, a colour per model, a line style per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, r) for name, bench in results["decode"].items() for r in bench.get("rows", [])]
    batches = sorted({r["batch"] for _, r in rows})
    impls = list(dict.fromkeys(r["impl"] for _, r in rows))
    colors = {name: f"C{i % 10}" for i, name in enumerate(results["decode"])}
    styles = {impl: ("-", "--", ":", "-.")[i % 4] for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(1, len(batches), figsize=(5.2 * len(batches), 4.4), squeeze=False)
    for ax, batch in zip(axes[0], batches, strict=True):
        for name in results["decode"]:
            for impl in impls:
                points = sorted((r["context"], r["tokens_per_s"]) for n, r in rows
                                if n == name and r["impl"] == impl and r["batch"] == batch)
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[name],
                            linestyle=styles[impl], label=f"{Path(name).name} · {impl}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"batch {batch}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("decode speed vs context")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(results: dict, folder: Path) -> list[Path]:
    """results.json, results.md, perplexity_vs_kv.png and, with decode rows, decode_tokens_per_s.png."""
    folder = Path(folder)
    written = [folder / "results.json", folder / "results.md", folder / "perplexity_vs_kv.png"]
    written[0].write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    written[1].write_text(markdown(results), encoding="utf-8")
    plot_perplexity_vs_kv(results, written[2])
    if any(b.get("rows") for b in results.get("decode", {}).values()):
        written.append(folder / "decode_tokens_per_s.png")
        plot_decode(results, written[-1])
    return written
