"""Calibrated GQA/MQA starting points on the reference model: KL to the source and perplexity before uptraining.

Calibrates on Tiny Shakespeare train (the second moment of every layer's attention input), converts the embedded
MHA reference model (8 heads) to GQA-4, GQA-2 and MQA with each method, and measures KL(source || converted)
and perplexity on Tiny Shakespeare test (windows of 256, stride 128). Optionally uptrains chosen conversions on
5% of the reference's pretraining tokens and measures again.

    python benchmarks/gqa_calibrated.py [--methods mean,fit,...] [--kv-heads 4,2,1] [--tokens 65536]
        [--ridge 1e-3] [--metric input|attended] [--uptrain mean,grouped+fit] [--work DIR]

--metric attended calibrates the key/value metric on the attention each token receives as a key
(AttendedMomentCollector) instead of the plain input second moment.

Prints a markdown table and writes it, with every conversion record, to WORK/gqa_calibrated.{md,json}.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from attnconv.convert.gqa.calibrated import convert_layer
from attnconv.convert.gqa.calibration import InputMomentCollector, attended_collectors, collect_with_hooks
from attnconv.convert.gqa.methods import parse_method
from attnconv.convert.gqa.pool import convert_kv_proj
from attnconv.convert.gqa.state_dict import attention_layers, with_attention_layers
from attnconv.eval.agreement import agreement
from attnconv.eval.perplexity import text_stats, tokenize_corpus
from attnconv.model_shape import HeadLayout
from attnconv.reference import REFERENCE_DIR
from attnconv.textdata import tinyshakespeare_split

DEFAULT_METHODS = "mean,first,grouped,aligned,fit,grouped+aligned,grouped+fit,grouped+aligned+fit"
SEQ_LEN = 256


def calibration_batches(ids: torch.Tensor, tokens: int, batch_size: int = 16):
    """Windows of SEQ_LEN spread evenly over the stream, tokens // SEQ_LEN of them."""
    n = max(1, tokens // SEQ_LEN)
    starts = torch.linspace(0, len(ids) - SEQ_LEN - 1, n).long()
    windows = torch.stack([ids[s:s + SEQ_LEN] for s in starts])
    return list(windows.split(batch_size))


def convert_model(source, stats, kv_heads: int, method: str, ridge: float):
    """The converted model (in memory) and its per-layer records; stats: per layer (S, A or None)."""
    sd, config = source.state_dict(), source.config
    layers = attention_layers(sd, config)
    if method in ("first", "random"):  # gqa/pool.py's uncalibrated methods, for the table
        layout = HeadLayout(config.num_attention_heads, config.num_key_value_heads, layers[0].head_dim,
                            config.hidden_size, config.num_hidden_layers)
        new = [replace(layer, k=convert_kv_proj(layer.k, layout, kv_heads, parse_method(method)),
                       v=convert_kv_proj(layer.v, layout, kv_heads, parse_method(method)),
                       shape=replace(layer.shape, n_kv_heads=kv_heads))
               for layer in layers]
        records = [{"methods": [method]}] * len(layers)
    else:
        out = [convert_layer(layer, s, kv_heads, method, attended_moment=a, ridge=ridge)
               for layer, (s, a) in zip(layers, stats, strict=True)]
        new, records = [layer for layer, _ in out], [r for _, r in out]
    config = copy.deepcopy(config)
    config.num_key_value_heads = kv_heads
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.load_state_dict(with_attention_layers(sd, new))
    return model, records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--kv-heads", default="4,2,1")
    ap.add_argument("--tokens", type=int, default=65536, help="calibration tokens (tinyshakespeare:train)")
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--metric", choices=("input", "attended"), default="input")
    ap.add_argument("--uptrain", default="", help="methods to uptrain (5%% of pretraining) at GQA-2 and MQA")
    ap.add_argument("--work", default=None, help="folder for results and uptrained models (default: a temp dir)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="gqa-calibrated-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(REFERENCE_DIR)
    source = AutoModelForCausalLM.from_pretrained(REFERENCE_DIR, dtype=torch.float32).eval()
    test = [tinyshakespeare_split("test")]
    test_ids, stats_text = tokenize_corpus(tok, test), text_stats(test)
    train_ids = tokenize_corpus(tok, [tinyshakespeare_split("train")])
    t0 = time.perf_counter()
    hidden = source.config.hidden_size
    make = attended_collectors(source) if args.metric == "attended" else lambda i: InputMomentCollector(hidden)
    collectors = collect_with_hooks(source, calibration_batches(train_ids, args.tokens), make)
    stats = [c.result() if args.metric == "attended" else (c.result(), None) for c in collectors]
    n_tokens = (collectors[0].moments if args.metric == "attended" else collectors[0]).n_tokens
    print(f"calibration: {n_tokens} tokens in {time.perf_counter() - t0:.1f} s", flush=True)
    rows, results = [], []
    for kv in map(int, args.kv_heads.split(",")):
        for method in args.methods.split(","):
            t = time.perf_counter()
            model, records = convert_model(source, stats, kv, method, args.ridge)
            t_conv = time.perf_counter() - t
            r = agreement(model, source, test_ids, stats_text, max_length=SEQ_LEN, stride=SEQ_LEN // 2)
            entry = {"kv_heads": kv, "method": method, "kl": r.kl, "ppl": r.model.token_perplexity,
                     "source_ppl": r.source.token_perplexity, "convert_s": t_conv, "records": records}
            if method in args.uptrain.split(",") and kv in (2, 1):
                entry.update(uptrained(model, source, test_ids, stats_text, work / f"kv{kv}-{method}"))
            results.append(entry)
            up = f" | {entry['kl_up']:.3f} | {entry['ppl_up']:.2f}" if "kl_up" in entry else " | | "
            rows.append(f"| {'MQA' if kv == 1 else f'GQA-{kv}'} | {method} | {r.kl:.3f} | "
                        f"{r.model.token_perplexity:.2f}{up} |")
            print(rows[-1], f"({t_conv:.1f} s to convert)", flush=True)
    head = [f"Reference MHA model, test perplexity {results[0]['source_ppl']:.2f}; calibration "
            f"{n_tokens} tokens of tinyshakespeare:train, {args.metric} metric, ridge {args.ridge}.", "",
            "| KV heads | method | KL, converted | ppl, converted | KL, +uptrain | ppl, +uptrain |",
            "|---|---|---|---|---|---|"]
    table = "\n".join(head + rows) + "\n"
    print(table)
    (work / "gqa_calibrated.md").write_text(table)
    (work / "gqa_calibrated.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"results in {work}")


def uptrained(model, source, test_ids, stats_text, folder: Path) -> dict:
    """Save, uptrain on 5% of the reference's pretraining tokens (the paper_gqa setting), evaluate."""
    conv = folder / "converted"
    model.save_pretrained(conv)
    AutoTokenizer.from_pretrained(REFERENCE_DIR).save_pretrained(conv)
    return uptrain_and_measure(conv, folder / "uptrained", source, test_ids, stats_text)


def uptrain_and_measure(converted: Path, out: Path, source, test_ids, stats_text) -> dict:
    """Uptrain a converted checkpoint folder on 5% of the reference's pretraining tokens, then KL and ppl."""
    from attnconv.uptrain.api import uptrain
    from attnconv.uptrain.settings import UptrainSettings

    uptrain(UptrainSettings(str(converted), str(out), data="tinyshakespeare:train", tokens=71680, seq_len=SEQ_LEN,
                            batch_size=8, lr=2e-3 / 3, warmup=5, schedule="cosine", dtype="fp32", seed=0, quiet=True))
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    r = agreement(trained, source, test_ids, stats_text, max_length=SEQ_LEN, stride=SEQ_LEN // 2)
    return {"kl_up": r.kl, "ppl_up": r.model.token_perplexity}


if __name__ == "__main__":
    main()
