"""Criteria: sensitivity is exact, Taylor matches autograd by hand, the statistics-based
criteria see what they should, and every criterion runs on every family, pruned or not."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from prunekit import LayerPlan, Plan, apply_plan
from prunekit.score import CRITERIA, CriterionError, ScoreError, Scores, collect_layer_stats, score_model
from prunekit.score.criteria import activation_scores, block_influence_scores, fluctuation_scores, magnitude_scores
from prunekit.score.sensitivity import sensitivity_scores

IDS = torch.randint(3, 259, (6, 16), generator=torch.Generator().manual_seed(1))
ALL = ("layer", "attention", "mlp", "kv_group", "head", "channel")


def _loss(model, ids, labels=None) -> float:
    with torch.no_grad():
        return model(ids, labels=ids if labels is None else labels).loss.item()


def test_sensitivity_equals_the_measured_loss_increase_of_each_removal(family):
    model = tiny_model(family)
    scores = sensitivity_scores(model, IDS, kinds=ALL, channel_group_size=16, batch_size=4, removals_per_pass=3,
                                progress=False)
    base = _loss(model, IDS)
    cases = [
        (Plan(drop_layers=(1,)), scores.values["layer"][1]),
        (Plan(layers={2: LayerPlan(keep_kv_groups=(0,))}), scores.values["kv_group"][2][1]),
        (Plan(layers={3: LayerPlan(drop_mlp=True)}), scores.values["mlp"][3]),
        (Plan(layers={1: LayerPlan(drop_attention=True)}), scores.values["attention"][1]),
        (Plan(layers={0: LayerPlan(keep_channels=tuple(range(16, 80)))}), scores.values["channel"][0][:16].sum()),
    ]
    for plan, predicted in cases:
        pruned = copy.deepcopy(model)
        apply_plan(pruned, plan)
        assert _loss(pruned, IDS) - base == pytest.approx(float(predicted), abs=2e-5)
    assert scores.meta["baseline_loss"] == pytest.approx(base, abs=1e-5)
    assert scores.meta["cost"]["removals"] == 4 * (3 + 2 + 8 + 5)


def test_sensitivity_of_one_head_equals_zeroing_it():
    model = tiny_model("llama")
    scores = sensitivity_scores(model, IDS, kinds=("head",), progress=False)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[2].self_attn.o_proj.weight[:, 5 * 12:6 * 12] = 0
    assert _loss(zeroed, IDS) - _loss(model, IDS) == pytest.approx(float(scores.values["head"][2][5]), abs=2e-5)


def test_fine_removals_are_measured_on_the_first_rows_and_coarse_ones_on_all():
    model = tiny_model("llama")
    scores = sensitivity_scores(model, IDS, kinds=("layer", "head"), fine_tokens=2 * IDS.shape[1], progress=False)
    assert scores.meta["rows"] == {"layer": 6, "head": 2}
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.model.layers[2].self_attn.o_proj.weight[:, 5 * 12:6 * 12] = 0
    first = IDS[:2]
    assert _loss(zeroed, first) - _loss(model, first) == pytest.approx(float(scores.values["head"][2][5]), abs=2e-5)
    dropped = copy.deepcopy(model)
    apply_plan(dropped, Plan(drop_layers=(1,)))
    assert _loss(dropped, IDS) - _loss(model, IDS) == pytest.approx(float(scores.values["layer"][1]), abs=2e-5)
    # fewer tokens than one row still measures one row; 0 measures every row
    assert sensitivity_scores(model, IDS, kinds=("head",), fine_tokens=1, progress=False).meta["rows"] == {"head": 1}
    assert sensitivity_scores(model, IDS, kinds=("head",), fine_tokens=0, progress=False).meta["rows"] == {"head": 6}


def test_fine_kinds_alone_embed_and_run_only_their_rows(monkeypatch):
    """Heads alone on 2 of 6 rows: only those rows are kept and run, with the same scores."""
    import prunekit.score.sensitivity as sensitivity

    model, cached_rows = tiny_model("llama"), []
    embed = sensitivity.embed_calibration

    def recording(model, layers, input_ids, **kwargs):
        cached_rows.append(len(input_ids))
        return embed(model, layers, input_ids, **kwargs)

    monkeypatch.setattr(sensitivity, "embed_calibration", recording)
    alone = sensitivity_scores(model, IDS, kinds=("head",), fine_tokens=2 * IDS.shape[1], progress=False)
    mixed = sensitivity_scores(model, IDS, kinds=("layer", "head"), fine_tokens=2 * IDS.shape[1], progress=False)
    assert cached_rows == [2, 6]
    torch.testing.assert_close(torch.stack(alone.values["head"]), torch.stack(mixed.values["head"]))
    assert alone.meta["baseline_loss"] == pytest.approx(_loss(model, IDS[:2]), abs=1e-5)


def test_negative_criterion_options_are_refused_before_any_work():
    with pytest.raises(CriterionError, match="fine_tokens of sensitivity must not be negative"):
        CRITERIA["sensitivity"].check_options({"fine_tokens": "-5"})


def test_sensitivity_on_task_labels_counts_only_responses():
    model = tiny_model("qwen2")
    labels = IDS.clone()
    labels[:, :8] = -100
    scores = sensitivity_scores(model, IDS, labels, kinds=("layer",), progress=False)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, Plan(drop_layers=(2,)))
    assert _loss(pruned, IDS, labels) - _loss(model, IDS, labels) == pytest.approx(float(scores.values["layer"][2]), abs=2e-5)


def test_taylor_matches_autograd_by_hand():
    model = tiny_model("llama")
    for variant in ("vector", "element"):
        scores = score_model(model, "taylor", IDS, batch_size=6, progress=False, variant=variant, autocast=False)
        reference = copy.deepcopy(model)
        reference.zero_grad()
        reference(IDS, labels=IDS).loss.backward()
        attention = reference.model.layers[1].self_attn
        rows = slice(3 * 12, 4 * 12)  # head 3
        products = torch.cat([(attention.q_proj.weight * attention.q_proj.weight.grad)[rows].flatten(),
                              (attention.o_proj.weight * attention.o_proj.weight.grad)[:, rows].flatten()]).double()
        expected = (products.sum().abs() if variant == "vector" else products.abs().sum()).detach()
        assert float(scores.values["head"][1][3]) == pytest.approx(float(expected), rel=1e-4)
    assert all(p.requires_grad for p in model.parameters()), "scoring must leave the model trainable as it was"


def test_taylor_on_its_first_tokens_equals_taylor_on_those_rows():
    model = tiny_model("qwen2")
    rows = 3
    part = score_model(model, "taylor", IDS, progress=False, tokens=rows * IDS.shape[1] + 5, autocast=False)
    alone = score_model(model, "taylor", IDS[:rows], progress=False, autocast=False)
    assert part.meta["rows"] == rows
    for kind in ALL:
        torch.testing.assert_close(torch.cat([v.reshape(-1) for v in part.values[kind]]),
                                   torch.cat([v.reshape(-1) for v in alone.values[kind]]))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_taylor_under_bfloat16_autocast_ranks_as_float32_does(family):
    """The default where bf16 products are fast: the layers run under bf16 autocast, the loss in
    float32 chunks. Scores move by bf16 rounding only: the same order of heads and channels."""
    from prunekit.models.precision import fast_bfloat16

    if not fast_bfloat16("cpu"):
        pytest.skip("this CPU has no fast bf16 products, so autocast is off")
    model = tiny_model(family)
    exact = score_model(model, "taylor", IDS, progress=False, autocast=False)
    lowered = score_model(model, "taylor", IDS, progress=False, autocast=True)
    for kind in ("channel", "head"):
        a = torch.cat([v.reshape(-1) for v in exact.values[kind]])
        b = torch.cat([v.reshape(-1) for v in lowered.values[kind]])
        rank = lambda t: t.argsort().argsort().double()  # noqa: E731
        assert torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1] > 0.95
        torch.testing.assert_close(b, a, rtol=0.1, atol=0.02 * float(a.abs().max()))


def test_taylor_element_bounds_vector():
    model = tiny_model("phi3")
    element = score_model(model, "taylor", IDS, progress=False, variant="element")
    vector = score_model(model, "taylor", IDS, progress=False, variant="vector")
    for kind in ALL:
        for e, v in zip(element.values[kind], vector.values[kind]):
            assert (e + 1e-12 >= v).all()


def test_statistics_criteria_see_dead_units():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 7] = 0
        model.model.layers[1].self_attn.o_proj.weight[:, 2 * 12:3 * 12] = 0
        model.model.layers[3].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    stats = collect_layer_stats(model, IDS, progress=False)
    for scores in (activation_scores(model, stats), fluctuation_scores(model, stats)):
        assert scores.values["channel"][1][7] == 0 and scores.values["head"][1][2] == 0
        assert (scores.values["channel"][0] > 0).all()
    influence = block_influence_scores(stats)
    assert float(influence.values["layer"][3]) == pytest.approx(0.0, abs=1e-6)
    assert int(torch.argmin(influence.layer_values("layer"))) == 3
    angular = block_influence_scores(stats, angular=True)
    assert float(angular.values["layer"][3]) == pytest.approx(0.0, abs=1e-3)


def test_magnitude_is_the_norm_of_a_units_weights():
    model = tiny_model("qwen3")
    mlp = model.model.layers[0].mlp
    expected = torch.cat([mlp.gate_proj.weight[4], mlp.up_proj.weight[4], mlp.down_proj.weight[:, 4]]).double().norm()
    assert float(magnitude_scores(model).values["channel"][0][4]) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("criterion", sorted(CRITERIA))
def test_every_criterion_scores_every_family_also_after_uneven_pruning(family, criterion):
    model = tiny_model(family)
    apply_plan(model, Plan(layers={0: LayerPlan(keep_kv_groups=(1,), keep_channels=tuple(range(40))),
                                   2: LayerPlan(drop_attention=True)}))
    if "expert" in CRITERIA[criterion].kinds:  # MoE criteria (test_moe_scores.py) refuse dense models
        with pytest.raises(ScoreError, match="no mixture-of-experts layers"):
            score_model(model, criterion, IDS, batch_size=4, progress=False)
        return
    scores = score_model(model, criterion, IDS, batch_size=4, progress=False)
    assert isinstance(scores, Scores)
    expected = {"channel": [40, 80, 80, 80], "head": [4, 8, 0, 8], "kv_group": [1, 2, 0, 2]}
    for kind, sizes in expected.items():
        if scores.has(kind):
            assert [v.numel() for v in scores.values[kind]] == sizes, kind


def test_random_is_deterministic_for_a_seed():
    model = tiny_model("llama")
    a, b = score_model(model, "random", seed=3), score_model(model, "random", seed=3)
    c = score_model(model, "random", seed=4)
    assert torch.equal(a.values["channel"][0], b.values["channel"][0])
    assert not torch.equal(a.values["channel"][0], c.values["channel"][0])


def test_registry_errors():
    model = tiny_model("llama")
    with pytest.raises(CriterionError, match="unknown criterion 'wanda'; choose one of .*taylor"):
        score_model(model, "wanda", IDS)
    with pytest.raises(CriterionError, match="has no options \\['variant'\\]"):
        score_model(model, "magnitude", IDS, variant="x")
    with pytest.raises(CriterionError, match="option variant of taylor does not take \\[.second.\\]"):
        score_model(model, "taylor", IDS, variant="second")
    with pytest.raises(CriterionError, match="needs calibration data"):
        score_model(model, "taylor")


def test_non_finite_weights_give_a_clear_error():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf scores"):
        score_model(model, "magnitude")
