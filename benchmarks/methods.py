"""Every GQA/MQA method through `attnconv convert` on the reference model: KL to the source and perplexity.

Converts the shipped MHA reference model (Llama, 8 heads of 32, 6 layers) with each method of the registry
(attnconv/convert/gqa/methods.py) to GQA-4, GQA-2 and MQA through the real convert path (files in, files out; the
calibrated methods calibrate on Tiny Shakespeare train as `--calibrate tinyshakespeare:train` does), then
measures KL(source || converted) and perplexity on Tiny Shakespeare test (windows of 256, stride 128) before any
uptraining; optionally after the same 5% uptraining as benchmarks/gqa_calibrated.py for chosen methods.

    python benchmarks/methods.py [--methods mean,first,grouped,...] [--kv-heads 4,2,1] [--calib-tokens 65536]
        [--uptrain mean,grouped+aligned+fit] [--uptrain-kv 2,1] [--eval-tokens N] [--out benchmarks/results]

Writes OUT/methods.md (the table), OUT/methods.json (with every conversion's attnconv.json) and OUT/methods.png
(KL vs KV-cache bytes per token, one line per method; needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gqa_calibrated import SEQ_LEN, uptrain_and_measure  # noqa: E402  (the shared uptraining setting)
from kl_plot import kl_plot  # noqa: E402

from attnconv.convert.api import convert  # noqa: E402
from attnconv.convert.gqa.methods import parse_method  # noqa: E402
from attnconv.convert.settings import ConvertSettings  # noqa: E402
from attnconv.eval.agreement import agreement  # noqa: E402
from attnconv.eval.perplexity import text_stats, tokenize_corpus  # noqa: E402
from attnconv.reference import REFERENCE_DIR  # noqa: E402
from attnconv.textdata import tinyshakespeare_split  # noqa: E402

DEFAULT_METHODS = "mean,first,grouped,aligned,fit,grouped+fit,aligned+fit,grouped+aligned+fit"


def label(kv: int) -> str:
    return "MQA" if kv == 1 else f"GQA-{kv}"


def plot(results: list[dict], path: Path) -> bool:
    series = {m: [(r["kv_bytes_per_token"] / 1024, r["kl"]) for r in results if r["method"] == m]
              for m in dict.fromkeys(r["method"] for r in results)}
    return kl_plot(series, path, xlabel="KV cache per token (KiB, float32)", log_kl=True,
                   title="Reference model (MHA, 8 heads): starting points before uptraining")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--kv-heads", default="4,2,1")
    ap.add_argument("--calib-tokens", type=int, default=65536, help="calibration tokens (tinyshakespeare:train)")
    ap.add_argument("--uptrain", default="", help="methods to uptrain (5%% of pretraining tokens)")
    ap.add_argument("--uptrain-kv", default="2,1", help="KV-head counts at which --uptrain methods are uptrained")
    ap.add_argument("--eval-tokens", type=int, default=None, help="score only the first N test tokens (default all; "
                    "the same tokens for every method)")
    ap.add_argument("--out", default="benchmarks/results", help="folder for methods.{md,json,png}")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="attnconv-methods-"))
    tok = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    source = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, dtype=torch.float32).eval()
    test = [tinyshakespeare_split("test")]
    test_ids, stats_text = tokenize_corpus(tok, test)[:args.eval_tokens], text_stats(test)  # token ppl and KL only
    up_methods, up_kv = set(args.uptrain.split(",")) - {""}, {int(k) for k in args.uptrain_kv.split(",")}
    results, rows = [], []
    try:
        for kv in map(int, args.kv_heads.split(",")):
            for method in args.methods.split(","):
                folder = work / f"kv{kv}-{method}"
                t = time.perf_counter()
                calibrated = parse_method(method).calibrated  # convert refuses calibration it would not use
                calib = dict(calibrate="tinyshakespeare:train", calib_tokens=args.calib_tokens, calib_seq_len=SEQ_LEN)
                convert(ConvertSettings(str(REFERENCE_DIR), str(folder), to="mqa" if kv == 1 else "gqa",
                                        kv_heads=None if kv == 1 else kv, method=method,
                                        **(calib if calibrated else {})), progress=False)
                t_conv = time.perf_counter() - t
                record = json.loads((folder / "attnconv.json").read_text())["conversion"]
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
                r = agreement(model, source, test_ids, stats_text, max_length=SEQ_LEN, stride=SEQ_LEN // 2)
                entry = {"kv_heads": kv, "method": method, "kl": r.kl, "ppl": r.model.token_perplexity,
                         "source_ppl": r.source.token_perplexity, "top1": r.top1_agreement, "convert_s": t_conv,
                         "kv_bytes_per_token": record["kv_bytes_per_token_after"], "conversion": record}
                if method in up_methods and kv in up_kv:
                    t = time.perf_counter()
                    entry.update(uptrain_and_measure(folder, work / f"up-kv{kv}-{method}", source, test_ids,
                                                     stats_text))
                    entry["uptrain_s"] = time.perf_counter() - t
                    shutil.rmtree(work / f"up-kv{kv}-{method}")
                shutil.rmtree(folder)
                results.append(entry)
                up = f" {entry['kl_up']:.3f} | {entry['ppl_up']:.2f} |" if "kl_up" in entry else " | |"
                rows.append(f"| {label(kv)} | {method} | {entry['kv_bytes_per_token']:,} | {r.kl:.3f} | "
                            f"{r.model.token_perplexity:.2f} | {r.top1_agreement:.3f} | {t_conv:.1f} |{up}")
                print(rows[-1], flush=True)
                write(out, args, results, rows, source)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(write(out, args, results, rows, source))
    if plot(results, out / "methods.png"):
        print(f"plot: {out / 'methods.png'}")


def write(out: Path, args, results: list[dict], rows: list[str], source) -> str:
    """The table so far to OUT/methods.md and the results to OUT/methods.json (after every row: nothing lost)."""
    c = source.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    before = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 4
    head = [f"Reference MHA model (KV cache {before:,} B/token in float32), test perplexity "
            f"{results[0]['source_ppl']:.2f}; converted with `attnconv convert`, calibrated methods on "
            f"{args.calib_tokens:,} tokens of tinyshakespeare:train (sequences of {SEQ_LEN}, attended metric); "
            f"KL(source || converted) and perplexity on {args.eval_tokens or 'all'} tokens of tinyshakespeare:test "
            "(windows of 256, stride 128); uptraining: 71,680 tokens (5% of pretraining), the "
            "benchmarks/gqa_calibrated.py setting.", "",
            "| KV heads | method | KV B/token | KL | ppl | top-1 agreement | convert s | KL, +uptrain | "
            "ppl, +uptrain |", "|---|---|---|---|---|---|---|---|---|"]
    table = "\n".join(head + rows) + "\n"
    (out / "methods.md").write_text(table)
    (out / "methods.json").write_text(json.dumps(results, indent=1) + "\n")
    return table


if __name__ == "__main__":
    main()
