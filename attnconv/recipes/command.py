"""`attnconv run`: run a recipe, printing one `error:` line per problem of a bad one."""

from __future__ import annotations

import sys


def run_recipe_command(recipe: str, from_stage: str | None = None, dry_run: bool = False) -> None:
    """Run the stages of a recipe (convert, uptrain, eval, push) in order, skipping finished ones.

    A recipe is a YAML list of stages, each `- name: NAME` (optional) and one command key whose mapping holds
    that command's settings (the option names with _ for -): see recipes/README.md. Every problem of the recipe
    is reported before any stage starts. A stage is skipped when its output is complete and its settings and
    inputs are unchanged; a changed stage reruns with every stage that reads from it; an interrupted uptrain
    resumes from its checkpoint. The state is kept beside the recipe (.NAME.attnconv-run.json).

    Examples:

      attnconv run recipes/demo.yaml --dry-run

      attnconv run my-recipe.yaml --from uptrain-gqa2
    """
    import typer

    from attnconv.recipes.recipe import RecipeError
    from attnconv.recipes.runner import run_recipe

    try:
        run_recipe(recipe, from_stage, dry_run)
    except RecipeError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        raise typer.Exit(2) from None
