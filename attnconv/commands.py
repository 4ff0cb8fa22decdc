"""Every attnconv command once: its settings (attnconv/<area>/settings.py), the function that runs it
(attnconv/<area>/command.py), and whether a recipe stage may use it. The CLI and recipes both read this table.

Importing it stays cheap (no torch, no typer): each command module imports its heavy library code inside the
function that runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attnconv.convert.command import run_convert, run_info
from attnconv.convert.settings import ConvertSettings, InfoSettings
from attnconv.eval.command import run_eval
from attnconv.eval.settings import EvalSettings
from attnconv.push.command import run_push
from attnconv.push.settings import PushSettings
from attnconv.settings import Settings
from attnconv.uptrain.command import run_uptrain
from attnconv.uptrain.settings import UptrainSettings


@dataclass(frozen=True)
class Command:
    settings: type[Settings]
    run: Callable[[Any], None]
    in_recipes: bool  # a recipe stage may be this command (info only prints: a recipe has no use for it)


# In the order of the work (convert, uptrain, eval, push): `attnconv --help` and recipe messages list them so.
COMMANDS: dict[str, Command] = {
    "convert": Command(ConvertSettings, run_convert, in_recipes=True),
    "info": Command(InfoSettings, run_info, in_recipes=False),
    "uptrain": Command(UptrainSettings, run_uptrain, in_recipes=True),
    "eval": Command(EvalSettings, run_eval, in_recipes=True),
    "push": Command(PushSettings, run_push, in_recipes=True),
}
RECIPE_COMMANDS: dict[str, Command] = {name: c for name, c in COMMANDS.items() if c.in_recipes}
