"""The settings of the slimllm and adapt_pruner allocations (SlimLLM's alpha, Adapt-Pruner's
amplitude), reachable from the CLI (`--allocation-option KEY=VALUE`) and recipes
(`prune.allocation_options`), checked before anything loads."""
from __future__ import annotations

import pytest
import torch

from prunekit.models.structure import model_structure
from prunekit.pipeline import PruneSettings
from prunekit.plan.plan import PlanError, predicted_structure
from prunekit.plan.planner import ADAPT_PRUNER_AMPLITUDE, PlannerSettings, make_plan, slimllm_alpha
from prunekit.runner import RecipeError, load_recipe
from prunekit.score.scores import Scores
from tests.conftest import tiny_model

LAYERS = 6
COS = [0.3, 0.9, 0.9, 0.9, 0.9, 0.99]


@pytest.fixture(scope="module")
def structure():
    return model_structure(tiny_model("llama", intermediate_size=256, num_hidden_layers=LAYERS))


@pytest.fixture(scope="module")
def scores():
    values = {"channel": [torch.arange(256, dtype=torch.float64) for _ in range(LAYERS)],
              "head": [torch.arange(8, dtype=torch.float64) for _ in range(LAYERS)],
              "kv_group": [torch.arange(2, dtype=torch.float64) for _ in range(LAYERS)]}
    return Scores("hand", values, {"layer_cos": COS})


def _widths(structure, scores, allocation, **options) -> list[int]:
    settings = PlannerSettings(target=0.3, allocation=allocation, prune=("channel",), ffn_multiple=16,
                               allocation_options=options)
    plan = make_plan(structure, scores, settings, comparable=False)
    return [s.intermediate_size for s in predicted_structure(plan, structure).layers]


@pytest.mark.parametrize("allocation, key, default", [("slimllm", "alpha", slimllm_alpha(0.3)),
                                                      ("adapt_pruner", "amplitude", ADAPT_PRUNER_AMPLITUDE)])
def test_an_option_reaches_the_planner_and_its_default_changes_nothing(structure, scores, allocation, key, default):
    plain = _widths(structure, scores, allocation)
    assert _widths(structure, scores, allocation, **{key: default}) == plain  # the default, said out loud
    even = _widths(structure, scores, allocation, **{key: 0.0})  # 0: every layer loses alike
    assert max(even) - min(even) <= 16 and even != plain
    assert max(plain) - min(plain) > max(even) - min(even)


def test_prune_settings_carry_the_options_to_the_planner():
    settings = PruneSettings(target=0.2, criterion="adapt_pruner", allocation="adapt_pruner",
                             allocation_options={"amplitude": 0.5})
    settings.validate()
    assert settings.planner_settings().allocation_options == {"amplitude": 0.5}


@pytest.mark.parametrize("allocation, options, match", [
    ("global", {"alpha": 7.0}, "allocation 'global' takes no options, not alpha; drop it, or use allocation slimllm"),
    ("slimllm", {"amplitude": 1.0}, "allocation 'slimllm' takes only alpha, not amplitude; drop it, or use "
                                    "allocation adapt_pruner"),
    ("slimllm", {"beta": 1.0}, "allocation 'slimllm' takes only alpha, not beta; drop it$"),
    ("adapt_pruner", {"amplitude": -1.0}, "allocation option amplitude must be a number of at least 0, got -1.0"),
])
def test_bad_options_are_refused_before_anything_loads(allocation, options, match):
    with pytest.raises(PlanError, match=match):
        PruneSettings(target=0.2, criterion="adapt_pruner", allocation=allocation, allocation_options=options).validate()


def test_the_cli_option_reaches_the_settings():
    from prunekit.cli import _prune_settings, build_parser

    args = build_parser().parse_args(["prune", "model", "--out", "out", "--target", "0.2", "--allocation", "slimllm",
                                      "--criterion", "slimllm", "--allocation-option", "alpha=7"])
    assert _prune_settings(args).planner_settings().allocation_options == {"alpha": 7.0}
    args = build_parser().parse_args(["prune", "model", "--out", "out", "--target", "0.2", "--allocation", "slimllm",
                                      "--allocation-option", "alpha=hot"])
    with pytest.raises(PlanError, match="--allocation-option alpha=hot: the value must be a number such as 7"):
        _prune_settings(args)


def test_a_recipe_sets_them_with_types_checked():
    recipe = {"model": "smollm2-135m", "stages": ["prune"],
              "prune": {"allocation": "slimllm", "criterion": "slimllm", "allocation_options": {"alpha": 7}}}
    assert load_recipe(recipe).prune.allocation_options == {"alpha": 7.0}
    recipe["prune"]["allocation_options"] = {"alpha": "hot"}
    with pytest.raises(RecipeError, match="recipe.prune.allocation_options.alpha must be float, got 'hot'"):
        load_recipe(recipe)
