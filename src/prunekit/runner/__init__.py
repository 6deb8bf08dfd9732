"""Recipes and the runner: the whole job (analyze, plan, prune, recover, evaluate, bench, export,
report) as one validated YAML file, preflighted as a whole, resumable stage by stage. See
recipe.py and stages.py."""
from prunekit.runner.recipe import STAGE_ORDER, Recipe, RecipeError, load_recipe, shipped_recipes
from prunekit.runner.stages import STAGES, preflight, run, validate_settings

__all__ = ["STAGES", "STAGE_ORDER", "Recipe", "RecipeError", "load_recipe", "preflight", "run", "shipped_recipes",
           "validate_settings"]
