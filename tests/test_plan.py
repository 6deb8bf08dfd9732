"""Plans: JSON round trip, and every bad plan fails with a clear message before a weight moves."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_model

from prunekit import LayerPlan, Plan, PlanError, apply_plan, model_structure
from prunekit.plan import structure_signature


def _fails_cleanly(plan: Plan, match: str, family: str = "llama") -> None:
    model = tiny_model(family)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(PlanError, match=match):
        apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a failed plan touched the weights"
    assert len(before) == len(model.state_dict())


def test_json_round_trip(tmp_path):
    plan = Plan(
        layers={3: LayerPlan(keep_kv_groups=(0,), keep_channels=(1, 2, 3)), 5: LayerPlan(drop_attention=True)},
        drop_layers=(7, 1), model={"model_type": "llama"}, meta={"criterion": "taylor"},
    )
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded.to_dict() == plan.to_dict()
    assert json.loads((tmp_path / "plan.json").read_text())["drop_layers"] == [1, 7]


@pytest.mark.parametrize("plan, match", [
    (Plan(drop_layers=(4,)), r"drop_layers \[4\] out of range: this model has 4"),
    (Plan(layers={9: LayerPlan(drop_mlp=True)}), r"entry for layer 9, but this model has 4 layers"),
    (Plan(layers={0: LayerPlan(keep_query_heads=(0, 8))}), r"keep_query_heads \[8\] out of range"),
    (Plan(layers={0: LayerPlan(keep_kv_groups=(2,))}), r"keep_kv_groups \[2\] out of range"),
    (Plan(layers={0: LayerPlan(keep_channels=(80,))}), r"keep_channels \[80\] out of range"),
    (Plan(layers={0: LayerPlan(keep_channels=(1, 1))}), r"lists an index twice"),
    (Plan(layers={0: LayerPlan(keep_query_heads=())}), r"keeps no query heads.*drop_attention"),
    (Plan(layers={0: LayerPlan(keep_kv_groups=())}), r"keeps no query heads.*drop_attention"),
    (Plan(layers={0: LayerPlan(keep_channels=())}), r"keeps no FFN channels.*drop_mlp"),
    (Plan(layers={0: LayerPlan(keep_query_heads=(0, 1, 4))}), r"same number in every"),
    (Plan(layers={0: LayerPlan(keep_query_heads=(0, 4), keep_kv_groups=(0,))}), r"heads \[4\] belong to KV groups the plan removes"),
    (Plan(drop_layers=(0, 1, 2, 3)), r"drops every layer"),
    (Plan(layers={1: LayerPlan(drop_mlp=True)}, drop_layers=(1,)), r"in drop_layers and also has a layer entry"),
])
def test_bad_plans_fail_before_surgery(plan, match):
    _fails_cleanly(plan, match)


def test_plan_made_for_another_model_is_refused():
    other = model_structure(tiny_model("llama", num_hidden_layers=6, intermediate_size=64))
    _fails_cleanly(Plan(drop_layers=(1,), model=structure_signature(other)), r"made for another model.*6 layers vs 4")
    other_family = model_structure(tiny_model("qwen2"))
    _fails_cleanly(Plan(model=structure_signature(other_family)), r"made for another model.*model_type 'qwen2' vs 'llama'")


def test_plan_for_a_pruned_model_checks_its_current_widths():
    model = tiny_model("llama")
    apply_plan(model, Plan(layers={0: LayerPlan(keep_kv_groups=(0,))}))
    stale = Plan(layers={0: LayerPlan(keep_kv_groups=(1,))})
    with pytest.raises(PlanError, match=r"keep_kv_groups \[1\] out of range: this model has 1"):
        apply_plan(model, stale)


@pytest.mark.parametrize("data, match", [
    ([], "a plan is a JSON object"),
    ({"layer": {}}, r"unknown plan keys \['layer'\]"),
    ({"layers": {"0": {"keep_heads": [1]}}}, r"layer 0: unknown keys \['keep_heads'\]"),
    ({"layers": {"x": {}}}, "a layer key must be an integer"),
    ({"layers": {"0": {"keep_channels": "1,2"}}}, "must be a list of integers"),
    ({"layers": {"0": {"drop_mlp": "yes"}}}, "must be true or false"),
    ({"format": "prunekit.plan/9"}, "cannot read it"),
])
def test_malformed_json_is_named(data, match):
    with pytest.raises(PlanError, match=match):
        Plan.from_dict(data)


def test_unreadable_plan_files(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")
