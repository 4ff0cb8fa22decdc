"""A recipe file: YAML, a list of stages, each one command of attnconv with its settings.

    - name: convert-gqa2          # optional; default: the command, numbered when it occurs more than once
      convert:                    # exactly one of convert, uptrain, eval, push
        source: "{reference}"     # keys: exactly that command's settings (attnconv/<command>/settings.py)
        out: demo-out/gqa2
        kv_heads: 2

Strings may hold two placeholders, nothing more: `{reference}` (attnconv's embedded reference model) and
`{recipe_dir}` (the folder holding the recipe); `{{` and `}}` stand for literal braces. Relative paths are
taken from the current folder, as the commands take them. Parsing collects every problem (with its line)
instead of stopping at the first, so one run of `attnconv run --dry-run` lists all that needs fixing.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnconv.commands import RECIPE_COMMANDS as COMMANDS  # the commands a stage may be (attnconv/commands.py)
from attnconv.errors import AttnconvError
from attnconv.recipes.yaml_reader import RecipeError, duplicate_keys, read_yaml
from attnconv.reference import REFERENCE_DIR
from attnconv.settings import Settings

PLACEHOLDERS = ("reference", "recipe_dir")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*)\}")


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based, in recipe order
    name: str
    command: str
    values: dict[str, Any]  # the command's mapping, placeholders substituted
    line: int
    lines: dict[str, int]  # key -> line in the file
    settings: Settings | None  # None when the mapping has problems

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.name})"

    def io_fields(self) -> dict[str, str]:
        """{setting: what it names on disk} ('model', 'folder', 'data', 'path' read; 'out' written)."""
        return COMMANDS[self.command].settings.io_fields()

    def reads(self) -> list[tuple[str, str, str]]:
        """(setting, kind, value) for every input the settings name, list settings one value each."""
        out = []
        for key, kind in self.io_fields().items():
            value = getattr(self.settings, key)
            if kind == "out" or value is None:
                continue
            out.extend((key, kind, v) for v in (value if isinstance(value, tuple) else (value,)))
        return out

    @property
    def out(self) -> Path | None:
        """The folder this stage writes (absolute), or None (a dry run, a push, an eval that only prints). Taken
        from the mapping as written when its settings have problems, so other stages' inputs are still matched."""
        if self.settings is None:
            value, dry = self.values.get("out"), self.values.get("dry_run") is True
            return absolute(value) if isinstance(value, str) and value and not dry else None
        if getattr(self.settings, "dry_run", False):
            return None
        value = getattr(self.settings, "out", None)
        return absolute(value) if value is not None else None

    @property
    def target(self) -> str | None:
        """What the stage produces, as the key of its record in the state file."""
        if self.command == "push":
            s = self.settings
            return None if s.dry_run else f"hub:{s.repo_id}@{s.revision or 'main'}"
        return str(self.out) if self.out is not None else None


@dataclass
class Recipe:
    path: Path  # absolute
    stages: list[Stage]
    problems: list[str] = field(default_factory=list)

    @property
    def state_path(self) -> Path:
        """Where reruns are remembered: beside the recipe, `.NAME.attnconv-run.json`."""
        return self.path.parent / f".{self.path.stem}.attnconv-run.json"

    def where(self, line: int | None) -> str:
        return f"{self.path.name}:{line}" if line else self.path.name

    def find(self, name_or_number: str) -> Stage:
        """A stage by name or by its number (1-based)."""
        for s in self.stages:
            if s.name == name_or_number:
                return s
        for s in self.stages:
            if name_or_number.isdigit() and s.index == int(name_or_number):
                return s
        names = [s.name for s in self.stages]
        close = difflib.get_close_matches(name_or_number, names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"stages: {', '.join(names)} (or a number 1-{len(names)})"
        raise AttnconvError(f"--from {name_or_number}: {self.path.name} has no such stage; {hint}")


def absolute(value: str | Path) -> Path:
    """VALUE as an absolute path from the current folder, '..' folded (how stages are matched to inputs)."""
    return Path(os.path.abspath(Path(value).expanduser()))


def _substitute(value: Any, places: dict[str, str], problems: list[str]) -> Any:
    if isinstance(value, str):
        def one(m: re.Match) -> str:
            token = m.group(0)
            if token in ("{{", "}}"):
                return token[0]
            if m.group(1) in places:
                return places[m.group(1)]
            close = difflib.get_close_matches(m.group(1), PLACEHOLDERS, n=1)
            hint = f"did you mean {{{close[0]}}}?" if close else "write {{ and }} for literal braces"
            problems.append(f"unknown placeholder {token} ({hint}); known: "
                            + ", ".join(f"{{{p}}}" for p in PLACEHOLDERS))
            return token

        return _PLACEHOLDER.sub(one, value)
    if isinstance(value, list):
        return [_substitute(v, places, problems) for v in value]
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in PLACEHOLDERS \
            and next(iter(value.values())) is None:
        name = next(iter(value))
        problems.append(f"write \"{{{name}}}\" in quotes: unquoted, YAML reads it as a mapping")
        return places[name]
    return value



def load_recipe(path: str | Path) -> Recipe:
    """Parse a recipe and build each stage's settings; every problem found is kept in `recipe.problems` (see
    `check_recipe` for the checks that need the file system and the other stages)."""
    import yaml

    given = path
    path = absolute(path)
    if os.path.realpath(given) != os.path.realpath(path):  # `link/..` is not the folder holding the link
        raise RecipeError([f"{given} names one file to the system ({os.path.realpath(given)}) and another with its "
                           f"'..' folded ({path}); give the recipe's path without '..' after a link"])
    node, data = read_yaml(path)
    recipe = Recipe(path, [])
    problems = recipe.problems
    if not isinstance(data, list) or not isinstance(node, yaml.SequenceNode):
        raise RecipeError([f"{path.name}: a recipe is a list of stages (`- convert: {{...}}`), not "
                           f"{type(data).__name__ if data is not None else 'an empty file'}"])
    if not data:
        raise RecipeError([f"{path.name}: the recipe has no stages"])
    places = {"reference": str(REFERENCE_DIR), "recipe_dir": str(path.parent)}
    counts = {c: sum(1 for item in data if isinstance(item, dict) and c in item) for c in COMMANDS}
    seen: dict[str, int] = {}
    numbers: dict[str, int] = {}
    for index, (item, item_node) in enumerate(zip(data, node.value, strict=True), start=1):
        line = item_node.start_mark.line + 1
        here = recipe.where(line)
        if not isinstance(item, dict):
            problems.append(f"{here}: stage {index} must be a mapping with one command key ({', '.join(COMMANDS)}), "
                            f"not {item!r}")
            continue
        problems += duplicate_keys(item_node, recipe.where)
        commands = [k for k in item if k in COMMANDS]
        unknown = [k for k in item if k not in COMMANDS and k != "name"]
        for key in unknown:
            close = difflib.get_close_matches(str(key), [*COMMANDS, "name"], n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(COMMANDS)} and name"
            problems.append(f"{here}: stage {index}: {key!r} is not a command; {hint}")
        if len(commands) != 1:
            if not (unknown and not commands):  # an unknown key reported above is the likely missing command
                what = "no command" if not commands else f"{len(commands)} commands ({', '.join(commands)})"
                problems.append(f"{here}: stage {index} has {what}; give exactly one of {', '.join(COMMANDS)} per "
                                "stage")
            continue
        command = commands[0]
        numbers[command] = numbers.get(command, 0) + 1
        name = item.get("name", command if counts[command] == 1 else f"{command}-{numbers[command]}")
        if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
            problems.append(f"{here}: stage {index}: name must be a word without spaces, not {name!r}")
            name = f"{command}-{index}"
        if name in seen:
            problems.append(f"{here}: stage {index}: the name {name!r} is taken by stage {seen[name]}; names are "
                            "unique")
        seen[name] = index
        mapping = item[command]
        mapping_node = next(v for k, v in item_node.value if k.value == command)
        if mapping is None:
            mapping, mapping_node = {}, None
        if not isinstance(mapping, dict):
            problems.append(f"{here}: stage {index} ({name}): {command} takes a mapping of settings, not {mapping!r}")
            continue
        lines = {}
        if mapping_node is not None:
            problems += duplicate_keys(mapping_node, recipe.where)
            lines = {k.value: k.start_mark.line + 1 for k, _ in mapping_node.value}
        subst_problems: list[str] = []
        values = {}
        for key, value in mapping.items():
            before = len(subst_problems)
            values[key] = _substitute(value, places, subst_problems)
            subst_problems[before:] = [f"{recipe.where(lines.get(key, line))}: {command}.{key}: {p}"
                                       for p in subst_problems[before:]]
        problems += subst_problems
        settings = None
        found = COMMANDS[command].settings.mapping_problems(values)
        if found:
            problems += [f"{recipe.where(lines.get(key, line))}: stage {index} ({name}): {message}"
                         for key, message in found]
        else:
            settings = COMMANDS[command].settings.from_mapping(values)
        recipe.stages.append(Stage(index, name, command, values, line, lines, settings))
    return recipe
