"""The GQA paper's checkpoint-conversion ablation (Ainslie et al. 2023) at small scale, on the reference model.

For MQA and GQA with 2 and 4 KV heads, convert the embedded MHA reference model with mean pooling, the first
head of each group, and random initialisation; measure held-out perplexity (Tiny Shakespeare, last 10%) and KL to
the source at 0 uptraining and after uptraining on 5% of the reference's pretraining tokens.

    python benchmarks/paper_gqa.py [--work DIR] [--fraction 0.05]

Prints a markdown table and writes it, with the raw results, to WORK/paper_gqa.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console

from attnconv.convert.api import convert
from attnconv.convert.settings import ConvertSettings
from attnconv.eval.api import evaluate
from attnconv.eval.settings import EvalSettings
from attnconv.reference import REFERENCE_DIR, load_train_run
from attnconv.uptrain.api import uptrain
from attnconv.uptrain.settings import UptrainSettings

METHODS = ("mean", "first", "random")
KV_HEADS = (4, 2, 1)
PAPER = ("T5-Large, uplifted with 5% of pretraining: mean pooling > first head > random initialisation; GQA is "
         "usable as converted, MQA needs the uptraining.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="paper-gqa-out")
    ap.add_argument("--fraction", type=float, default=0.05)
    args = ap.parse_args()
    console, work = Console(), Path(args.work)
    work.mkdir(exist_ok=True)
    run = load_train_run(REFERENCE_DIR)
    seq_len, tokens = int(run["seq_len"]), int(run["tokens_seen"] * args.fraction)
    t0 = time.perf_counter()
    grid: dict[tuple[str, int], dict[str, str]] = {}
    for kv in KV_HEADS:
        for method in METHODS:
            name = f"{'mqa' if kv == 1 else f'gqa{kv}'}-{method}"
            conv, up = work / name, work / f"{name}-up"
            if not conv.exists():
                convert(ConvertSettings(REFERENCE_DIR, conv, kv_heads=kv, method=method, seed=0), progress=False)
            if not up.exists():
                uptrain(UptrainSettings(str(conv), str(up), data="tinyshakespeare:train", tokens=tokens,
                                        seq_len=seq_len, batch_size=8, lr=float(run["lr_schedule"]["peak_lr"]) / 3,
                                        warmup=5, seed=0, quiet=True))
            grid[(method, kv)] = {"0": str(conv), "up": str(up)}
    models = [p for cell in grid.values() for p in cell.values()]
    results = evaluate(EvalSettings(models, data="tinyshakespeare:test", max_length=seq_len, stride=seq_len // 2,
                                    reference=str(REFERENCE_DIR), quiet=True), console=console)
    by_name = {r["name"]: r for r in results["models"]}
    source = next(r for r in results["models"] if r.get("is_reference"))
    lines = [f"Reference MHA model: held-out perplexity {source['token_perplexity']:.2f} "
             f"({run['tokens_seen']:,} pretraining tokens; uptraining {tokens:,} tokens = {args.fraction:.0%}).", "",
             "| KV heads | method | ppl, converted | KL, converted | ppl, +uptrain | KL, +uptrain |",
             "|---|---|---|---|---|---|"]
    for (method, kv), cell in grid.items():
        a, b = by_name[cell["0"]], by_name[cell["up"]]
        label = "MQA (1)" if kv == 1 else f"GQA ({kv})"
        lines.append(f"| {label} | {method} | {a['token_perplexity']:.2f} | {a['kl']:.3f} | "
                     f"{b['token_perplexity']:.2f} | {b['kl']:.3f} |")
    lines += ["", f"Paper: {PAPER}", f"Wall time: {time.perf_counter() - t0:.0f} s."]
    table = "\n".join(lines) + "\n"
    console.print(table)
    (work / "paper_gqa.md").write_text(table)
    (work / "paper_gqa.json").write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
