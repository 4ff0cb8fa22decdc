"""`make demo`: the whole job on the embedded reference model, side by side.

Converts the reference MHA model to GQA (2 KV heads) and MQA by mean pooling, uptrains each for 5% of the
reference's pretraining tokens, evaluates all of them on the held-out text against the source, and prints the
table (perplexity before and after uptraining, KL to the source, KV bytes per token, decode tokens/s); the
report (results.json, results.md, PNG plots) goes to demo-out/report.

Finished stages are reused (a stage's folder only exists once complete); a previous report is kept under a
new name, never overwritten silently.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attnconv.convert.api import convert
from attnconv.convert.settings import ConvertSettings
from attnconv.errors import AttnconvError
from attnconv.eval.settings import EvalSettings
from attnconv.reference import REFERENCE_DIR, load_train_run
from attnconv.uptrain.settings import UptrainSettings

CONVERSIONS = {"gqa2": dict(to="gqa", kv_heads=2), "mqa": dict(to="mqa")}
TRAIN_DATA, HELD_OUT = "tinyshakespeare:train", "tinyshakespeare:test"


def stage(console: Console, name: str, folder: Path, run) -> Path:
    if folder.exists():
        console.print(f"[dim]reusing {folder} ({name} already done)[/dim]")
        return folder
    t0 = time.perf_counter()
    console.print(f"[bold]{name}[/bold] -> {folder}")
    run()
    console.print(f"[dim]  done in {time.perf_counter() - t0:.0f} s[/dim]")
    return folder


def keep_previous_report(console: Console, report: Path) -> None:
    if report.exists():
        stamp = dt.datetime.fromtimestamp(report.stat().st_mtime).strftime("%Y%m%d-%H%M%S")
        kept = report.with_name(f"{report.name}-{stamp}")
        report.rename(kept)
        console.print(f"[yellow]the previous report was moved to {kept}[/yellow]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-out", help="working folder (default demo-out)")
    ap.add_argument("--uptrain-fraction", type=float, default=0.05, help="of the reference's pretraining tokens")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode-speed grid")
    args = ap.parse_args()
    console = Console()
    from attnconv.eval.api import evaluate
    from attnconv.uptrain.api import uptrain

    root = Path(args.out)
    root.mkdir(exist_ok=True)
    run = load_train_run(REFERENCE_DIR)
    up_tokens = int(run["tokens_seen"] * args.uptrain_fraction)
    seq_len = int(run["seq_len"])
    console.print(f"reference model: {REFERENCE_DIR} ({run['tokens_seen']:,} pretraining tokens); uptraining "
                  f"for {args.uptrain_fraction:.0%} = {up_tokens:,} tokens")
    models = {"mha (source)": str(REFERENCE_DIR)}
    for name, kw in CONVERSIONS.items():
        conv = stage(console, f"convert to {name}", root / name,
                     lambda name=name, kw=kw: convert(ConvertSettings(REFERENCE_DIR, root / name, method="mean", **kw)))
        up = stage(console, f"uptrain {name}", root / f"{name}-uptrained",
                   lambda conv=conv, name=name: uptrain(UptrainSettings(
                       str(conv), str(root / f"{name}-uptrained"), data=TRAIN_DATA, tokens=up_tokens, seq_len=seq_len,
                       batch_size=8, lr=float(run["lr_schedule"]["peak_lr"]) / 3, warmup=5, schedule="cosine",
                       dtype="float32", seed=0)))
        models[name] = str(conv)
        models[f"{name} + uptrain"] = str(up)
    report = root / "report"
    keep_previous_report(console, report)
    converted = [p for label, p in models.items() if p != str(REFERENCE_DIR)]  # --reference adds the source
    results = evaluate(EvalSettings(converted, data=HELD_OUT, max_length=seq_len, stride=seq_len // 2,
                                    reference=str(REFERENCE_DIR), decode=not args.no_decode, contexts=(128, 512),
                                    batches=(1, 8), new_tokens=32, out=str(report)), console=console)
    (report / "demo_models.json").write_text(json.dumps(models, indent=2) + "\n")
    console.print(summary_table(models, results))
    console.print(f"full report: {report}/results.md, results.json, perplexity_vs_kv.png, decode_tokens_per_s.png")
    return results


def summary_table(models: dict[str, str], results: dict) -> Table:
    """The side-by-side table, narrow enough for an 80-column log."""
    table = Table(title="attnconv demo: reference MHA model -> GQA-2 / MQA (held-out Tiny Shakespeare)")
    for col in ("model", "KV heads", "KV B/tok", "ppl", "KL to src", "top-1", "tok/s b8"):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = {r["name"]: r for r in results["models"]}
    for label, path in models.items():
        r = rows[path]
        dec = [d for d in results.get("decode", {}).get(path, {}).get("rows", [])
               if d["impl"] == "attnconv" and d["batch"] == 8]
        tps = f"{max(dec, key=lambda d: d['context'])['tokens_per_s']:.0f}" if dec else "-"
        table.add_row(label, str(r["n_kv_heads"]), f"{r['kv_bytes_per_token']:,}", f"{r['token_perplexity']:.1f}",
                      f"{r['kl']:.3f}", f"{r['top1_agreement']:.3f}", tps)
    return table


if __name__ == "__main__":
    try:
        main()
    except AttnconvError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
