"""`evaluate`: perplexity, agreement with a reference and decode speed for several models, side by side."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from attnconv.errors import AttnconvError
from attnconv.eval.agreement import agreement
from attnconv.eval.perplexity import perplexity, plan_windows, text_stats, tokenize_corpus
from attnconv.eval.report import print_table, write_reports
from attnconv.hub import load_causal_lm, load_tokenizer, parse_dtype, resolve_source
from attnconv.kv import DTYPE_BYTES, cache_shape, max_positions
from attnconv.outputs import atomic_output_dir, check_output_dir
from attnconv.textdata import DEFAULT_SPEC, load_texts

DEFAULT_MAX_LENGTH = 1024
DEFAULT_CONTEXTS = (512, 2048, 8192)
DEFAULT_BATCHES = (1, 8)


def _load_config(src: str, allow_pickle: bool):
    from transformers import AutoConfig

    import attnconv.models  # noqa: F401  (registers attnconv's own architectures with the Auto classes)

    path = resolve_source(src, allow_pickle)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AttnconvError(f"{src}: its config.json could not be read ({msg})") from None


def choose_windows(configs: dict[str, object], max_length: int | None, stride: int | None,
                   notes: list[str]) -> tuple[int, int]:
    """L (clamped to the smallest model maximum, with a note) and S (default L // 2)."""
    limits = {name: m for name, cfg in configs.items() if (m := max_positions(cfg)) is not None}
    limit = min(limits.values()) if limits else None
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    elif limit is not None and max_length > limit:
        who = min(limits, key=limits.get)
        notes.append(f"--max-length {max_length} is beyond {who}'s maximum of {limit} positions; using {limit}")
        max_length = limit
    if stride is None:
        stride = max(1, max_length // 2)
    elif stride > max_length:
        raise AttnconvError(f"--stride {stride} must not exceed --max-length ({max_length}), or tokens go unscored")
    return max_length, stride


def _check_vocab_fit(name: str, ids: torch.Tensor, config) -> None:
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(ids) and int(ids.max()) >= vocab:
        raise AttnconvError(f"the tokenizer produces ids up to {int(ids.max())} but {name} has only {vocab} "
                            "embeddings; pass the model's own tokenizer with --tokenizer")


def describe_model(name: str, model) -> dict:
    shape = cache_shape(model.config)
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return {"name": name, "architecture": archs[0], "layers": shape.layers, "n_heads": shape.n_heads,
            "n_kv_heads": shape.n_kv_heads, "head_dim": shape.head_dim,
            "dtype": str(model.dtype).removeprefix("torch."),
            "kv_bytes_per_token": shape.bytes_per_token(DTYPE_BYTES.get(model.dtype, 4)),
            "params": sum(p.numel() for p in model.parameters())}


def _pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise AttnconvError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def evaluate(models: list[str], *, data: str | None = None, max_length: int | None = None, stride: int | None = None,
             batch_size: int = 4, dtype: str | None = None, reference: str | None = None,
             tokenizer: str | None = None, decode: bool = False, contexts: Sequence[int] = DEFAULT_CONTEXTS,
             batches: Sequence[int] = DEFAULT_BATCHES, new_tokens: int = 32, out: str | Path | None = None,
             overwrite: bool = False, allow_pickle: bool = False, device: str | None = None,
             decode_kernel: str = "auto", console: Console | None = None, progress: bool = True) -> dict:
    """Evaluate MODELS on one corpus with the same windows; optionally against REFERENCE and for decode speed.

    Returns the results as a dict (what results.json holds); prints a table; writes results.json,
    results.md and PNG plots into OUT when given (OUT appears only when complete).
    `tokenizer` replaces every model's (and the reference's) own tokenizer. `decode_kernel`: auto, native or
    torch, the Linear layers' CPU decode path (see attnconv/eval/packed_linear.py).
    """
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: no need to squeeze the table into 80 columns
            console.width = 220
    if not models:
        raise AttnconvError("name at least one model to evaluate")
    if batch_size < 1:
        raise AttnconvError(f"--batch-size {batch_size} must be at least 1")
    if decode and new_tokens < 2:
        raise AttnconvError(f"--new-tokens {new_tokens} must be at least 2 (one step after the prefill is timed)")
    if decode:
        from attnconv.kernels.cpu_decode import resolve_backend

        resolve_backend(decode_kernel)  # an unknown name, or native where it cannot be built: fail before any work
    if out is not None:
        check_output_dir(out, overwrite)  # fail before any work
    torch_dtype = parse_dtype(dtype)
    dev = _pick_device(device)
    notes: list[str] = []
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening

    # Cheap checks first: configs, tokenizers and data, before any weights are loaded.
    names = list(dict.fromkeys(models))
    configs = {n: _load_config(n, allow_pickle) for n in names}
    if reference is not None:
        configs[reference] = _load_config(reference, allow_pickle)
    tokenizers = {n: load_tokenizer(n, tokenizer) for n in configs}
    if reference is not None:
        ref_vocab = tokenizers[reference].get_vocab()
        for n in names:
            if tokenizers[n].get_vocab() != ref_vocab:
                raise AttnconvError(f"{n} and the reference {reference} use different tokenizers, so their "
                                    "predictions cannot be compared; pass a model converted from that reference")
    texts = load_texts(data)
    stats = text_stats(texts)
    max_length, stride = choose_windows(configs, max_length, stride, notes)
    for note in notes:
        console.print(f"note: {note}")

    # One token stream per tokenizer; with a reference every model is scored on the reference's stream.
    streams: dict[str, torch.Tensor] = {}
    for n in configs:
        src = reference if reference is not None else n
        key = tokenizer or src
        if key not in streams:
            streams[key] = tokenize_corpus(tokenizers[src], texts)
        _check_vocab_fit(n, streams[key], configs[n])
    stream_of = {n: streams[tokenizer or (reference if reference is not None else n)] for n in configs}

    results = {"data": data or DEFAULT_SPEC, "n_documents": len(texts), "n_words": stats.n_words,
               "n_bytes": stats.n_bytes, "max_length": max_length, "stride": stride, "batch_size": batch_size,
               "dtype": dtype or "auto", "device": str(dev), "reference": reference, "models": [], "decode": {},
               "notes": notes}
    bar = (Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True))
           if progress else nullcontext())

    def load(name: str):
        return load_causal_lm(name, torch_dtype, allow_pickle).to(dev)

    def run_decode(name: str, model) -> None:
        from attnconv.eval.decode import decode_benchmark  # written separately; imported only when asked

        # decode_benchmark clamps contexts beyond the model's positions itself and says so in its notes.
        results["decode"][name] = decode_benchmark(model, contexts=tuple(contexts), batches=tuple(batches),
                                                   new_tokens=new_tokens, baseline=True, kernel=decode_kernel)

    with bar:
        source = load(reference) if reference is not None else None
        if source is not None and decode:
            run_decode(reference, source)
        ref_row = None
        for name in names:
            model = load(name)
            ids = stream_of[name]
            n_windows = len(plan_windows(len(ids), max_length, stride))
            task = bar.add_task(f"perplexity {Path(name).name}", total=n_windows) if progress else None

            def step(k: int, task=task) -> None:
                if progress:
                    bar.advance(task, k)

            row = describe_model(name, model)
            if source is None:
                ppl = perplexity(model, ids, stats, max_length=max_length, stride=stride, batch_size=batch_size,
                                 on_batch=step)
                row.update(ppl.to_dict())
            else:
                agr = agreement(model, source, ids, stats, max_length=max_length, stride=stride,
                                batch_size=batch_size, on_batch=step)
                row.update(agr.model.to_dict())
                row.update(kl=agr.kl, top1_agreement=agr.top1_agreement, ppl_ratio=agr.ppl_ratio)
                if ref_row is None:
                    ref_row = {**describe_model(reference, source), **agr.source.to_dict(), "kl": 0.0,
                               "top1_agreement": 1.0, "ppl_ratio": 1.0, "is_reference": True}
            if decode and name not in results["decode"]:  # the reference may also be listed as a model
                run_decode(name, model)
            results["models"].append(row)
            del model
            gc.collect()
        if source is not None:
            results["models"].insert(0, ref_row)
            del source
    print_table(results, console)
    if out is not None:
        with atomic_output_dir(out, overwrite) as tmp:
            write_reports(results, tmp)
        console.print(f"wrote results.json, results.md and plots to {out}")
    return results
