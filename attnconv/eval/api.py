"""`evaluate`: perplexity, agreement with a reference and decode speed for several models, side by side.

The work is four steps: `prepare` checks every config, tokenizer and the text and builds the token streams and
windows before any weights load; then, model by model, `score` (perplexity, or agreement with the reference on
the same windows) and `measure_decode`. `EvalResults` holds what they return; reports are written from it.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from attnconv.dtypes import dtype_bytes, torch_dtype
from attnconv.errors import AttnconvError
from attnconv.eval.agreement import AgreementResult, agreement
from attnconv.eval.perplexity import PerplexityResult, TextStats, perplexity, plan_windows, text_stats, tokenize_corpus
from attnconv.eval.report import print_table, write_reports
from attnconv.eval.settings import EvalSettings
from attnconv.families import cache_shape
from attnconv.loading import load_causal_lm, load_config, load_tokenizer, read_provenance, resolve_source
from attnconv.model_shape import max_positions
from attnconv.outputs import atomic_output_dir, check_output_dir, output_lock, protect_inputs
from attnconv.textdata import DEFAULT_SPEC, load_texts, texts_overlap

DEFAULT_MAX_LENGTH = 1024


@dataclass
class Prepared:
    """Everything checked before weights load: configs, one token stream per model, the windows."""

    names: list[str]
    configs: dict[str, Any]
    streams: dict[str, torch.Tensor] = field(default_factory=dict)  # model (or reference) -> token ids [n]
    tokenizers: dict[str, Any] = field(default_factory=dict)
    stats: TextStats | None = None
    n_documents: int = 0
    max_length: int = 0
    stride: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass
class ModelResult:
    name: str
    description: dict[str, Any]  # architecture, heads, KV bytes per token, parameters
    perplexity: PerplexityResult | None = None
    agreement: AgreementResult | None = None
    tasks: dict | None = None  # lm-evaluation-harness scores per task
    is_reference: bool = False

    def to_dict(self) -> dict[str, Any]:
        row = dict(self.description)
        if self.perplexity is not None:
            row.update(self.perplexity.to_dict())
        if self.agreement is not None:
            row.update(kl=self.agreement.kl, top1_agreement=self.agreement.top1_agreement,
                       ppl_ratio=self.agreement.ppl_ratio)
        if self.is_reference:
            row.update(kl=0.0, top1_agreement=1.0, ppl_ratio=1.0, is_reference=True)
        if self.tasks is not None:
            row["tasks"] = self.tasks["tasks"]
        return row


@dataclass
class EvalResults:
    settings: EvalSettings
    prepared: Prepared
    device: str
    models: list[ModelResult] = field(default_factory=list)
    decode: dict[str, dict] = field(default_factory=dict)  # model -> decode_benchmark's rows and notes

    def to_dict(self) -> dict[str, Any]:
        p, s = self.prepared, self.settings
        return {"data": s.data or DEFAULT_SPEC, "n_documents": p.n_documents,
                "n_words": p.stats.n_words if p.stats else None, "n_bytes": p.stats.n_bytes if p.stats else None,
                "max_length": p.max_length or None, "stride": p.stride or None, "batch_size": s.batch_size,
                "dtype": s.dtype, "device": self.device, "reference": s.reference,
                "models": [m.to_dict() for m in self.models], "decode": self.decode, "notes": p.notes,
                "settings": s.record(), **self.tasks_header()}

    def tasks_header(self) -> dict[str, Any]:
        scored = next((m.tasks for m in self.models if m.tasks is not None), None)
        if scored is None:
            return {}
        return {"tasks_harness": scored["harness"], "tasks_limit": scored["limit"],
                "tasks_num_fewshot": scored["num_fewshot"]}


def choose_windows(configs: dict[str, Any], max_length: int | None, stride: int | None,
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


def describe_model(name: str, model) -> dict[str, Any]:
    shape = cache_shape(model.config)
    archs = getattr(model.config, "architectures", None) or [type(model).__name__]
    return {"name": name, "architecture": archs[0], "layers": shape.layers, "n_heads": shape.n_heads,
            "n_kv_heads": shape.n_kv_heads, "head_dim": shape.head_dim,
            "dtype": str(model.dtype).removeprefix("torch."),
            "kv_bytes_per_token": shape.bytes_per_token(dtype_bytes(model.dtype)),
            "params": sum(p.numel() for p in model.parameters())}


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AttnconvError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return torch.device(device)


def prepare(settings: EvalSettings) -> Prepared:
    """Configs, tokenizers, the text, its token streams and the windows; no weights are loaded."""
    names = list(dict.fromkeys(settings.models))
    configs = {n: load_config(n, settings.allow_pickle) for n in names}
    reference = settings.reference
    if reference is not None:
        configs[reference] = load_config(reference, settings.allow_pickle)
    prepared = Prepared(names, configs)
    if settings.tasks:
        from attnconv.eval.tasks import check_tasks

        check_tasks(list(settings.tasks), settings.task_include)
    if not settings.perplexity and not settings.tasks:
        return prepared
    tokenizers = prepared.tokenizers = {n: load_tokenizer(n, settings.tokenizer) for n in configs}
    if not settings.perplexity:
        return prepared
    if reference is not None:
        ref_vocab = tokenizers[reference].get_vocab()
        for n in names:
            if tokenizers[n].get_vocab() != ref_vocab:
                raise AttnconvError(f"{n} and the reference {reference} use different tokenizers, so their "
                                    "predictions cannot be compared; pass a model converted from that reference")
    texts = load_texts(settings.data)
    prepared.notes += overlap_warnings(names, settings.data or DEFAULT_SPEC)
    prepared.stats, prepared.n_documents = text_stats(texts), len(texts)
    prepared.max_length, prepared.stride = choose_windows(configs, settings.max_length, settings.stride,
                                                          prepared.notes)
    # One token stream per tokenizer; with a reference every model is scored on the reference's stream.
    by_tokenizer: dict[str, torch.Tensor] = {}
    for n in configs:
        src = reference if reference is not None else n
        key = settings.tokenizer or src
        if key not in by_tokenizer:
            by_tokenizer[key] = tokenize_corpus(tokenizers[src], texts)
        _check_vocab_fit(n, by_tokenizer[key], configs[n])
        prepared.streams[n] = by_tokenizer[key]
    return prepared


def overlap_warnings(models: list[str], data: str) -> list[str]:
    """One line per model whose attnconv.json records calibration or training on the text being scored."""
    warnings = []
    for name in models:
        record = read_provenance(name) if Path(name).is_dir() else {}
        used = {"calibrated": ((record.get("conversion") or {}).get("calibration") or {}).get("data"),
                "uptrained": (record.get("uptrain") or {}).get("data")}
        for verb, spec in used.items():
            if isinstance(spec, str) and texts_overlap(spec, data):
                warnings.append(f"warning: {name} was {verb} on {spec}, which overlaps the scored text {data}: its "
                                "figures are not held-out (score other text with --data)")
    return warnings


def score(settings: EvalSettings, prepared: Prepared, name: str, model, source=None,
          on_batch=None) -> ModelResult:
    """Perplexity of MODEL on its stream, or (with SOURCE) agreement with it on the same windows."""
    result = ModelResult(name, describe_model(name, model))
    if not settings.perplexity:
        return result
    ids, stats = prepared.streams[name], prepared.stats
    window = dict(max_length=prepared.max_length, stride=prepared.stride, batch_size=settings.batch_size,
                  on_batch=on_batch)
    if source is None:
        result.perplexity = perplexity(model, ids, stats, **window)
    else:
        result.agreement = agreement(model, source, ids, stats, **window)
        result.perplexity = result.agreement.model
    return result


def score_tasks(settings: EvalSettings, prepared: Prepared, name: str, model) -> dict:
    """lm-evaluation-harness scores of MODEL on settings.tasks."""
    from attnconv.eval.tasks import parse_limit, run_tasks

    return run_tasks(model, prepared.tokenizers[name], list(settings.tasks), limit=parse_limit(settings.limit),
                     batch_size=settings.batch_size, include_path=settings.task_include,
                     num_fewshot=settings.num_fewshot)


def measure_decode(settings: EvalSettings, model) -> dict:
    """The decode benchmark of MODEL; a model the loop cannot run is noted, not measured (the rest goes on)."""
    from attnconv.eval.decode import decode_benchmark, unsupported_reason  # imported only when asked

    reason = unsupported_reason(model)
    if reason is not None:
        return {"rows": [], "notes": [f"decode not measured: {reason}"]}
    # decode_benchmark clamps contexts beyond the model's positions itself and says so in its notes.
    return decode_benchmark(model, contexts=settings.contexts, batches=settings.batches,
                            new_tokens=settings.new_tokens, baseline=True, kernel=settings.decode_kernel,
                            repeats=settings.repeats, progress=not settings.quiet)


def _progress(settings: EvalSettings):
    if settings.quiet:
        return nullcontext()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=Console(stderr=True))


def evaluate(settings: EvalSettings, console: Console | None = None) -> EvalResults:
    """Evaluate settings.models on one corpus with the same windows; optionally against a reference and for
    decode speed. Prints a table; writes results.json, results.md and PNG plots into settings.out when given
    (OUT appears only when complete)."""
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: no need to squeeze the table into 80 columns
            console.width = 220
    inputs = [*settings.models, settings.reference, settings.tokenizer, settings.data]
    if settings.out is not None:  # fail before any work
        check_output_dir(settings.out, settings.overwrite)
        protect_inputs(settings.out, inputs)
    if settings.decode:
        from attnconv.kernels.cpu_decode import resolve_backend

        resolve_backend(settings.decode_kernel)  # native where it cannot be built: fail before any work
    for name in (*settings.models, *([settings.reference] if settings.reference else [])):
        resolve_source(name, settings.allow_pickle)
    dev = pick_device(settings.device)
    with output_lock(settings.out) if settings.out is not None else nullcontext():
        results = _evaluate(settings, prepare(settings), dev)
        for note in results.prepared.notes:
            console.print(note if note.startswith("warning:") else f"note: {note}")
        print_table(results.to_dict(), console)
        if settings.out is not None:
            # OUT was checked before the evaluation: one made since is found at publish, which keeps the reports.
            with atomic_output_dir(settings.out, settings.overwrite, inputs, recheck=False) as tmp:
                write_reports(results.to_dict(), tmp)
            console.print(f"wrote results.json, results.md and plots to {settings.out}")
    return results


def _evaluate(settings: EvalSettings, prepared: Prepared, dev: torch.device) -> EvalResults:
    results = EvalResults(settings, prepared, str(dev))
    dtype = torch_dtype(settings.dtype)

    def load(name: str):
        return load_causal_lm(name, dtype, settings.allow_pickle).to(dev)

    reference = settings.reference
    with _progress(settings) as bar:
        source = load(reference) if reference is not None else None
        if source is not None and settings.decode:
            results.decode[reference] = measure_decode(settings, source)
        for name in prepared.names:
            model = load(name)
            step = None
            if bar is not None and settings.perplexity:
                n = len(plan_windows(len(prepared.streams[name]), prepared.max_length, prepared.stride))
                task = bar.add_task(f"perplexity {Path(name).name}", total=n)

                def step(k: int, task=task) -> None:
                    bar.advance(task, k)

            results.models.append(score(settings, prepared, name, model, source, step))
            if settings.tasks:
                results.models[-1].tasks = score_tasks(settings, prepared, name, model)
            if settings.decode and name not in results.decode:  # the reference may also be listed as a model
                results.decode[name] = measure_decode(settings, model)
            del model
            gc.collect()
        if source is not None:
            ref = ModelResult(reference, describe_model(reference, source), is_reference=True)
            if settings.tasks:
                ref.tasks = score_tasks(settings, prepared, reference, source)
            agreed = next((m.agreement for m in results.models if m.agreement is not None), None)
            ref.perplexity = agreed.source if agreed is not None else None
            results.models.insert(0, ref)
    return results
