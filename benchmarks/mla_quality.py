"""MLA against GQA at equal KV bytes on the embedded reference model, before and after the same 5% uptraining.

The reference (Llama, MHA, 8 heads of 32, 6 layers) caches 512 values per token and layer. At GQA-2's 128 and
MQA's 64: GQA by mean pooling; MLA in attnconv format (per-KV-head RoPE dims, the budget spent mostly on RoPE
dims, as measured best; from the calibrated GQA-2 / MQA, `--kv-heads`, which is that GQA at its bytes, and at half
MQA's bytes; and from the calibrated GQA-2 with one RoPE key shared by all heads, `--rope-key shared`, at MQA's
bytes and half of them) and in deepseek-v3 format (one shared RoPE key), each with --init pca (+ phases) and
--init svd (weights only). Every model is scored on held-out Tiny Shakespeare against the source (KL, perplexity);
the GQA baselines (mean and the best calibrated, `grouped+aligned+fit`) and the best MLA of each budget are then
uptrained on 5% of the reference's pretraining tokens and scored again. Targets: MLA (pca) beats GQA before and
after uptraining at both budgets, pca beats svd before uptraining, and MLA from the calibrated GQA is at least as
good as that GQA at its bytes, before and after the same uptraining (issue 26).

    python benchmarks/mla_quality.py [--workdir DIR] [--calib-tokens 32768]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conversions import convert_if_absent  # noqa: E402

from attnconv.eval.api import evaluate
from attnconv.eval.settings import EvalSettings
from attnconv.reference import REFERENCE_DIR, load_train_run
from attnconv.uptrain.api import uptrain
from attnconv.uptrain.settings import UptrainSettings

# name -> (values per token and layer, convert settings); attnconv format: kv_rank + 8 KV heads x rope_dim
MODELS = {
    "gqa2 mean": (128, dict(to="gqa", kv_heads=2)),
    "gqa2 grouped+aligned+fit": (128, dict(to="gqa", kv_heads=2, method="grouped+aligned+fit")),
    "mla attnconv 16:14 pca": (128, dict(to="mla", format="attnconv", kv_rank=16, rope_dim=14)),
    "mla attnconv 16:14 svd": (128, dict(to="mla", format="attnconv", kv_rank=16, rope_dim=14, init="svd",
                                         phases=False)),
    "mla deepseek 96:32 pca": (128, dict(to="mla", kv_rank=96, rope_dim=32)),
    "mla deepseek 96:32 svd": (128, dict(to="mla", kv_rank=96, rope_dim=32, init="svd", phases=False)),
    "mla attnconv from gqa2 64:32": (128, dict(to="mla", format="attnconv", kv_rank=64, rope_dim=32, kv_heads=2,
                                               method="grouped+aligned+fit")),
    "mqa mean": (64, dict(to="mqa")),
    "mqa grouped+aligned+fit": (64, dict(to="mqa", method="grouped+aligned+fit")),
    "mla attnconv 16:6 pca": (64, dict(to="mla", format="attnconv", kv_rank=16, rope_dim=6)),
    "mla attnconv 16:6 svd": (64, dict(to="mla", format="attnconv", kv_rank=16, rope_dim=6, init="svd",
                                       phases=False)),
    "mla deepseek 32:32 pca": (64, dict(to="mla", kv_rank=32, rope_dim=32)),
    "mla deepseek 32:32 svd": (64, dict(to="mla", kv_rank=32, rope_dim=32, init="svd", phases=False)),
    "mla attnconv from mqa 32:32": (64, dict(to="mla", format="attnconv", kv_rank=32, rope_dim=32, kv_heads=1,
                                             method="grouped+aligned+fit")),
    "mla attnconv from mqa 16:16": (32, dict(to="mla", format="attnconv", kv_rank=16, rope_dim=16, kv_heads=1,
                                             method="grouped+aligned+fit")),
    "mla attnconv shared from gqa2 32:32": (64, dict(to="mla", format="attnconv", rope_key="shared", kv_rank=32,
                                                     rope_dim=32, kv_heads=2, method="grouped+aligned+fit")),
    "mla attnconv shared from gqa2 16:16": (32, dict(to="mla", format="attnconv", rope_key="shared", kv_rank=16,
                                                     rope_dim=16, kv_heads=2, method="grouped+aligned+fit")),
}
RESULTS = Path(__file__).resolve().parent / "results"
UPTRAIN = ("gqa2 mean", "gqa2 grouped+aligned+fit", "mla attnconv 16:14 pca", "mla attnconv from gqa2 64:32",
           "mqa mean", "mqa grouped+aligned+fit", "mla attnconv 16:6 pca", "mla attnconv from mqa 32:32",
           "mla attnconv shared from gqa2 32:32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--calib-tokens", type=int, default=32768)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="attnconv-mla-quality-"))
    run = load_train_run(REFERENCE_DIR)
    tokens, seq_len = int(run["tokens_seen"] * 0.05), int(run["seq_len"])
    t0 = time.perf_counter()
    folders = {}
    for name, (_, extra) in MODELS.items():
        folders[name] = convert_if_absent(REFERENCE_DIR, work / name.replace(" ", "-").replace(":", "x"), extra,
                                          calibrate="tinyshakespeare:train", calib_tokens=args.calib_tokens,
                                          calib_seq_len=seq_len)
    for name in UPTRAIN:
        out = work / f"{folders[name].name}-up"
        if not out.exists():
            uptrain(UptrainSettings(str(folders[name]), str(out), data="tinyshakespeare:train", tokens=tokens,
                                    seq_len=seq_len, batch_size=8, lr=float(run["lr_schedule"]["peak_lr"]) / 3,
                                    warmup=5, seed=0, quiet=True))
        folders[f"{name} + 5% uptraining"] = out
    results = evaluate(EvalSettings(tuple(str(p) for p in folders.values()), data="tinyshakespeare:test",
                                    max_length=seq_len, stride=seq_len // 2, reference=str(REFERENCE_DIR),
                                    quiet=True)).to_dict()
    rows = {r["name"]: r for r in results["models"]}
    print(f"\n{'model':<42} {'values/layer':>12} {'KL to source':>12} {'ppl':>8}")
    table = {}
    for name, path in folders.items():
        r = rows[str(path)]
        values = MODELS[name.split(" + ")[0]][0]
        table[name] = {"values_per_layer": values, "kl": r["kl"], "ppl": r["token_perplexity"]}
        print(f"{name:<42} {values:>12} {r['kl']:>12.4f} {r['token_perplexity']:>8.1f}")
    print(f"\nsource ppl {rows[str(REFERENCE_DIR)]['token_perplexity']:.1f}; {time.perf_counter() - t0:.0f} s in all")
    (work / "mla_quality.json").write_text(json.dumps(table, indent=1))
    lines = [f"# Reference model: MLA against GQA at equal KV bytes (source perplexity "
             f"{rows[str(REFERENCE_DIR)]['token_perplexity']:.1f}; held-out Tiny Shakespeare)", "",
             "| model | values / token / layer | KL to source | perplexity |", "|---|---|---|---|"]
    lines += [f"| {n} | {r['values_per_layer']} | {r['kl']:.4f} | {r['ppl']:.1f} |" for n, r in table.items()]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mla_quality.md").write_text("\n".join(lines) + "\n")
    print(f"written {work / 'mla_quality.json'} and {RESULTS / 'mla_quality.md'}")


if __name__ == "__main__":
    main()
