"""Hidden-size pruning in the planner and the criteria: the hidden move removes the least
important residual channels in multiples, counts in every basis, competes with the other moves;
activation, Taylor and magnitude score the residual channels."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from prunekit import PlanError, apply_plan, model_structure, predicted_structure
from prunekit.models.modeling_prunekit import decoder_layers
from prunekit.plan.planner import PlannerSettings, make_plan, removed_fraction
from prunekit.score import score_model
from prunekit.score.statistics import input_norms

HIDDEN, MULTIPLE = 64, 8
IDS = torch.randint(3, 259, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4)


@pytest.fixture(scope="module")
def scores(model):
    return score_model(model, "magnitude")


def _plan(model, scores, comparable=False, **settings):
    settings.setdefault("hidden_multiple", MULTIPLE)
    settings.setdefault("ffn_multiple", 16)
    return make_plan(model_structure(model), scores, PlannerSettings(**settings), comparable=comparable)


@pytest.mark.parametrize("basis", ["non-embedding", "total", "flops"])
def test_hidden_alone_meets_the_target_in_multiples_of_the_least_important(model, scores, basis):
    # (at 2048 tokens the tiny model's FLOPs are mostly attention over positions, which hidden keeps)
    plan = _plan(model, scores, target=0.2, basis=basis, prune=("hidden",), flops_seq_len=64)
    before = model_structure(model)
    after = predicted_structure(plan, before)
    assert removed_fraction(before, after, basis, seq_len=64) >= 0.2
    assert len(plan.keep_hidden) % MULTIPLE == 0 and not plan.layers and not plan.drop_layers
    summed = torch.stack(scores.values["hidden"]).sum(0)
    removed = sorted(set(range(HIDDEN)) - set(plan.keep_hidden))
    assert max(summed[removed]) <= min(summed[list(plan.keep_hidden)])
    assert after.kv_cache_bytes_per_token() == before.kv_cache_bytes_per_token()
    pruned = copy.deepcopy(model)
    assert apply_plan(pruned, plan).to_dict() == after.to_dict()


@pytest.fixture(scope="module")
def cheap(scores):
    """Magnitude scores with residual channels far cheaper than any FFN channel."""
    cheap = copy.deepcopy(scores)
    floor = min(float(v.min()) for v in scores.values["channel"])
    cheap.values["hidden"] = [torch.full((HIDDEN,), floor / 100, dtype=torch.float64) for _ in range(4)]
    return cheap


def test_hidden_competes_with_channels_and_heads(model, cheap):
    """Cheap residual channels go first, then, past their limit, the other widths."""
    before = model_structure(model)
    small = _plan(model, cheap, comparable=True, target=0.05, basis="total", prune=("hidden", "channel", "head"))
    assert small.keep_hidden is not None and not small.layers
    plan = _plan(model, cheap, comparable=True, target=0.6, basis="total", prune=("hidden", "channel", "head"),
                 limits={"hidden": 0.5})
    assert removed_fraction(before, predicted_structure(plan, before), "total") >= 0.6
    assert len(plan.keep_hidden) == HIDDEN // 2 and plan.layers


def test_uniform_allocation_takes_hidden_moves(model, cheap):
    plan = _plan(model, cheap, comparable=True, target=0.6, basis="total", prune=("hidden", "channel"),
                 allocation="uniform", limits={"hidden": 0.5})
    pruned = copy.deepcopy(model)
    after = apply_plan(pruned, plan)
    assert len(plan.keep_hidden) == HIDDEN // 2 and plan.layers and after.is_uniform()


def test_unreachable_targets_and_bad_settings(model, scores):
    with pytest.raises(PlanError, match="out of reach"):
        _plan(model, scores, target=0.2, basis="kv-cache", prune=("hidden",))
    with pytest.raises(PlanError, match="hidden_multiple must be at least 1"):
        _plan(model, scores, target=0.2, prune=("hidden",), hidden_multiple=0)
    with pytest.raises(PlanError, match="cannot remove"):
        PlannerSettings(target=0.2, prune=("hidden", "channel"), allocation="search").validate()


def test_a_criterion_without_hidden_scores_is_refused(model):
    scores = score_model(model, "block_influence", IDS, progress=False)
    with pytest.raises(PlanError, match=r"no values for \['hidden'\]"):
        _plan(model, scores, target=0.2, prune=("hidden",))


def test_activation_scores_hidden_channels_by_what_the_input_norms_output(model):
    scores = score_model(model, "activation", IDS, progress=False)
    layers = decoder_layers(model, {"layers": "model.layers"})
    captured = [torch.zeros(HIDDEN, dtype=torch.float64) for _ in layers]

    def record(i):
        def hook(module, args, output):
            captured[i].add_(output.double().pow(2).sum((0, 1)))
        return hook

    handles = [norm.register_forward_hook(record(i)) for i, layer in enumerate(layers) for norm in input_norms(layer, _arch(model))]
    with torch.no_grad():
        model(IDS)
    for handle in handles:
        handle.remove()
    for share, expected in zip(scores.values["hidden"], captured):
        torch.testing.assert_close(share, expected.sqrt(), rtol=1e-5, atol=1e-8)


def test_activation_sees_a_dead_residual_channel(family):
    model = tiny_model(family)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 7] = 0
        for layer in decoder_layers(model, _arch(model).to_dict()):
            for norm in input_norms(layer, _arch(model)):
                norm.weight[7] = -_arch(model).norm_weight_offset  # the norm multiplies channel 7 by 0
    scores = score_model(model, "activation", IDS, progress=False)
    summed = torch.stack(scores.values["hidden"]).sum(0)
    others = torch.arange(len(summed)) != 7
    assert summed[7] == 0 and (summed[others] > 0).all()


def test_taylor_scores_hidden_channels_in_loss_units(model):
    scores = score_model(model, "taylor", IDS, batch_size=4, progress=False)
    assert len(scores.values["hidden"]) == 4 and all(v.shape == (HIDDEN,) for v in scores.values["hidden"])
    plan = _plan(model, scores, comparable=True, target=0.25, basis="total", prune=("hidden", "channel"))
    assert plan.keep_hidden is not None or plan.layers


def _arch(model):
    from prunekit import architecture_for

    return architecture_for(model.config.model_type)


def test_cli_hidden_multiple_reaches_the_planner():
    from prunekit.cli import _prune_settings, build_parser

    args = build_parser().parse_args(["prune", "model", "--out", "out", "--target", "0.2", "--prune-structures", "hidden,channel",
                                      "--hidden-multiple", "16"])
    settings = _prune_settings(args).planner_settings()
    assert (settings.hidden_multiple, settings.prune) == (16, ("hidden", "channel"))


def test_saved_scores_with_hidden_shares_load_for_planning(model, scores, tmp_path):
    from prunekit.pipeline import load_scores_for

    scores.save(tmp_path / "scores.json")
    loaded = load_scores_for(tmp_path / "scores.json", model_structure(model))
    assert all(torch.equal(a, b) for a, b in zip(loaded.values["hidden"], scores.values["hidden"]))
    assert _plan(model, loaded, target=0.2, basis="total", prune=("hidden",)).keep_hidden is not None


@pytest.mark.parametrize("args, message", [(("--structures", "hidden,embedding"), "unknown structures ['embedding']"),
                                           (("--ratios", "20%"), "--ratios takes fractions")])
def test_hidden_benchmark_refuses_bad_arguments_before_loading(args, message, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "hidden_pruning.py"
    result = subprocess.run([sys.executable, str(script), "--model", "no-such-model", *args, "--out", str(tmp_path / "r.json")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "r.json").exists()


def test_layer_by_layer_activation_scores_hidden_channels_alike(model):
    whole = score_model(model, "activation", IDS, progress=False)
    by_layer = score_model(model, "activation", IDS, progress=False, layer_by_layer=True, device="cpu")
    for a, b in zip(whole.values["hidden"], by_layer.values["hidden"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
