"""The `log_increase` allocation (SlimGPT's incremental per-layer ratio), the default's."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from prunekit import model_structure, predicted_structure
from prunekit.plan.planner import PlannerSettings, log_increase_budgets, make_plan, removed_fraction
from prunekit.score import score_model


def test_budgets_rise_with_depth_and_average_to_the_target():
    weights = torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    for target in (0.1, 0.35, 0.5):
        budgets = log_increase_budgets(6, target, weights)
        assert float((budgets * weights).sum() / weights.sum()) == pytest.approx(target, abs=1e-6)
        assert (budgets.diff() > 0).all()
    # unclamped, the last layer loses four times the first's share (SlimGPT's 0.0625 .. 0.25 at 20%)
    budgets = log_increase_budgets(30, 0.2, torch.ones(30))
    assert float(budgets[-1] / budgets[0]) == pytest.approx(4.0)
    assert log_increase_budgets(1, 0.3, torch.ones(1)).tolist() == [0.3]


def test_budgets_keep_their_shape_when_the_target_is_large():
    """Scaled to the target before the clamp at 0.95: the shape is not flattened at high targets."""
    budgets = log_increase_budgets(30, 0.5, torch.ones(30))
    assert (budgets.diff() > 0).all() and float(budgets.max()) < 0.95


@pytest.mark.parametrize("prune", [("channel",), ("channel", "head", "kv_group")])
def test_plan_meets_the_target_with_later_layers_losing_more(prune):
    model = tiny_model("llama", num_hidden_layers=6, intermediate_size=128)
    structure = model_structure(model)
    settings = PlannerSettings(target=0.3, allocation="log_increase", prune=prune, ffn_multiple=8)
    plan = make_plan(structure, score_model(model, "magnitude"), settings, comparable=False)
    after = predicted_structure(plan, structure)
    assert removed_fraction(structure, after, "non-embedding") >= 0.3
    widths = [layer.intermediate_size for layer in after.layers]
    assert widths[0] == max(widths) and widths[-1] == min(widths) and widths[0] > widths[-1]


def test_spread_option_sets_how_much_more_the_last_layer_loses():
    """--allocation-option spread=S: the last layer loses (1 + S) times the first's share; 0 is uniform."""
    assert float(log_increase_budgets(30, 0.2, torch.ones(30), spread=1.0).max() /
                 log_increase_budgets(30, 0.2, torch.ones(30), spread=1.0).min()) == pytest.approx(2.0)
    model = tiny_model("llama", num_hidden_layers=6, intermediate_size=128)
    structure, scores = model_structure(model), score_model(model, "magnitude")
    widths = {}
    for spread in (0.0, 3.0, 8.0):
        settings = PlannerSettings(target=0.3, allocation="log_increase", prune=("channel",), ffn_multiple=8,
                                   allocation_options={"spread": spread})
        after = predicted_structure(make_plan(structure, scores, settings, comparable=False), structure)
        assert removed_fraction(structure, after, "non-embedding") >= 0.3
        widths[spread] = [layer.intermediate_size for layer in after.layers]
    assert max(widths[0.0]) - min(widths[0.0]) <= 8  # uniform up to one ffn_multiple of rounding
    gap = {spread: w[0] - w[-1] for spread, w in widths.items()}
    assert abs(gap[0.0]) <= 8 < gap[3.0] < gap[8.0]


def test_a_bad_spread_is_refused_before_planning():
    """A negative or non-numeric spread, or an option log_increase does not take, is one clear error
    from the settings, before any model is read."""
    from prunekit.plan.plan import PlanError

    for options, message in (({"spread": -1.0}, "must be a number of at least 0"),
                             ({"spread": "wide"}, "must be a number of at least 0"),
                             ({"alpha": 7.0}, "takes only spread, not alpha")):
        with pytest.raises(PlanError, match=message):
            PlannerSettings(target=0.3, allocation="log_increase", allocation_options=options).validate()
