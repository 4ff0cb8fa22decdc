"""Before anything runs: check a recipe against the file system and itself, then decide for each stage whether it
runs or is skipped, and why.

An input is an earlier stage's output, a local file or folder, a hub id (models) or dataset spec (data), or a
text shipped with attnconv. A stage's fingerprint is the sha256 of its command, the settings that change what it
computes, and its inputs' fingerprints: an earlier stage's fingerprint, a local input's content hash, a hub id or
dataset spec as written. A stage is skipped when its output is the one this recipe recorded for the same
fingerprint; it runs when that changed, when its output is missing, when a stage it reads from runs, or from
`--from` on.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnconv.errors import AttnconvError
from attnconv.model_folder import is_hub_id
from attnconv.outputs import NAME_MAX, refuse_unsafe_output
from attnconv.recipes.recipe import Recipe, RecipeError, Stage, absolute
from attnconv.recipes.state import State, complete, owner
from attnconv.textdata import WIKITEXT2, is_data_file

SHIPPED_SPLITS = ("train", "test", "validation", "eval")
_EXPECTED = {"model": "a local model folder, an earlier stage's output, or a hub id",
             "folder": "a local model folder or an earlier stage's output",
             "data": "a local file or folder, an earlier stage's output, a dataset name[:config][:split][:column], "
                     "or tinyshakespeare[:train|:test] / wikitext-2-test[:calib|:eval]",
             "path": "an existing local file or folder"}


@dataclass(frozen=True)
class Input:
    key: str  # the setting that names it
    kind: str  # model, folder, data or path (Spec.io)
    value: str  # as written
    source: str  # stage, local, hub, dataset or shipped
    stage: Stage | None = None  # the earlier stage that writes it
    path: Path | None = None


@dataclass
class Decision:
    stage: Stage
    run: bool
    reason: str
    record: dict[str, Any] = field(default_factory=dict)  # fingerprint, settings and inputs, as the state keeps them
    fixed: dict[str, Any] = field(default_factory=dict)  # settings the runner sets: overwrite, resume
    adopt: bool = False  # skipped: its output was finished by a run killed before recording it (record it now)


def _run_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.uptrain-run"  # attnconv.uptrain.api.run_dir_for, without importing torch


def _checkpoint_step(out: Path) -> int | None:
    """The step of the newest complete checkpoint of an uptrain writing OUT, or None."""
    root = _run_dir(out) / "checkpoints"
    steps = [int(p.name[5:]) for p in root.glob("step-*")
             if p.name[5:].isascii() and p.name[5:].isdigit() and (p / "state.json").is_file()] \
        if root.is_dir() else []
    return max(steps) if steps else None


def _looks_local(spec: str, producers: dict[Path, Stage]) -> bool:
    """A name that is meant as a path even though it would also pass for a hub id (`out/gqa-2`): it starts
    with ./ ../ / ~, ends in a data file's suffix, or its first folder exists here or holds a stage's output."""
    if spec.startswith((".", "/", "~")) or is_data_file(spec):
        return True
    first = absolute(Path(spec).parts[0]) if Path(spec).parts else None
    return first is not None and (first.is_dir() or any(first in p.parents for p in producers))


def _shipped(value: str) -> str | None:
    """'' for a text shipped with attnconv, a problem for a bad split of one, None for anything else."""
    name, _, split = value.partition(":")
    if (name == WIKITEXT2 or name == "tinyshakespeare") and not split:
        return ""
    if name == WIKITEXT2:
        return "" if split in ("calib", "eval") else f"wikitext-2-test has the parts calib and eval, not {split!r}"
    if name == "tinyshakespeare":
        return "" if split in SHIPPED_SPLITS else f"tinyshakespeare has the splits train and test, not {split!r}"
    return None


def _classify(stage: Stage, key: str, kind: str, value: str, producers: dict[Path, Stage],
              dry: dict[Path, Stage]) -> Input | str:
    label = f"{stage.command}.{key}"
    spec_path = value.partition("::")[0] if kind == "data" else value
    path = absolute(spec_path)
    producer = producers.get(path)
    if producer is stage:
        return f"{label} {value} is this stage's own output; read another folder"
    if producer is not None:
        if producer.index > stage.index:
            return (f"{label} reads {value}, which only the later {producer.label} writes; move that stage before "
                    "this one")
        if kind in ("model", "folder") and producer.command == "eval":
            return f"{label} {value} is the report of {producer.label}, not a model"
        return Input(key, kind, value, "stage", producer, path)
    if kind == "data" and (shipped := _shipped(value)) is not None:
        return Input(key, kind, value, "shipped") if not shipped else f"{label}: {shipped}"
    local = Path(spec_path).expanduser()
    if local.exists():
        if kind in ("model", "folder") and not local.is_dir():
            return f"{label} {value} is a file; name the model's folder (the one holding config.json)"
        return Input(key, kind, value, "local", path=path)
    if path in dry:
        return f"{label} {value}: {dry[path].label} is a dry run and writes nothing"
    if not _looks_local(spec_path, producers):
        if kind == "model" and is_hub_id(value):
            return Input(key, kind, value, "hub")
        if kind == "data" and ("/" in value or ":" in value):
            return Input(key, kind, value, "dataset")
    outs = {str(s.values.get("out")): s for s in producers.values()}
    close = difflib.get_close_matches(value, list(outs), n=1)
    hint = f" (did you mean {close[0]}, written by {outs[close[0]].label}?)" if close else ""
    return f"{label} {value}: no such file or folder here, and no earlier stage writes it; expected {_EXPECTED[kind]}" \
           f"{hint}"


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _stage_problems(stage: Stage, inputs: list[Input], state: State, local_inputs: dict[Path, Stage]) -> list[str]:
    """What the command itself would refuse, found before any stage runs."""
    s, problems = stage.settings, []
    out = stage.out
    if out is not None:
        written = s.out
        if len(out.name.encode()) > NAME_MAX:
            problems.append(f"{stage.command}.out {written}: the name is longer than {NAME_MAX} bytes")
        for i in inputs:
            if i.path is not None and _overlaps(out, i.path):
                problems.append(f"{stage.command}.out {written} overlaps the input {i.value}; inputs are never "
                                "modified: choose another output folder")
        for path, reader in local_inputs.items():
            if reader is not stage and _overlaps(out, path):
                problems.append(f"{stage.command}.out {written} would replace {path}, which {reader.label} reads; "
                                "choose another output folder")
        entry = state.entry(stage.target)
        continues = stage.command == "uptrain" and s.resume and _checkpoint_step(out) is not None
        if out.exists() and owner(entry, stage.command, out) is None and not s.overwrite and not continues:
            problems.append(f"{written} already exists and this recipe did not write it (or it changed since); "
                            "remove it, choose another folder, or add `overwrite: true` to the stage")
        if stage.command == "uptrain" and _checkpoint_step(out) is not None and not entry.get("attempt") \
                and not (s.resume or s.overwrite):
            problems.append(f"{_run_dir(out)} holds checkpoints of an uptrain this recipe did not start; add "
                            "`resume: true` to continue it or `overwrite: true` to discard them")
    try:
        if stage.command == "convert" and any(i.source == "local" for i in inputs):
            from attnconv.convert.layout import inspect_source

            inspect_source(s)  # heads that do not divide, a config or weights it cannot convert
        if stage.command == "eval" and s.tasks:
            from attnconv.eval.tasks import check_tasks

            check_tasks(list(s.tasks), s.task_include)
        if stage.command == "push" and not s.dry_run and not s.token:
            from huggingface_hub import get_token

            if not get_token():
                problems.append("push needs a hub token: run `hf auth login` or set HF_TOKEN")
    except AttnconvError as e:
        problems.append(str(e))
    return problems


def check_recipe(recipe: Recipe, state: State) -> dict[int, list[Input]]:
    """Every stage's inputs; raises RecipeError listing every problem of the recipe (parsing and settings included)."""
    problems = list(recipe.problems)
    producers: dict[Path, Stage] = {}  # every stage's output, those of stages with bad settings too
    dry: dict[Path, Stage] = {}
    for s in recipe.stages:
        written = s.values.get("out")
        if s.out is None:
            if s.settings is not None and getattr(s.settings, "out", None) is not None:
                dry[absolute(s.settings.out)] = s
            continue
        if s.out == recipe.path or s.out in recipe.path.parents:
            problems.append(f"{recipe.where(s.lines.get('out'))}: {s.label} writes {written}, which holds the recipe "
                            "itself (and its state); write into a new folder inside it")
            continue
        try:
            refuse_unsafe_output(written)
        except AttnconvError as e:
            problems.append(f"{recipe.where(s.lines.get('out'))}: {s.label}: {e}")
            continue
        if s.out in producers:
            problems.append(f"{recipe.where(s.lines.get('out'))}: {s.label} writes {written}, as "
                            f"{producers[s.out].label} does; give each stage its own output folder")
            continue
        nested = next((p for p in producers if _overlaps(p, s.out)), None)
        if nested is not None:
            problems.append(f"{recipe.where(s.lines.get('out'))}: {s.label} writes {written}, which overlaps "
                            f"{producers[nested].label}'s output {producers[nested].values.get('out')}; use "
                            "separate folders")
            continue
        producers[s.out] = s
    stages = [s for s in recipe.stages if s.settings is not None]
    inputs: dict[int, list[Input]] = {}
    for s in stages:
        found = []
        for key, kind, value in s.reads():
            got = _classify(s, key, kind, value, producers, dry)
            if isinstance(got, str):
                problems.append(f"{recipe.where(s.lines.get(key, s.line))}: {s.label}: {got}")
            else:
                found.append(got)
        inputs[s.index] = found
    local_inputs = {i.path: s for s in stages for i in inputs[s.index] if i.source == "local"}
    for s in stages:
        problems += [f"{recipe.where(s.line)}: {s.label}: {p}"
                     for p in _stage_problems(s, inputs[s.index], state, local_inputs)]
    if problems:
        raise RecipeError(problems)
    return inputs


def _record(stage: Stage, inputs: list[Input], records: dict[int, dict], state: State) -> dict[str, Any]:
    io = stage.io_fields()
    settings = {k: v for k, v in stage.settings.run_values().items() if k not in io}
    prints: dict[str, list[str]] = {}
    for i in inputs:
        if i.source == "stage":
            fp = records[i.stage.index]["fingerprint"]
        elif i.source == "local":
            column = i.value.partition("::")[2] if i.kind == "data" else ""
            fp = "sha256:" + state.content_hash(i.path) + (f"::{column}" if column else "")
        else:
            fp = f"{i.source}:{i.value}"
        prints.setdefault(i.key, []).append(fp)
    given = {k: (v if isinstance(getattr(stage.settings, k), tuple) else v[0]) for k, v in prints.items()}
    body = {"command": stage.command, "settings": settings, "inputs": given}
    fingerprint = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
    return {"fingerprint": fingerprint, "settings": settings, "inputs": given}


def _only_new_defaults(stage: Stage, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether the records differ only by settings attnconv added since OLD ran, at their defaults: then OLD
    stands, and NEW takes its fingerprint so the stages after it do not run again either."""
    defaults = type(stage.settings).defaults()
    before, after = old.get("settings", {}), new["settings"]
    added = set(after) - set(before)
    if old.get("inputs") != new["inputs"] or set(before) - set(after) or any(
            before[k] != after[k] for k in before) or any(k not in defaults or after[k] != defaults[k] for k in added):
        return False
    new.update(fingerprint=old["fingerprint"], settings=before)
    return True


def _changes(stage: Stage, old: dict[str, Any], new: dict[str, Any]) -> str:
    parts = []
    before, after = old.get("settings", {}), new["settings"]
    for k in sorted(set(before) | set(after)):
        if before.get(k) != after.get(k):
            parts.append(f"{stage.command}.{k} {before.get(k, 'unset')!r} -> {after.get(k, 'unset')!r}")
    before, after = old.get("inputs", {}), new["inputs"]
    parts += [f"input {k} changed" for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    return "changed: " + ", ".join(parts) if parts else "changed since the last run"


def _decide(stage: Stage, record: dict[str, Any], state: State, forced: bool,
            upstream: list[tuple[str, Stage]]) -> Decision:
    target, out, s = stage.target, stage.out, stage.settings
    if target is None:
        why = "a dry run" if getattr(s, "dry_run", False) else "writes no output folder (no out): nothing to reuse"
        return Decision(stage, True, why, record)
    entry = state.entry(target)
    previous = owner(entry, stage.command, out) if out is not None else entry.get("done")
    if forced:
        reason = "--from"
    elif upstream:
        reason = f"{stage.command}.{upstream[0][0]} reads the output of {upstream[0][1].label}, which runs"
    elif out is not None and not out.exists():
        reason = f"{s.out} is missing" if entry.get("done") else "not run yet"
    elif previous is None:
        reason = f"replaces {s.out} (overwrite: true)" if out is not None else "not pushed yet"
    elif out is not None and not complete(previous, out):
        reason = f"{s.out} is incomplete: files the run wrote were removed or changed since"
    elif previous["fingerprint"] != record["fingerprint"] and not _only_new_defaults(stage, previous, record):
        reason = _changes(stage, previous, record)
    else:
        where = s.out if out is not None else f"{s.repo_id}"
        adopt = previous is entry.get("attempt")
        adopted = " (finished by a run killed before it was recorded)" if adopt else ""
        return Decision(stage, False, f"done: {where}{adopted}; settings and inputs unchanged", record, adopt=adopt)
    decision = Decision(stage, True, reason, record)
    if out is not None and out.exists() and previous is not None:
        decision.fixed["overwrite"] = True  # the recipe's own output: replace it
    if stage.command == "uptrain":
        # The recipe decides: resuming a run of other inputs (uptrain compares only its own settings when its
        # output is already finished) would keep a stale model.
        decision.fixed["resume"] = False
        step, attempt = _checkpoint_step(out), entry.get("attempt")
        if step is not None and attempt and attempt["fingerprint"] == record["fingerprint"] and not forced:
            decision.fixed["resume"] = True
            decision.reason += f"; resumes from its checkpoint at step {step}"
        elif step is not None and attempt:
            decision.fixed["overwrite"] = True
            decision.reason += "; discards the checkpoints of an earlier attempt"
        elif step is not None and s.resume:
            decision.fixed["resume"] = True
            decision.reason += f"; continues the checkpoint at step {step} (resume: true)"
    return decision


def plan(recipe: Recipe, state: State, inputs: dict[int, list[Input]], from_index: int | None = None
         ) -> list[Decision]:
    """Run or skip, and why, for each stage in order."""
    records: dict[int, dict] = {}
    decisions: dict[int, Decision] = {}
    for stage in recipe.stages:
        record = records[stage.index] = _record(stage, inputs[stage.index], records, state)
        upstream = [(i.key, i.stage) for i in inputs[stage.index]
                    if i.source == "stage" and decisions[i.stage.index].run]
        forced = from_index is not None and stage.index >= from_index
        decisions[stage.index] = _decide(stage, record, state, forced, upstream)
    return list(decisions.values())
