"""Sequential compensation: on the first pruned sublayer it equals the one-shot refit (the
pruned and original streams still agree there); every fit lowers its layer's reconstruction
error; dropped layers and sublayers are handled; the result keeps the model close to the original."""
from __future__ import annotations

import copy

import torch
from conftest import tiny_model

from prunekit import LayerPlan, Plan, apply_plan
from prunekit.compensate import compensate, compensate_sequential
from prunekit.score import collect_layer_stats

IDS = torch.randint(3, 259, (16, 24), generator=torch.Generator().manual_seed(0))
PLAN = Plan(layers={
    1: LayerPlan(keep_channels=tuple(range(0, 80, 2)), keep_query_heads=(0, 1, 2, 4, 5, 6)),
    2: LayerPlan(keep_channels=tuple(range(30))),
    3: LayerPlan(keep_kv_groups=(1,), keep_channels=tuple(range(40, 80))),
})
KEPT_O_COLUMNS = [c for h in (0, 1, 2, 4, 5, 6) for c in range(h * 12, (h + 1) * 12)]


def _kl_to(reference, model) -> float:
    with torch.no_grad():
        p = reference(IDS).logits.log_softmax(-1)
        q = model(IDS).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_first_pruned_sublayer_matches_one_shot_and_every_fit_helps(family):
    model = tiny_model(family)
    sequential, one_shot = copy.deepcopy(model), copy.deepcopy(model)
    report = compensate_sequential(sequential, PLAN, IDS, batch_size=8, progress=False, autocast=False)
    compensate(one_shot, PLAN, collect_layer_stats(model, IDS, with_gram=True, progress=False))
    torch.testing.assert_close(sequential.model.layers[1].self_attn.o_proj.weight[:, KEPT_O_COLUMNS],
                               one_shot.model.layers[1].self_attn.o_proj.weight[:, KEPT_O_COLUMNS], rtol=1e-4, atol=1e-5)
    assert [(f.layer, f.sublayer) for f in report.fits] == [(1, "attention"), (1, "mlp"), (2, "mlp"), (3, "attention"),
                                                            (3, "mlp")]
    assert all(f.error_after < f.error_before for f in report.fits)


def test_compensated_model_is_closer_to_the_original():
    model = tiny_model("llama")
    plain, sequential = copy.deepcopy(model), copy.deepcopy(model)
    compensate_sequential(sequential, PLAN, IDS, progress=False)
    for pruned in (plain, sequential):
        apply_plan(pruned, PLAN)
    assert _kl_to(model, sequential) < _kl_to(model, plain)


def test_removed_columns_are_zeroed_so_the_cut_changes_nothing():
    model = tiny_model("qwen2")
    compensate_sequential(model, PLAN, IDS, progress=False, autocast=False)
    before = model(IDS).logits
    apply_plan(model, PLAN)
    torch.testing.assert_close(model(IDS).logits, before, atol=2e-5, rtol=1e-4)


def test_dropped_layers_and_sublayers_are_passed_over():
    model = tiny_model("gemma2")
    plan = Plan(layers={0: LayerPlan(drop_attention=True), 2: LayerPlan(keep_channels=tuple(range(40)))},
                drop_layers=(1,))
    report = compensate_sequential(model, plan, IDS, progress=False)
    assert [(f.layer, f.sublayer) for f in report.fits] == [(2, "mlp")]
    with torch.no_grad():  # a dropped layer is left for surgery: zeroing its outputs is the same
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    reference = model(IDS).logits
    apply_plan(model, plan)
    torch.testing.assert_close(model(IDS).logits, reference, atol=2e-5, rtol=1e-4)


def test_one_pass_for_the_mlp_equals_running_the_refitted_layer_again(monkeypatch, family):
    """The MLP's pass advances the stream and is then corrected for the refit (families without a
    norm after the MLP): the same weights, to float32 rounding, as running the layer a third time."""
    from prunekit.compensate import sequential as module

    model = tiny_model(family)
    reference = copy.deepcopy(model)
    compensate_sequential(model, PLAN, IDS, batch_size=8, progress=False, autocast=False)
    refit = module._solve_projection
    monkeypatch.setattr(module, "_solve_projection", lambda *a, **k: refit(*a, **{**k, "advance": False}))
    compensate_sequential(reference, PLAN, IDS, batch_size=8, progress=False, autocast=False)
    # The refit amplifies float32 rounding of its inputs by up to 1/ridge, so the weights agree to
    # about 1e-4 of their scale; what they compute agrees closely.
    for got, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-3 * float(expected.detach().abs().max()))
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference(IDS).logits, rtol=1e-4, atol=1e-4)


def test_bfloat16_autocast_changes_the_fit_by_rounding_only():
    """Under bf16 autocast (the default where bf16 products are fast) the layers run in bf16 and
    the fit stays float64: every projection's error after the refit stays within a few percent of
    the float32 run's, and the compensated model as close to the original."""
    import pytest

    from prunekit.models.precision import fast_bfloat16

    if not fast_bfloat16("cpu"):
        pytest.skip("this CPU has no fast bf16 products, so autocast is off")
    model = tiny_model("llama")
    exact, lowered = copy.deepcopy(model), copy.deepcopy(model)
    exact_report = compensate_sequential(exact, PLAN, IDS, progress=False, autocast=False)
    lowered_report = compensate_sequential(lowered, PLAN, IDS, progress=False, autocast=True)
    for a, b in zip(exact_report.fits, lowered_report.fits):
        assert b.error_after == pytest.approx(a.error_after, rel=0.05, abs=1e-4)
    for pruned in (exact, lowered):
        apply_plan(pruned, PLAN)
    assert _kl_to(model, lowered) < 1.05 * _kl_to(model, exact)
