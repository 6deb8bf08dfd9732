"""SlimLLM and Adapt-Pruner (issue 27): the head criterion's correlation equals one computed from
the heads' real outputs, the elimination order keeps GQA balanced, scores move with the units they
score, the channel score follows its formula, the layer-similarity allocations meet the target and
spread it as their papers do, and both recipes parse, preflight and run from the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, byte_tokenizer, tiny_model

import prunekit
from prunekit import PlanError, model_structure, predicted_structure
from prunekit.cli import main as cli_main
from prunekit.plan.planner import (ALLOCATIONS, PlannerSettings, make_plan, removed_fraction, similarity_budgets,
                                   slimllm_alpha, slimllm_budgets)
from prunekit.runner import load_recipe
from prunekit.score import CriterionError, Scores, collect_layer_stats, get_criterion, score_model
from prunekit.score.slimllm import (channel_scores, collect_slimllm_stats, covariance, head_output_covariances,
                                    head_removal_losses, kept_output_correlation, merge_units, protect_lowest)

IDS = torch.randint(3, 250, (6, 24), generator=torch.Generator().manual_seed(0))
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


def _head_outputs(model, layer: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's o_proj output on IDS [tokens, heads, hidden], from a real forward pass."""
    attention = model.model.layers[layer].self_attn
    seen = []
    handle = attention.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        model(IDS)
    handle.remove()
    x = torch.cat(seen).reshape(-1, attention.o_proj.in_features).double()
    heads = model.config.num_attention_heads
    w = attention.o_proj.weight.double().reshape(-1, heads, x.shape[1] // heads)
    return torch.einsum("tha,dha->thd", x.reshape(len(x), heads, -1), w), x


def _pearson_mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach() - a.detach().mean(0), b.detach() - b.detach().mean(0)
    return float(((a * b).mean(0) / (a.std(0, correction=0) * b.std(0, correction=0))).abs().mean())


def test_kept_output_correlation_equals_the_heads_real_outputs():
    model = tiny_model("llama")
    outputs, _ = _head_outputs(model)
    stats = collect_slimllm_stats(model, IDS, batch_size=4, progress=False)
    table = head_output_covariances(covariance(stats[1].head_input), model.model.layers[1].self_attn.o_proj.weight, 8)
    full = outputs.sum(1)
    for kept in ([0, 1, 2, 3, 4, 5, 6], [1, 5], [3]):
        keep = torch.zeros(8, dtype=torch.bool)
        keep[kept] = True
        assert kept_output_correlation(table, keep) == pytest.approx(_pearson_mean_abs(outputs[:, kept].sum(1), full),
                                                                      rel=1e-6)
    assert kept_output_correlation(table, torch.ones(8, dtype=torch.bool)) == pytest.approx(1.0)
    groups = merge_units(table, 4)  # KV groups: heads 0-3 and 4-7 as one unit each
    assert kept_output_correlation(groups, torch.tensor([True, False])) == pytest.approx(
        _pearson_mean_abs(outputs[:, :4].sum(1), full), rel=1e-6)


def test_greedy_elimination_removes_one_head_per_group_per_round_and_is_monotone():
    table = head_output_covariances(torch.eye(24, dtype=torch.float64) + 0.1, torch.randn(
        10, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64), 6)
    blocks = [[0, 1, 2], [3, 4, 5]]
    losses = head_removal_losses(table, blocks, "greedy")
    order = torch.argsort(losses).tolist()
    for round_start in range(0, 6, 2):  # every round takes one head of each group
        assert {u // 3 for u in order[round_start:round_start + 2]} == {0, 1}
    assert losses[order[-1]] == pytest.approx(1.0, abs=1e-6)  # nothing kept: no correlation left
    # the first removal is the best single removal: greedy starts where SlimLLM's first ranking does
    single = head_removal_losses(table, [[u] for u in range(6)], "single")
    assert order[0] in (int(torch.argmin(single[:3])), 3 + int(torch.argmin(single[3:])))


def test_a_silent_head_is_removed_first_and_scores_follow_permuted_groups():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[:, 5 * 12:6 * 12] = 0  # head 5 adds nothing
    scores = score_model(model, "slimllm", IDS, batch_size=4, progress=False)
    assert int(torch.argmin(scores.values["head"][1])) == 5
    # swapping the two KV groups (q, k, v rows and o columns together) swaps their scores
    swapped = tiny_model("llama")
    attention = swapped.model.layers[1].self_attn
    with torch.no_grad():
        half = lambda w, rows: torch.cat([w[rows:], w[:rows]])  # noqa: E731
        attention.q_proj.weight.copy_(half(attention.q_proj.weight, 4 * 12))
        attention.k_proj.weight.copy_(half(attention.k_proj.weight, 12))
        attention.v_proj.weight.copy_(half(attention.v_proj.weight, 12))
        attention.o_proj.weight.copy_(half(attention.o_proj.weight.T, 4 * 12).T)
    original = score_model(tiny_model("llama"), "slimllm", IDS, batch_size=4, progress=False)
    moved = score_model(swapped, "slimllm", IDS, batch_size=4, progress=False)
    assert torch.allclose(moved.values["kv_group"][1], original.values["kv_group"][1].flip(0), atol=1e-6)
    assert torch.allclose(moved.values["head"][1], torch.cat([original.values["head"][1][4:],
                                                              original.values["head"][1][:4]]), atol=1e-6)


def test_channel_scores_follow_the_formula_and_move_with_the_channels():
    model = tiny_model("qwen2")
    mlp = model.model.layers[2].mlp
    seen = {}
    hooks = [mlp.register_forward_pre_hook(lambda m, a: seen.setdefault("x", []).append(a[0])),
             mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("a", []).append(a[0])),
             mlp.down_proj.register_forward_hook(lambda m, a, out: seen.setdefault("y", []).append(out))]
    with torch.no_grad():
        model(IDS)
    for h in hooks:
        h.remove()
    x, act, y = (torch.cat(seen[k]).reshape(-1, torch.cat(seen[k]).shape[-1]).double() for k in ("x", "a", "y"))
    eigenvalues, vectors = torch.linalg.eigh(torch.cov(y.T, correction=0))
    weight = (eigenvalues.abs() / eigenvalues.abs().mean()).sigmoid()
    xn = x.norm(dim=0)
    expected = ((mlp.gate_proj.weight.double() * xn).norm(dim=1) + (mlp.up_proj.weight.double() * xn).norm(dim=1)
                + act.norm(dim=0) * ((mlp.down_proj.weight.double().T @ vectors).abs() * weight).norm(dim=1))
    scores = score_model(model, "slimllm", IDS, batch_size=4, progress=False, protect_lowest=0.0)
    assert torch.allclose(scores.values["channel"][2], expected, rtol=1e-6)
    # channels permuted (gate/up rows, down columns) -> their scores permuted the same way
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
        mlp.up_proj.weight.copy_(mlp.up_proj.weight[perm])
        mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    permuted = score_model(model, "slimllm", IDS, batch_size=4, progress=False, protect_lowest=0.0)
    assert torch.allclose(permuted.values["channel"][2], scores.values["channel"][2][perm], rtol=1e-6)


def test_channel_scores_do_not_depend_on_the_sign_or_order_of_principal_directions():
    g = torch.Generator().manual_seed(3)
    gate, up, down = (torch.randn(20, 6, generator=g, dtype=torch.float64) for _ in range(3))
    y = torch.randn(50, 6, generator=g, dtype=torch.float64)
    cov = torch.cov(y.T, correction=0)
    base = channel_scores(gate, up, down, torch.rand(6, generator=g), torch.rand(20, generator=g), cov)
    assert (base > 0).all()
    # a rotation of the hidden space applied to W_down and the output covariance changes nothing
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    rotated = channel_scores(gate, up, down @ q, torch.ones(6), torch.ones(20), q.T @ cov @ q)
    unrotated = channel_scores(gate, up, down, torch.ones(6), torch.ones(20), cov)
    assert torch.allclose(rotated, unrotated, rtol=1e-8)


def test_protect_lowest_lifts_the_lowest_channels_above_all_others_in_order():
    scores = torch.tensor([5.0, 1.0, 3.0, 0.5, 4.0, 2.0, 6.0, 7.0, 8.0, 9.0], dtype=torch.float64)
    lifted = protect_lowest(scores, 0.2)
    assert torch.argsort(lifted).tolist()[-2:] == [3, 1]  # the two lowest, now the two highest, in order
    assert torch.equal(protect_lowest(scores, 0.0), scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_slimllm_scores_every_family_and_records_the_layer_similarity(family):
    model = tiny_model(family)
    scores = score_model(model, "slimllm", IDS, batch_size=4, progress=False)
    heads, groups = model.config.num_attention_heads, model.config.num_key_value_heads
    assert [v.numel() for v in scores.values["head"]] == [heads] * 4
    assert [v.numel() for v in scores.values["kv_group"]] == [groups] * 4
    assert all(torch.isfinite(v).all() for vs in scores.values.values() for v in vs)
    reference = collect_layer_stats(model, IDS, batch_size=4, progress=False)
    assert scores.meta["layer_cos"] == pytest.approx([st.mean_cos("layer") for st in reference], rel=1e-5)
    plan = make_plan(model_structure(model), scores, PlannerSettings(target=0.3, allocation="slimllm", ffn_multiple=8),
                     comparable=False)
    assert plan.meta["achieved"] >= 0.3


def test_slimllm_alpha_and_budgets():
    assert slimllm_alpha(0.2) == 10 and slimllm_alpha(0.5) == 7 and slimllm_alpha(0.35) == pytest.approx(8.5)
    assert slimllm_alpha(0.1) == 10 and slimllm_alpha(0.7) == 7
    cos = torch.tensor([0.5, 0.9, 0.95, 0.97, 0.99])
    weights = torch.tensor([1.0, 2.0, 1.0, 1.0, 1.0])
    budgets = slimllm_budgets(cos, 0.3, weights)
    assert float((budgets * weights).sum() / weights.sum()) == pytest.approx(0.3, abs=1e-4)
    assert (budgets.diff() > 0).all()  # more similar input and output: more removed
    # the ratios between layers are the softmax's (no clamp reached here)
    assert float(budgets[4] / budgets[3]) == pytest.approx(float(torch.exp(torch.tensor(slimllm_alpha(0.3) * 0.02))),
                                                           rel=1e-5)
    assert torch.allclose(slimllm_budgets(torch.full((4,), 0.9), 0.25, torch.ones(4)), torch.full((4,), 0.25,
                                                                                                  dtype=torch.float64))


def test_similarity_budgets_spread_linearly_with_the_amplitude():
    cos = torch.tensor([0.6, 0.8, 0.9, 1.0])
    weights = torch.ones(4)
    assert torch.allclose(similarity_budgets(cos, 0.2, 0.0, weights), torch.full((4,), 0.2, dtype=torch.float64))
    budgets = similarity_budgets(cos, 0.2, 0.5, weights)
    assert float(budgets.mean()) == pytest.approx(0.2, abs=1e-6)
    assert (budgets.diff() > 0).all()
    # linear in cos: the normalised deviations are (cos - mean) / max |cos - mean|
    n = (cos - cos.mean()) / (cos - cos.mean()).abs().max()
    assert torch.allclose(budgets, 0.2 * (1 + 0.5 * n.double()), atol=1e-6)


@pytest.mark.parametrize("allocation", ["slimllm", "adapt_pruner"])
def test_layer_similarity_allocations_meet_the_target_and_prune_redundant_layers_more(allocation):
    model = tiny_model("llama", intermediate_size=256, num_hidden_layers=6)
    structure = model_structure(model)
    values = {"channel": [torch.arange(256, dtype=torch.float64) for _ in range(6)],
              "head": [torch.arange(8, dtype=torch.float64) for _ in range(6)],
              "kv_group": [torch.arange(2, dtype=torch.float64) for _ in range(6)]}
    scores = Scores("hand", values, {"layer_cos": [0.3, 0.9, 0.9, 0.9, 0.9, 0.99]})
    for target in (0.2, 0.5):
        for prune in (("channel", "head", "kv_group"), ("channel",)):
            plan = make_plan(structure, scores, PlannerSettings(target=target, allocation=allocation, prune=prune,
                                                                ffn_multiple=16), comparable=False)
            after = predicted_structure(plan, structure)
            assert target <= removed_fraction(structure, after, "non-embedding") < target + 0.05
        # FFN widths only (attention moves are a quarter of a layer's heads at once here): the layer
        # that turns the stream most keeps most, the most redundant one least
        kept = [s.intermediate_size for s in after.layers]
        assert kept[0] > kept[2] >= kept[5] and kept[0] > kept[5]


def test_layer_similarity_allocations_need_recorded_similarities():
    model = tiny_model("llama")
    with pytest.raises(PlanError, match="allocation 'slimllm' spreads the target by each layer's cos.*which the "
                                        "magnitude scores do not record; score with slimllm"):
        make_plan(model_structure(model), score_model(model, "magnitude"), PlannerSettings(target=0.2,
                                                                                            allocation="slimllm"))
    with pytest.raises(PlanError, match="unknown allocation 'slim'; choose one of .*'slimllm', 'adapt_pruner'"):
        PlannerSettings(target=0.2, allocation="slim").validate()
    assert {"slimllm", "adapt_pruner"} <= set(ALLOCATIONS)
    # any criterion with a calibration pass records them
    assert len(score_model(model, "activation", IDS, progress=False).meta["layer_cos"]) == 4


def test_registry_errors_name_the_new_criteria_and_their_options():
    with pytest.raises(CriterionError, match="unknown criterion 'slim'; choose one of .*'adapt_pruner'.*'slimllm'"):
        get_criterion("slim")
    with pytest.raises(CriterionError, match="option head_search of slimllm does not take \\['swap'\\]; choose from "
                                             "\\['greedy', 'single'\\]"):
        get_criterion("slimllm").check_options({"head_search": "swap"})
    assert get_criterion("adapt_pruner").whole_model and not get_criterion("slimllm").whole_model


def test_single_search_ranks_by_removal_alone():
    model = tiny_model("mistral")
    single = score_model(model, "slimllm", IDS, batch_size=4, progress=False, head_search="single")
    greedy = score_model(model, "slimllm", IDS, batch_size=4, progress=False)
    assert int(torch.argmin(single.values["kv_group"][0])) == int(torch.argmin(greedy.values["kv_group"][0]))


def test_adapt_pruner_is_taylor_plus_layer_similarity():
    model = tiny_model("qwen3")
    scores = score_model(model, "adapt_pruner", IDS, batch_size=3, progress=False)
    taylor = score_model(model, "taylor", IDS, batch_size=3, progress=False)
    for kind in ("channel", "head", "kv_group"):
        assert all(torch.equal(a, b) for a, b in zip(scores.values[kind], taylor.values[kind]))
    assert len(scores.meta["layer_cos"]) == 4


@pytest.mark.parametrize("name", ["slimllm", "adapt-pruner"])
def test_the_recipes_parse_with_their_criterion_and_allocation(name):
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    recipe.prune.validate()
    assert recipe.prune.criterion == recipe.prune.allocation == name.replace("-", "_")
    header = (RECIPES / f"{name}.yaml").read_text().split("\nmodel:")[0]
    assert "Reproduced:" in header and "Differs:" in header


def test_cli_prunes_with_slimllm_criterion_and_allocation(tmp_path):
    prunekit.save_model(tiny_model("qwen2", intermediate_size=128), byte_tokenizer(), tmp_path / "dense")
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. The dog sat on the log. A bird sang on a wire. " * 40)
    common = ["--calib", str(text), "--calib-samples", "8", "--calib-seq-len", "32", "--ffn-multiple", "16"]
    for criterion, allocation in (("slimllm", "slimllm"), ("slimllm", "adapt_pruner")):
        out = tmp_path / f"{criterion}-{allocation}"
        assert cli_main(["prune", str(tmp_path / "dense"), "--target", "0.3", "--criterion", criterion,
                         "--allocation", allocation, "--out", str(out), *common]) == 0
        pruning = json.loads((out / "prunekit.json").read_text())["pruning"]
        assert pruning["removed"]["non-embedding"] == pytest.approx(0.3, abs=0.06)
        prunekit.load(out)


def test_scale_and_bias_is_the_per_dimension_line_fit_and_the_refit_does_at_least_as_well():
    from prunekit.compensate import augment_gram, refit_kept_columns
    from prunekit.compensate.scale_bias import scale_and_bias

    g = torch.Generator().manual_seed(4)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    x = x + torch.randn(12, generator=g, dtype=torch.float64)
    weight, bias = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    y = x @ weight.T + bias
    new_weight, new_bias = scale_and_bias(weight, keep, x.mean(0), torch.cov(x.T, correction=0), bias)
    kept = x[:, keep] @ weight[:, keep].T
    for d in range(5):  # np.polyfit(kept_d, y_d, 1), as the reference runs it
        design = torch.stack([kept[:, d], torch.ones(400, dtype=torch.float64)], 1)
        a, b = torch.linalg.lstsq(design, y[:, d:d + 1]).solution.flatten()
        assert new_weight[d] == pytest.approx((a * weight[d, keep]).tolist(), rel=1e-8)
        assert float(new_bias[d]) == pytest.approx(float(b), rel=1e-8)
    line_error = (x[:, keep] @ new_weight.T + new_bias - y).pow(2).sum()
    augmented = torch.cat([x, torch.ones(400, 1, dtype=torch.float64)], 1)
    gram = augment_gram(x.T @ x, x.sum(0), 400)
    full = torch.cat([weight, bias[:, None]], 1)
    refit = refit_kept_columns(full, gram, torch.cat([keep, torch.tensor([12])]), ridge=0.0)
    refit_error = (augmented[:, torch.cat([keep, torch.tensor([12])])] @ refit.T - y).pow(2).sum()
    assert refit_error <= line_error * (1 + 1e-9)


def test_the_repair_benchmark_refuses_an_unknown_repair_before_loading(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "slimllm_repair.py"
    result = subprocess.run([sys.executable, str(script), "--model", "no-such-model", "--repairs", "none,polyfit",
                             "--out", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown repairs ['polyfit']; choose from" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r.json").exists()
