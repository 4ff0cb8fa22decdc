"""`run_recipe`: check a whole recipe, then run the stages that need it, each exactly as its command would.

Each stage calls the command's own function (named in attnconv/commands.py), so it prints and writes what
`attnconv <command>` does. The runner only adds settings the recipe decides: `overwrite: true` for an output the
recipe itself wrote and now replaces, `resume: true` for an interrupted uptrain with unchanged inputs. The state
records an attempt before a stage starts and its fingerprint once it is done.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attnconv.errors import AttnconvError, Interrupted, Terminated
from attnconv.recipes.plan import Decision, check_recipe, plan
from attnconv.recipes.recipe import COMMANDS, Recipe, RecipeError, load_recipe
from attnconv.recipes.state import State, marker, recipe_lock


@dataclass
class StageResult:
    decision: Decision
    command_s: float | None = None  # time inside the command (None: skipped)
    total_s: float = 0.0  # with the runner's own work for the stage (settings, state writes)


@dataclass
class RecipeRun:
    recipe: Recipe
    decisions: list[Decision]
    check_s: float  # parsing, checks, fingerprints and plan
    results: list[StageResult] = field(default_factory=list)
    dry_run: bool = False


def describe(decisions: list[Decision]) -> list[str]:
    """One line per stage: number, name, command, run or skip, and why."""
    width = max(len(d.stage.name) for d in decisions)
    return [f"{d.stage.index:>3}  {d.stage.name:<{width}}  {d.stage.command:<7}  {'run ' if d.run else 'skip'}  "
            f"{d.reason}" for d in decisions]


def prepare(path: str | Path | Recipe, from_stage: str | None = None) -> tuple[Recipe, State, list[Decision]]:
    """Parse, check and plan a recipe (nothing is written): raises RecipeError listing every problem."""
    recipe = path if isinstance(path, Recipe) else load_recipe(path)
    from_index = None
    if from_stage is not None:
        try:
            from_index = recipe.find(str(from_stage)).index
        except AttnconvError as e:
            recipe.problems.append(str(e))
    state = State.load(recipe.state_path, recipe.path)
    inputs = check_recipe(recipe, state)
    return recipe, state, plan(recipe, state, inputs, from_index)


def _stage_error(e: BaseException, decision: Decision, recipe: Recipe) -> AttnconvError:
    label, again = decision.stage.label, f"in this recipe, `attnconv run {recipe.path.name}` continues from there"
    if isinstance(e, Terminated):
        return Interrupted(f"{label} terminated (SIGTERM); {again}", signal.SIGTERM)
    if isinstance(e, KeyboardInterrupt):
        return Interrupted(f"{label} interrupted; {again}", signal.SIGINT)
    if isinstance(e, Interrupted):
        err = AttnconvError(f"{label}: {e}; {again}")
    else:
        err = AttnconvError(f"{label} failed: {e}")
    err.exit_code = e.exit_code
    return err


def run_recipe(path: str | Path, from_stage: str | None = None, dry_run: bool = False,
               echo: Callable[[str], None] = print) -> RecipeRun:
    """Run the recipe at PATH: every problem is reported before anything starts (RecipeError); then each stage
    runs or is skipped (see attnconv/recipes/plan.py); `from_stage` (a name or number) reruns it and every later
    stage; `dry_run` only prints the plan. Returns what was decided and how long each part took."""
    t0 = time.perf_counter()
    if dry_run:
        recipe, state, decisions = prepare(path, from_stage)
        run = RecipeRun(recipe, decisions, time.perf_counter() - t0, dry_run=True)
        echo(f"{recipe.path.name}: {len(decisions)} stages (state: {recipe.state_path})")
        for line in describe(decisions):
            echo(line)
        return run
    recipe = load_recipe(path)  # a bad file fails before the lock file is made
    if recipe.problems:
        raise RecipeError(recipe.problems)
    with recipe_lock(recipe.state_path):
        recipe, state, decisions = prepare(recipe, from_stage)
        if state.dirty:
            state.save()  # the content hashes of local inputs, so the next run need not read them again
        run = RecipeRun(recipe, decisions, time.perf_counter() - t0)
        n = len(decisions)
        for d in decisions:
            t_stage = time.perf_counter()
            stage = d.stage
            echo(f"[{stage.index}/{n}] {stage.name} ({stage.command}): {'run' if d.run else 'skip'}: {d.reason}")
            if not d.run:
                if d.adopt:
                    state.finish(stage.target, d.record, marker(stage.command, stage.out), stage.out)
                run.results.append(StageResult(d, None, time.perf_counter() - t_stage))
                continue
            command = COMMANDS[stage.command]
            settings = command.settings.from_mapping(stage.values, **d.fixed)
            target = stage.target
            if target is not None:
                state.begin(target, stage.name, d.record)
            t_cmd = time.perf_counter()
            try:
                command.run(settings)
            except (AttnconvError, KeyboardInterrupt) as e:
                raise _stage_error(e, d, recipe) from None
            command_s = time.perf_counter() - t_cmd
            if target is not None:
                state.finish(target, d.record, marker(stage.command, stage.out) if stage.out else None, stage.out)
            run.results.append(StageResult(d, command_s, time.perf_counter() - t_stage))
        ran = sum(1 for r in run.results if r.command_s is not None)
        echo(f"{recipe.path.name}: {ran} stage(s) ran, {n - ran} skipped")
    return run
