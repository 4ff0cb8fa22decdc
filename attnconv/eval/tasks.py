"""Downstream task scores (accuracy on multiple-choice benchmarks ...) through lm-evaluation-harness.

The model comes in already loaded (attnconv's loader reads every output format: GQA/MQA/MLA, sharded, bf16), so
the harness only sees a `transformers` model and tokenizer; it never reloads them. Task definitions are the
harness's own, plus YAML files from `include_path` (a local dataset: `dataset_path: json` with
`dataset_kwargs: {data_files: ...}` loads offline).

We call `lm_eval.evaluator.evaluate` (the harness's core API, which `simple_evaluate` wraps) with the task setup
`simple_evaluate` does (default few-shot count, few-shot seed): `simple_evaluate` also probes the environment
(`git describe` printing to stderr outside a git checkout, torch's collect_env, global random seeds) for provenance
that attnconv records itself.
"""

from __future__ import annotations

import copy
import difflib
import functools
import logging
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

from attnconv.errors import AttnconvError
from attnconv.eval.task_names import harness_task_names

INSTALL_HINT = "pip install 'attnconv[tasks]'"
FEWSHOT_SEED = 1234  # simple_evaluate's default, so few-shot prompts match the harness's published numbers
_QUIET_LOGGERS = ("lm_eval", "datasets", "transformers", "evaluate")


def parse_limit(text: str | None) -> int | float | None:
    """--limit as typed: a number of examples per task ("100") or a fraction of each task ("0.1")."""
    if text is None or str(text).strip() == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise AttnconvError(f"--limit {text!r} is not a number; give examples per task (100) or a fraction "
                            "(0.1)") from None
    return check_limit(int(value) if value >= 1 and value.is_integer() else value)


def check_limit(limit: int | float | None) -> int | float | None:
    """lm-eval reads a limit below 1 as a fraction of each task and one from 1 up as a count of examples."""
    if limit is None:
        return None
    ok = (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1) or (
        isinstance(limit, float) and math.isfinite(limit) and (0 < limit < 1 or (limit >= 1 and limit.is_integer())))
    if not ok:
        raise AttnconvError(f"--limit {limit} is not usable: give a whole number of examples per task (>= 1) or a "
                            "fraction of each task between 0 and 1")
    return int(limit) if limit >= 1 else limit


def _import_harness():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager  # noqa: F401
    except ImportError as e:
        raise AttnconvError(f"task scores need lm-evaluation-harness, which is not installed ({e}); install it "
                            f"with `{INSTALL_HINT}`") from None
    return evaluate, HFLM


@contextmanager
def _quiet():
    """The harness, datasets and transformers log setup chatter (and datasets draws progress bars while it builds
    a split): keep it out of attnconv's output for the duration; errors still show."""
    import datasets

    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    bars = not datasets.are_progress_bars_disabled()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        datasets.disable_progress_bars()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _clean_names(tasks) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(t.strip() for t in ([tasks] if isinstance(tasks, str) else tasks or []) if t.strip()))
    if not names:
        raise AttnconvError("no task given; pass --tasks name[,name...] (e.g. hellaswag,arc_easy)")
    return names


def check_tasks(tasks: list[str], include_path: str | None = None) -> None:
    """Fail early (before any model is loaded) on a missing harness, an unknown task or a bad --task-include.
    Only names are checked: the harness's own come from a cache (attnconv/eval/task_names.py), not its index."""
    _import_harness()
    with _quiet():
        _check_names(_clean_names(tasks), include_path)


@functools.lru_cache(maxsize=4)
def _index(include_path: str | None, include_defaults: bool):
    """The harness's index of tasks (cached: building the full one reads ~14k YAML files, seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


@functools.cache
def _harness_names() -> frozenset[str]:
    """The harness's own task, group and tag names, built once per installed harness (then read from disk)."""
    return harness_task_names(lambda: _index(None, True).all_tasks)


def _check_names(tasks: tuple[str, ...], include_path: str | None):
    """The resolved include_path and its own index (None without one), once every name in TASKS is known to it
    or to the harness; else one line naming the unknown ones with close names."""
    local = None
    if include_path is not None:
        path = Path(include_path).expanduser()
        if not path.exists():
            raise AttnconvError(f"--task-include {include_path}: no such folder or file; pass the folder of your "
                                "task YAML files")
        include_path = str(path.resolve())
        local = _index(include_path, False)
        if all(_known(local.task_index, t) for t in tasks):
            return include_path, local
    names = _harness_names() | set(local.task_index if local is not None else ())
    unknown = [t for t in tasks if not _known(names, t)]
    if unknown:
        hints = []
        for t in unknown:
            close = difflib.get_close_matches(t, sorted(names), n=3, cutoff=0.6)
            hints.append(f"{t!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        where = "lm-evaluation-harness" + (f" or {include_path}" if include_path else "")
        raise AttnconvError(f"unknown task {'; '.join(hints)}: not a task, group or tag of {where}; "
                            "`lm-eval ls tasks` lists them")
    return include_path, None


def _task_manager(tasks: tuple[str, ...], include_path: str | None):
    """The index to load TASKS from: include_path's own when it has them all, else the harness's full one."""
    include_path, local = _check_names(tasks, include_path)
    return local if local is not None else _index(include_path, True)


def _known(names, name: str) -> bool:
    return name in names or (name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file())


def _clean(value):
    """JSON-able: the harness writes "N/A" for a stderr it could not compute and may produce NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _scores(results: dict) -> dict:
    """Per task (and group): {metric: value, metric_stderr: value, ...} with the harness's `metric,filter` keys
    flattened (`acc,none` -> `acc`; another filter stays visible: `exact_match/strict-match`)."""
    out = {}
    for name, metrics in results["results"].items():
        row = {}
        for key, value in metrics.items():
            if "," not in key:
                continue  # alias, name, sample_len: bookkeeping
            metric, filt = key.split(",", 1)
            row[metric if filt == "none" else f"{metric}/{filt}"] = _clean(value)
        samples = results.get("n-samples", {}).get(name, {})
        row["samples"] = samples.get("effective", metrics.get("sample_len"))
        if name in results.get("n-shot", {}):
            row["num_fewshot"] = results["n-shot"][name]
        higher = results.get("higher_is_better", {}).get(name)
        if higher:
            row["higher_is_better"] = dict(higher)
        out[name] = row
    return out


def run_tasks(model, tokenizer, tasks: list[str], *, limit: int | float | None = None, batch_size: int = 8,
              include_path: str | None = None, device=None, num_fewshot: int | None = None) -> dict:
    """Score MODEL (a loaded transformers causal LM) on lm-evaluation-harness TASKS.

    limit: examples per task (int >= 1) or a fraction of each task (0 < limit < 1); None: all.
    include_path: a folder (or YAML file) of extra task definitions. device: where to run (the model is moved
    there if it is elsewhere); None: where it is. num_fewshot: None keeps each task's own default (0 if none).
    Returns {"harness": ..., "limit": ..., "tasks": {task: {"acc": ..., "acc_stderr": ..., "samples": n, ...}}},
    ready for results.json.
    """
    names = _clean_names(tasks)
    limit = check_limit(limit)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AttnconvError(f"batch size {batch_size} must be a whole number >= 1")
    if num_fewshot is not None and num_fewshot < 0:
        raise AttnconvError(f"--num-fewshot {num_fewshot} must be >= 0")
    if tokenizer is None:
        raise AttnconvError("task scores need the model's tokenizer; this model folder has none (copy the source's "
                            "tokenizer files beside its weights)")
    evaluate, HFLM = _import_harness()
    import lm_eval
    import torch

    if device is not None and model.device != torch.device(device):
        model.to(device)
    with _quiet():
        manager = _task_manager(names, include_path)
        try:
            loaded = manager.load(list(names))  # builds each task: reads its dataset
        except Exception as e:  # a dataset missing offline, a broken local YAML: one line to the user
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise AttnconvError(f"could not load task(s) {', '.join(names)}: {first}") from None
        for task in loaded["tasks"].values():  # what simple_evaluate does before evaluating
            if num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=FEWSHOT_SEED)
        # The harness sets a pad token on the tokenizer it is given: give it a copy, the caller's stays as it was.
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal", batch_size=batch_size)
        results = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=False)
    return {"harness": f"lm-evaluation-harness {lm_eval.__version__}", "limit": limit, "num_fewshot": num_fewshot,
            "tasks": _scores(results)}


def _fmt(value) -> str:
    if value is None or isinstance(value, str):
        return value or "-"
    return f"{value:.4f}" if isinstance(value, float) else f"{value:,}"


def task_rows(scores_by_model: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells: one row per (task, metric), one column per model; `value ± stderr`."""
    models = list(scores_by_model)
    header = ["task", "metric", "n", *models]
    rows = []
    names = list(dict.fromkeys(t for s in scores_by_model.values() for t in s["tasks"]))
    for task in names:
        per_model = [scores_by_model[m]["tasks"].get(task, {}) for m in models]
        metrics = list(dict.fromkeys(k for s in per_model for k, v in s.items() if not k.endswith("_stderr")
                                     and k not in ("samples", "num_fewshot", "higher_is_better")
                                     and isinstance(v, (int, float))))
        n = next((str(s["samples"]) for s in per_model if s.get("samples") is not None), "-")
        for metric in metrics:
            cells = []
            for s in per_model:
                value, err = s.get(metric), s.get(f"{metric}_stderr")
                cells.append(_fmt(value) + (f" ± {_fmt(err)}" if isinstance(err, float) else ""))
            arrow = {True: " ↑", False: " ↓"}.get(next((s.get("higher_is_better", {}).get(metric)
                                                       for s in per_model if s.get("higher_is_better")), None), "")
            rows.append([task, metric + arrow, n, *cells])
    return header, rows


def tasks_markdown(scores_by_model: dict[str, dict]) -> str:
    """A markdown section for results.md: {model name: run_tasks(...) result} -> table."""
    header, rows = task_rows(scores_by_model)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    first = next(iter(scores_by_model.values()), {})
    limit = first.get("limit")
    note = f"{first.get('harness', 'lm-evaluation-harness')}" + (f", limit {limit} per task" if limit else "")
    return "\n".join(["## Task scores", "", note + ".", "", line(header),
                      "|" + "|".join("---" for _ in header) + "|", *map(line, rows), ""])
