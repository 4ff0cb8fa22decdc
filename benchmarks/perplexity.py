"""Perplexity throughput: attnconv's batched sliding windows vs the Hugging Face guide's unbatched loop.

Both score the same tokens of WikiText-2 (test) with the same windows on the same random Llama-like model
(~47M parameters, GPT-2 vocabulary); runs alternate so that load on the machine hits both alike. Prints
tokens/s of each and their ratio (target >= 1.5x), and checks that both give the same perplexity.

    python benchmarks/perplexity.py [--tokens 8192] [--max-length 1024] [--stride 512] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

from attnconv.eval.perplexity import perplexity, text_stats, tokenize_corpus
from attnconv.loading import load_causal_lm, load_tokenizer
from attnconv.testing import build_tiny_model
from attnconv.textdata import load_texts


def guide_loop(model, encodings: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """https://huggingface.co/docs/transformers/perplexity, as written there (exact token count added)."""
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq_len, stride):
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end
        input_ids = encodings[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_loss_tokens = int((target_ids[:, 1:] != -100).sum())
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end = end
        if end == seq_len:
            break
    return nll_sum, n_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--stride", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model("llama", Path(tmp) / "m", with_tokenizer=True, hidden=384, layers=6, n_heads=6,
                                max_positions=args.max_length, init_std=0.02)
        model = load_causal_lm(path, "float32")
        texts = load_texts("wikitext-2-test")
        ids = tokenize_corpus(load_tokenizer(path), texts)[: args.tokens]
    params = sum(p.numel() for p in model.parameters())
    stats = text_stats(texts)  # counts do not matter here; token perplexity is compared
    print(f"model: Llama-like, {params / 1e6:.1f}M params (hidden 384, 6 layers, vocab 50257), fp32, "
          f"{args.threads} threads; {len(ids)} tokens, L={args.max_length} S={args.stride} B={args.batch_size}")

    times: dict[str, list[float]] = {"guide": [], "attnconv": []}
    for _ in range(args.rounds):
        t = time.perf_counter()
        nll_g, n_g = guide_loop(model, ids[None], args.max_length, args.stride)
        times["guide"].append(time.perf_counter() - t)
        t = time.perf_counter()
        res = perplexity(model, ids, stats, max_length=args.max_length, stride=args.stride,
                         batch_size=args.batch_size)
        times["attnconv"].append(time.perf_counter() - t)

    assert n_g == res.n_tokens, (n_g, res.n_tokens)
    ppl_g, ppl_a = math.exp(nll_g / n_g), res.token_perplexity
    print(f"perplexity: guide {ppl_g:.4f}, attnconv {ppl_a:.4f} (rel diff {abs(ppl_a / ppl_g - 1):.1e})")
    tps = {k: res.n_tokens / statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:>9}: {tps[k]:8.1f} scored tokens/s  (runs: {', '.join(f'{s:.2f}s' for s in v)})")
    ratio = tps["attnconv"] / tps["guide"]
    print(f"speedup attnconv / guide: {ratio:.2f}x (target >= 1.5x): {'PASS' if ratio >= 1.5 else 'BELOW TARGET'}")


if __name__ == "__main__":
    main()
