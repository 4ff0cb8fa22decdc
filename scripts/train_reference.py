"""Train attnconv's embedded reference model: a small Llama-architecture MHA causal LM on Tiny Shakespeare.

Reproducible on a CPU: fixed seed, a seeded data order, a step budget (not a wall-clock one), fixed thread count.
The tokenizer (byte-level BPE) and the model see only the first 90% of the text; held-out perplexity is computed
on the last 10% with the Hugging Face guide's strided windows (window L, stride S: each window scores only the
tokens no earlier window scored; the first token of the text is never scored; ppl = exp(sum NLL / n scored)).

    python scripts/train_reference.py                      # writes attnconv/data/reference (needs --overwrite)
    python scripts/train_reference.py --out /tmp/ref --steps 20     # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attnconv.errors import AttnconvError
from attnconv.outputs import atomic_output_dir, check_output_dir
from attnconv.reference import REFERENCE_DIR, TRAIN_RUN_FILE
from attnconv.textdata import TINYSHAKESPEARE, tinyshakespeare_split

EOT = "<|endoftext|>"
NOTICE = """Reference model trained by attnconv's scripts/train_reference.py on Tiny Shakespeare.

Training text: Tiny Shakespeare (1,115,394 characters), from karpathy/char-rnn data/tinyshakespeare
(https://github.com/karpathy/char-rnn). The works of William Shakespeare are in the public domain.
The tokenizer and the model were trained on the first 90% of the text (cut at a line boundary);
the last 10% is held out for evaluation (attnconv.textdata.tinyshakespeare_split).
"""


def train_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE (GPT-2 style, no prefix space, no automatic BOS) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT,
                                   model_max_length=512, clean_up_tokenization_spaces=False)


def model_config(args, tokenizer):
    from transformers import LlamaConfig

    eot = tokenizer.convert_tokens_to_ids(EOT)
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,  # MHA
        head_dim=args.hidden // args.heads, max_position_embeddings=args.max_positions, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=eot, eos_token_id=eot,
        pad_token_id=eot,
    )


def strided_windows(n: int, length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored target index within the window) per window, the HF perplexity guide's loop."""
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        first = max(1, (end - begin) - (end - prev_end))  # target 0 of a window has no context
        windows.append((begin, end, first))
        prev_end = end
        if end == n:
            break
    return windows


@torch.no_grad()
def heldout_nll(model, ids: torch.Tensor, length: int, stride: int, batch_size: int = 16) -> tuple[float, int]:
    """Sum of NLL (nats) and number of scored tokens over strided windows of ids [n]."""
    model.eval()
    windows = strided_windows(len(ids), length, stride)
    total, count = 0.0, 0
    # Windows of equal length are batched; only the last one can be shorter.
    groups: dict[int, list[tuple[int, int, int]]] = {}
    for w in windows:
        groups.setdefault(w[1] - w[0], []).append(w)
    for wlen, ws in groups.items():
        for i in range(0, len(ws), batch_size):
            chunk = ws[i:i + batch_size]
            x = torch.stack([ids[b:e] for b, e, _ in chunk])  # [B, wlen]
            logits = model(input_ids=x).logits.float()  # [B, wlen, V]
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")  # [B, wlen-1]
            pos = torch.arange(1, wlen)  # target index of each nll column
            mask = torch.stack([pos >= first for _, _, first in chunk])  # [B, wlen-1]
            total += nll[mask].double().sum().item()
            count += int(mask.sum())
    return total, count


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def train(args) -> dict:
    import transformers
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import LlamaForCausalLM, get_cosine_schedule_with_warmup

    console = Console(stderr=True)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_text, test_text = tinyshakespeare_split("train"), tinyshakespeare_split("test")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(train_text, args.vocab_size)
    train_ids = torch.tensor(tokenizer(train_text, verbose=False)["input_ids"], dtype=torch.long)  # [n_train]
    test_ids = torch.tensor(tokenizer(test_text, verbose=False)["input_ids"], dtype=torch.long)  # [n_test]
    console.log(f"tokenizer: vocab {len(tokenizer)}, train {len(train_ids)} tokens, held-out {len(test_ids)} tokens "
                f"({time.perf_counter() - t0:.1f}s)")

    config = model_config(args, tokenizer)
    model = LlamaForCausalLM(config)  # initialised under torch.manual_seed(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    console.log(f"model: {n_params / 1e6:.2f}M parameters, {args.layers} layers, {args.heads} heads x "
                f"{config.head_dim}, autocast {args.autocast}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, args.warmup, args.steps)
    data_gen = torch.Generator().manual_seed(args.seed)  # the data order depends on the seed only
    probe = test_ids[: 8 * args.seq_len].view(8, args.seq_len)  # a fixed held-out probe for the log

    model.train()
    curve, losses, start = [], [], time.perf_counter()
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}  {task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training", total=args.steps, loss=float("nan"), tps=0.0)
        for step in range(1, args.steps + 1):
            offsets = torch.randint(0, len(train_ids) - args.seq_len, (args.batch_size,), generator=data_gen)
            x = torch.stack([train_ids[o:o + args.seq_len] for o in offsets.tolist()])  # [B, seq_len]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast == "bf16"):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            tps = step * args.batch_size * args.seq_len / (time.perf_counter() - start)
            progress.update(task, advance=1, loss=losses[-1], tps=tps)
            if step % args.log_every == 0 or step == args.steps:
                with torch.no_grad():
                    model.eval()
                    probe_loss = model(input_ids=probe, labels=probe).loss.item()
                    model.train()
                recent = sum(losses[-args.log_every:]) / len(losses[-args.log_every:])
                curve.append({"step": step, "train_loss": round(recent, 4), "heldout_probe_loss": round(probe_loss, 4),
                              "lr": sched.get_last_lr()[0]})
                console.log(f"step {step}: train loss {recent:.3f}, held-out probe loss {probe_loss:.3f}, "
                            f"{tps:.0f} tok/s")
    train_wall = time.perf_counter() - start

    console.log(f"held-out perplexity (L={args.eval_length}, S={args.eval_stride}) ...")
    nll, n_scored = heldout_nll(model, test_ids, args.eval_length, args.eval_stride)
    ppl = math.exp(nll / n_scored)
    console.log(f"held-out perplexity {ppl:.3f} over {n_scored} tokens; {len(train_ids)} train tokens, "
                f"{args.steps * args.batch_size * args.seq_len} tokens seen in {train_wall:.0f}s")

    model.generation_config.bos_token_id = model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    with atomic_output_dir(args.out, args.overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "NOTICE").write_text(NOTICE, encoding="utf-8")
        run = {
            "seed": args.seed, "threads": args.threads, "autocast": args.autocast,
            "config": {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"},
            "parameters": n_params,
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "tokens_seen": args.steps * args.batch_size * args.seq_len, "train_tokens": len(train_ids),
            "epochs": round(args.steps * args.batch_size * args.seq_len / len(train_ids), 3),
            "data_order": "uniform random window offsets into the tokenized train split, torch.Generator(seed)",
            "optimizer": {"name": "AdamW", "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                          "grad_clip": 1.0},
            "lr_schedule": {"name": "linear warmup + cosine to 0 (transformers get_cosine_schedule_with_warmup)",
                            "peak_lr": args.lr, "warmup_steps": args.warmup},
            "train_wall_s": round(train_wall, 1), "train_tokens_per_s": round(args.steps * args.batch_size
                                                                              * args.seq_len / train_wall, 1),
            "final_train_loss": round(sum(losses[-args.log_every:]) / len(losses[-args.log_every:]), 4),
            "curve": curve,
            "heldout": {"data": "tinyshakespeare:test", "tokens": len(test_ids), "scored_tokens": n_scored,
                        "nll_sum": nll, "perplexity": ppl, "max_length": args.eval_length,
                        "stride": args.eval_stride,
                        "method": "strided windows (HF perplexity guide): each window scores only tokens not "
                                  "scored before; first token of the text unscored; ppl = exp(sum NLL / n scored); "
                                  "fp32, sdpa attention, no BOS added"},
            "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer), "special": EOT,
                          "trained_on": "tinyshakespeare:train"},
            "data": {"file": TINYSHAKESPEARE.name, "sha256": sha256(TINYSHAKESPEARE)},
            "model_safetensors_sha256": sha256(tmp / "model.safetensors"),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": sys.version.split()[0]},
        }
        (tmp / TRAIN_RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():
            f.chmod(0o644)  # safetensors writes 0600 files; the package data must be readable by all
    console.log(f"wrote {args.out} (model.safetensors {(Path(args.out) / 'model.safetensors').stat().st_size / 1e6:.2f}"
                " MB)")
    return run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REFERENCE_DIR, help="output folder (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--steps", type=int, default=350, help="optimizer steps (the budget; not wall-clock)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed for reproducibility)")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="bf16 autocast or plain fp32 (the default: on the AVX2-only CPU the reference was trained "
                        "on, a bf16 autocast step was measured ~13x slower than fp32)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--max-positions", type=int, default=512)
    p.add_argument("--eval-length", type=int, default=256, help="held-out perplexity window L")
    p.add_argument("--eval-stride", type=int, default=128, help="held-out perplexity stride S")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup >= args.steps:
        p.error("--steps must be >= 1 and larger than --warmup")
    if args.hidden % args.heads:
        p.error("--hidden must be divisible by --heads")
    if not 0 < args.eval_stride <= args.eval_length:
        p.error("--eval-stride must be in (0, --eval-length]")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        check_output_dir(args.out, args.overwrite)  # fail before training, not after
        train(args)
    except AttnconvError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
