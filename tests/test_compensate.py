"""Compensation: the least-squares refit is the least-squares solution and never hurts on the
calibration data; in a model it brings pruned blocks and logits closer to the original; the
Llama bias option survives a stock save; everything is refused before any weight changes."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, tiny_model

import prunekit
from prunekit import LayerPlan, Plan, apply_plan, architecture_for, save_model
from prunekit.compensate import (
    CompensationError,
    augment_gram,
    compensate,
    mean_replacement_bias,
    reconstruction_error,
    refit_kept_columns,
)
from prunekit.models.modeling_prunekit import decoder_layers
from prunekit.score.statistics import collect_layer_stats

HEAD_DIM, HEADS, FFN = 12, 8, 80
CALIBRATION = torch.randint(3, 259, (8, 32), generator=torch.Generator().manual_seed(0))  # 256 tokens

WIDTH = Plan(layers={1: LayerPlan(keep_query_heads=(0, 1, 2, 4, 5, 6), keep_channels=tuple(range(0, FFN, 2)))})
MIXED = Plan(
    layers={
        0: LayerPlan(drop_attention=True, keep_channels=tuple(range(10, FFN))),
        1: LayerPlan(keep_query_heads=(1, 2, 3, 5, 6, 7), keep_channels=tuple(range(40))),
        3: LayerPlan(keep_kv_groups=(0,), drop_mlp=True),
    },
    drop_layers=(2,),
)
MIXED_FITS = {(0, "mlp"), (1, "attention"), (1, "mlp"), (3, "attention")}  # the width-pruned sublayers
MODERATE = Plan(layers={i: LayerPlan(keep_query_heads=(0, 1, 2, 4, 5, 6), keep_channels=tuple(range(0, FFN, 2)))
                        for i in range(4)})
UNIFORM = Plan(layers={i: LayerPlan(keep_kv_groups=(1,), keep_channels=tuple(range(0, FFN, 2))) for i in (0, 1, 3)},
               drop_layers=(2,))


def _stats(model, with_gram: bool = True):
    return collect_layer_stats(model, CALIBRATION, with_gram=with_gram, progress=False)


def _state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _unchanged(model, state: dict[str, torch.Tensor]) -> bool:
    current = model.state_dict()
    return current.keys() == state.keys() and all(torch.equal(current[k], state[k]) for k in state)


def _pruned(model, plan, stats=None, **options):
    """A copy of `model` pruned to `plan`, compensated first when `stats` are given."""
    model = copy.deepcopy(model)
    if stats is not None:
        compensate(model, plan, stats, **options)
    apply_plan(model, plan)
    return model


# --------------------------------------------------------------------------- tensor math


def _calibration(features: int = 10, tokens: int = 200, out: int = 5):
    """Correlated features with non-zero means, like real activations, and a projection."""
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(features, features, generator=generator, dtype=torch.float64)
    x = mixing @ torch.randn(features, tokens, generator=generator, dtype=torch.float64)
    x += torch.randn(features, 1, generator=generator, dtype=torch.float64)
    weight = torch.randn(out, features, generator=generator, dtype=torch.float64)
    return x, weight, torch.tensor([0, 2, 3, 5, 8, 9])


def _full(new_kept: torch.Tensor, keep: torch.Tensor, width: int) -> torch.Tensor:
    full = new_kept.new_zeros(new_kept.shape[0], width)
    full[:, keep] = new_kept
    return full


def test_refit_is_the_least_squares_solution():
    x, weight, keep = _calibration()
    refit = refit_kept_columns(weight, x @ x.T, keep, ridge=0.0)
    expected = torch.linalg.lstsq(x[keep].T, (weight @ x).T).solution.T
    torch.testing.assert_close(refit, expected)
    # The Gram-only error is the error measured on the activations themselves.
    direct = ((weight @ x - refit @ x[keep]).square().sum() / (weight @ x).square().sum()).item()
    assert reconstruction_error(weight, _full(refit, keep, 10), x @ x.T) == pytest.approx(direct, rel=1e-9)


def test_ridge_shrinks_toward_plain_pruning_and_never_hurts():
    x, weight, keep = _calibration()
    gram = x @ x.T
    plain = _full(weight[:, keep], keep, 10)
    before = reconstruction_error(weight, plain, gram)
    errors = [reconstruction_error(weight, _full(refit_kept_columns(weight, gram, keep, ridge), keep, 10), gram)
              for ridge in (0.0, 1e-3, 1e-1, 10.0)]
    assert errors == sorted(errors) and errors[-1] < before
    torch.testing.assert_close(refit_kept_columns(weight, gram, keep, ridge=1e12), weight[:, keep])
    torch.testing.assert_close(refit_kept_columns(weight, gram, torch.arange(10), ridge=1e-3), weight)


def test_joint_bias_fit_beats_either_alone():
    x, weight, keep = _calibration()
    tokens = x.shape[1]
    gram, augmented = x @ x.T, augment_gram(x @ x.T, x.sum(1), tokens)
    with_one = torch.cat([x, torch.ones(1, tokens, dtype=x.dtype)])
    torch.testing.assert_close(augmented, with_one @ with_one.T)
    padded, keep_one = torch.cat([weight, weight.new_zeros(5, 1)], 1), torch.cat([keep, torch.tensor([10])])
    joint = refit_kept_columns(padded, augmented, keep_one, ridge=0.0)
    torch.testing.assert_close(joint, torch.linalg.lstsq(with_one[keep_one].T, (weight @ x).T).solution.T)
    flap = torch.cat([weight[:, keep], mean_replacement_bias(weight, x.mean(1), keep)[:, None]], 1)
    least_squares = _full(refit_kept_columns(weight, gram, keep, ridge=0.0), keep, 10)
    errors = {
        "joint": reconstruction_error(padded, _full(joint, keep_one, 11), augmented),
        "flap": reconstruction_error(padded, _full(flap, keep_one, 11), augmented),
        "least_squares": reconstruction_error(weight, least_squares, gram),
        "plain": reconstruction_error(weight, _full(weight[:, keep], keep, 10), gram),
    }
    assert errors["joint"] < min(errors["flap"], errors["least_squares"]) and errors["flap"] < errors["plain"]


def test_a_singular_gram_needs_a_ridge():
    x, weight, keep = _calibration()
    x[[2, 3]] = 0  # dead kept features, as in channels that never fire on the calibration data
    with pytest.raises(CompensationError, match="singular.*positive ridge"):
        refit_kept_columns(weight, x @ x.T, keep, ridge=0.0)
    assert refit_kept_columns(weight, x @ x.T, keep).isfinite().all()
    x[keep] = 0  # nothing kept ever fires: nothing to refit, and no singular solve either
    torch.testing.assert_close(refit_kept_columns(weight, x @ x.T, keep, ridge=0.0), weight[:, keep])


# --------------------------------------------------------------------------- models


def test_refit_reduces_every_calibration_error(family):
    model = tiny_model(family)
    report = compensate(model, MIXED, _stats(model))
    assert {(fit.layer, fit.sublayer) for fit in report.fits} == MIXED_FITS  # dropped sublayers get nothing
    for fit in report.fits:
        assert 0 <= fit.error_after < fit.error_before, fit
    assert json.loads(json.dumps(report.to_dict()))["fits"][0]["layer"] == 0 and "->" in report.table()


def test_report_matches_the_pruned_projections(family):
    """The errors the report computes from G are those of the pruned model's o_proj and down_proj
    on the captured inputs: the kept columns land where surgery keeps them (fused families too)."""
    arch = architecture_for(family)
    model = tiny_model(family)
    layer = decoder_layers(model, arch.to_dict())[1]
    projections = {"attention": getattr(getattr(layer, arch.attention), arch.o_proj),
                   "mlp": getattr(getattr(layer, arch.mlp), arch.down_proj)}
    originals = {k: copy.deepcopy(p) for k, p in projections.items()}
    inputs: dict[str, torch.Tensor] = {}
    handles = [p.register_forward_pre_hook(lambda m, args, k=k: inputs.__setitem__(k, args[0])) for k, p in projections.items()]
    with torch.no_grad():
        model(CALIBRATION)
    for handle in handles:
        handle.remove()
    stats = _stats(model)
    report = compensate(model, WIDTH, stats)
    apply_plan(model, WIDTH)
    pruned = decoder_layers(model, arch.to_dict())[1]
    kept = {"attention": [h * HEAD_DIM + d for h in (0, 1, 2, 4, 5, 6) for d in range(HEAD_DIM)],
            "mlp": list(range(0, FFN, 2))}
    for fit in report.fits:
        projection = getattr(getattr(pruned, arch.attention), arch.o_proj) if fit.sublayer == "attention" \
            else getattr(getattr(pruned, arch.mlp), arch.down_proj)
        x = inputs[fit.sublayer]
        target = originals[fit.sublayer](x)
        error = (projection(x[..., kept[fit.sublayer]]) - target).square().sum() / target.square().sum()
        assert error.item() == pytest.approx(fit.error_after, rel=1e-3, abs=1e-6)


def test_empty_plan_changes_nothing(family):
    model = tiny_model(family)
    state, config = _state(model), model.config.to_dict()
    stats = _stats(model)
    full = Plan(layers={1: LayerPlan(keep_query_heads=tuple(range(HEADS)), keep_channels=tuple(range(FFN)))})
    options = [dict(), dict(bias=True)] if family == "llama" else [dict()]
    for plan in (Plan(), full):
        for option in options:
            assert compensate(model, plan, stats, **option).fits == ()
    assert _unchanged(model, state) and model.config.to_dict() == config


def test_compensated_block_output_is_closer(family):
    """Only layer 1 is narrowed, so layer 1's inputs are the original's and hidden_states[2] is
    its output: the block's error on the calibration inputs, with and without the refit."""
    model = tiny_model(family)
    stats = _stats(model)
    variants = {"plain": _pruned(model, WIDTH), "least squares": _pruned(model, WIDTH, stats)}
    if family == "llama":
        variants["least squares + bias"] = _pruned(model, WIDTH, stats, bias=True)
    with torch.no_grad():
        original = model(CALIBRATION, output_hidden_states=True).hidden_states[2]
        errors = {name: (m(CALIBRATION, output_hidden_states=True).hidden_states[2] - original).square().mean().item()
                  for name, m in variants.items()}
    assert all(error < errors["plain"] for name, error in errors.items() if name != "plain"), errors

def test_whole_model_loss_is_lower(family):
    """The loss is the KL divergence from the original model's next-token distributions on the
    calibration tokens: on random tokens a random model's cross-entropy is about log(vocab)
    whatever is pruned, so it cannot show fidelity."""
    model = tiny_model(family)
    stats = _stats(model)
    with torch.no_grad():
        reference = model(CALIBRATION).logits.log_softmax(-1)

        def loss(m) -> float:
            log_probs = m(CALIBRATION).logits.log_softmax(-1)
            return F.kl_div(log_probs, reference, log_target=True, reduction="batchmean").item()

        assert loss(_pruned(model, MODERATE, stats)) < loss(_pruned(model, MODERATE))


@pytest.mark.parametrize("plan", [UNIFORM, MIXED], ids=["uniform", "uneven"])
def test_llama_bias_saves_and_reloads(plan, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    report = compensate(model, plan, _stats(model), bias=True)
    assert report.bias and report.fits
    apply_plan(model, plan)
    saved = save_model(model, tokenizer, tmp_path / "out", plan=plan)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"]
    if plan is UNIFORM:
        assert saved.format == "stock" and config["model_type"] == "llama"
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    else:
        reloaded, _ = prunekit.load(tmp_path / "out", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(CALIBRATION).logits, model(CALIBRATION).logits, atol=0, rtol=0)
    o_proj = decoder_layers(reloaded, architecture_for("llama").to_dict())[1].self_attn.o_proj
    assert o_proj.bias.abs().sum() > 0


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama"])
def test_bias_is_refused_for_families_that_cannot_save_it(family):
    model = tiny_model(family)
    state = _state(model)
    with pytest.raises(CompensationError, match=rf"supported: llama\), and '{family}' is not one; compensate with bias=False"):
        compensate(model, MIXED, [], bias=True)  # refused before the statistics are even looked at
    assert _unchanged(model, state)


def test_bias_alone_is_flap():
    """least_squares=False keeps the kept columns and adds W_R · mean(X_R); no Gram is needed."""
    model = tiny_model("llama")
    stats = _stats(model, with_gram=False)
    o_proj = decoder_layers(model, architecture_for("llama").to_dict())[1].self_attn.o_proj
    weight = o_proj.weight.detach().clone()
    kept = torch.tensor([h * HEAD_DIM + d for h in (0, 1, 2, 4, 5, 6) for d in range(HEAD_DIM)])
    report = compensate(model, WIDTH, stats, least_squares=False, bias=True)
    assert all(fit.error_before is None and fit.error_after is None for fit in report.fits)
    assert torch.equal(o_proj.weight[:, kept], weight[:, kept])
    expected = mean_replacement_bias(weight.double(), stats[1].attention_input.mean, kept).float()
    torch.testing.assert_close(o_proj.bias, expected)


def test_unusable_requests_are_refused_before_any_change():
    model = tiny_model("llama")
    state = _state(model)
    cases = [
        (dict(stats=_stats(model, with_gram=False)), r"needs Gram matrices.*with_gram=True"),
        (dict(stats=_stats(model)[:3]), r"statistics for 3 layers, but the model has 4"),
        (dict(stats=_stats(model), ridge=-1.0), r"ridge must be a positive finite number"),
        (dict(stats=_stats(model), least_squares=False), r"nothing to compensate"),
        (dict(stats=_stats(model), plan=Plan(layers={1: LayerPlan(keep_channels=(80,))})), r"out of range"),
    ]
    for kwargs, message in cases:
        kwargs = {"plan": MIXED, **kwargs}
        with pytest.raises(ValueError, match=message):
            compensate(model, **kwargs)
    assert _unchanged(model, state)
