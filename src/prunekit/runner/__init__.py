"""Recipes and the runner: the whole job (analyze, plan, prune, recover, evaluate, bench, export,
report) as one validated YAML file, resumable stage by stage. See recipe.py and run.py."""
from prunekit.runner.recipe import STAGE_ORDER, Recipe, RecipeError, load_recipe
from prunekit.runner.stages import STAGES, estimate, run, validate, validate_settings

__all__ = ["STAGES", "STAGE_ORDER", "Recipe", "RecipeError", "estimate", "load_recipe", "run", "validate", "validate_settings"]
