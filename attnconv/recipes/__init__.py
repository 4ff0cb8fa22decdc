"""Recipes: a YAML list of attnconv stages (convert, uptrain, eval, push) run in order, each stage skipped when
its output is complete and its settings and inputs are unchanged (`attnconv run RECIPE.yaml`)."""

from __future__ import annotations

from attnconv.recipes.recipe import COMMANDS, PLACEHOLDERS, Recipe, RecipeError, Stage, load_recipe
from attnconv.recipes.runner import RecipeRun, StageResult, describe, prepare, run_recipe

__all__ = ["COMMANDS", "PLACEHOLDERS", "Recipe", "RecipeError", "RecipeRun", "Stage", "StageResult", "describe",
           "load_recipe", "prepare", "run_recipe"]
