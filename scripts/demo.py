"""`make demo`: run recipes/demo.yaml through the library, then print the side-by-side table.

The recipe converts the embedded reference MHA model to GQA (2 KV heads) and MQA by mean pooling and to MLA at the
same KV bytes, uptrains each for 5% of the reference's pretraining tokens and evaluates all of them on the held-out
text against the source;
this script adds the narrow summaries: quality (perplexity before and after uptraining, KL to the source, KV bytes
per token) and decode speed per architecture (median of the timed runs, with the slowest and fastest). The
report (results.json, results.md, PNG plots) is in demo-out/report.

Finished stages are reused on a second run (`attnconv run` keeps their fingerprints beside the recipe); a stage
whose settings changed is redone with everything after it, replacing what the recipe wrote before.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from attnconv.errors import AttnconvError
from attnconv.recipes import RecipeError, run_recipe

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"


def label(path: str) -> str:
    """demo-out/gqa2-uptrained -> 'gqa2 + uptrain'."""
    name = Path(path).name
    return name.removesuffix("-uptrained") + " + uptrain" if name.endswith("-uptrained") else name


def main() -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from", dest="from_stage", metavar="STAGE",
                    help="rerun this stage of the recipe and the later ones")
    ap.add_argument("--dry-run", action="store_true", help="print which stages would run or be reused, and why")
    args = ap.parse_args()
    run = run_recipe(RECIPE, args.from_stage, args.dry_run)
    if args.dry_run:
        return None
    ev = next(s for s in run.recipe.stages if s.command == "eval").settings
    report = Path(ev.out)
    results = json.loads((report / "results.json").read_text(encoding="utf-8"))
    models = {"mha (source)": ev.reference, **{label(p): p for p in ev.models}}
    console = Console()
    console.print(summary_table(models, results))
    console.print(decode_table(models, results))
    console.print(f"full report: {report}/results.md, results.json, perplexity_vs_kv.png, decode_tokens_per_s.png")
    return results


def summary_table(models: dict[str, str], results: dict) -> Table:
    """The side-by-side table, narrow enough for an 80-column log."""
    table = Table(title="attnconv demo: reference MHA model -> GQA-2 / MQA / MLA at their KV bytes (held-out Tiny "
                        "Shakespeare)")
    for col in ("model", "KV heads", "KV B/tok", "ppl", "KL to src", "top-1"):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = {r["name"]: r for r in results["models"]}
    for name, path in models.items():
        r = rows[path]
        latent = r["architecture"].endswith("MLAForCausalLM") or r["architecture"].startswith("DeepseekV3")
        table.add_row(name, "latent" if latent else str(r["n_kv_heads"]), f"{r['kv_bytes_per_token']:,}",
                      f"{r['token_perplexity']:.1f}", f"{r['kl']:.3f}", f"{r['top1_agreement']:.3f}")
    return table


NOISY = 0.5  # runs spread over more than half the median: another process shared the cores, no result to show


def decode_table(models: dict[str, str], results: dict) -> Table:
    """Decode tokens/s of attnconv's loop at batch 8 and the largest context, once per architecture (an uptrained
    model decodes like its converted one): the median of the timed runs, with the slowest and fastest; where the
    runs spread over more than NOISY of the median, the machine was busy and the median says nothing."""
    table = Table(title="decode tokens/s, batch 8 (median of the timed runs; slowest-fastest)")
    for col in ("architecture", "KV B/tok", "context", "tokens/s", "spread"):
        table.add_column(col, justify="left" if col == "architecture" else "right")
    rows = {r["name"]: r for r in results["models"]}
    for name, path in models.items():
        dec = [d for d in results.get("decode", {}).get(path, {}).get("rows", [])
               if d["impl"] == "attnconv" and d["batch"] == 8]
        if not dec or name.endswith("+ uptrain"):
            continue
        d = max(dec, key=lambda d: d["context"])
        low, high = d.get("tokens_per_s_min", d["tokens_per_s"]), d.get("tokens_per_s_max", d["tokens_per_s"])
        median = f"{d['tokens_per_s']:.0f}" if high - low <= NOISY * d["tokens_per_s"] else "busy machine"
        table.add_row(name, f"{rows[path]['kv_bytes_per_token']:,}", str(d["context"]), median,
                      f"{low:.0f}-{high:.0f}")
    return table


if __name__ == "__main__":
    try:
        main()
    except RecipeError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    except AttnconvError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
