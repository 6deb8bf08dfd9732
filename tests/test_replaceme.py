"""ReplaceMe: dropped layers that add nothing leave the model unchanged; a fitted replacement is
closer to the unpruned model than a plain drop; spans at layer 0 stay plain drops; families whose
MLP output passes a norm before the residual add are refused; an empty plan changes nothing."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from prunekit import Plan, apply_plan
from prunekit.compensate import CompensationError
from prunekit.compensate.replaceme import dropped_spans, replace_dropped_layers, solve_replacement
from prunekit.models.architecture import architecture_for
from prunekit.models.modeling_prunekit import decoder_layers

IDS = torch.randint(3, 259, (16, 32), generator=torch.Generator().manual_seed(0))
MANY = torch.randint(3, 259, (128, 32), generator=torch.Generator().manual_seed(2))  # 4,096 tokens for 48 x 48
FRESH = torch.randint(3, 259, (16, 32), generator=torch.Generator().manual_seed(1))

pytestmark = pytest.mark.usefixtures("one_thread")


def _kl(reference, model, ids=FRESH) -> float:
    with torch.no_grad():
        p = reference(ids).logits.log_softmax(-1)
        q = model(ids).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_spans_are_maximal_runs():
    assert dropped_spans((5, 2, 3, 7, 8, 0)) == [(0,), (2, 3), (5,), (7, 8)]
    assert dropped_spans(()) == []


def test_the_solution_is_the_identity_when_the_target_is_the_input():
    m = torch.randn(200, 6, dtype=torch.float64)
    torch.testing.assert_close(solve_replacement(m.T @ m, m.T @ m), torch.eye(6, dtype=torch.float64))
    t = torch.randn(6, 6, dtype=torch.float64)
    torch.testing.assert_close(solve_replacement(m.T @ m, m.T @ (m @ t), ridge=0.0), t)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_dropped_layers_that_add_nothing_leave_the_model_as_it_was(family):
    model = tiny_model(family, num_hidden_layers=5)
    arch = architecture_for(model.config.model_type)
    with torch.no_grad():
        for index in (2, 3):  # these layers now pass the residual stream through untouched
            layer = decoder_layers(model, arch.to_dict())[index]
            getattr(getattr(layer, arch.attention), arch.o_proj).weight.zero_()
            getattr(getattr(layer, arch.mlp), arch.down_proj).weight.zero_()
    dense = copy.deepcopy(model)
    plan = Plan(drop_layers=(2, 3))
    report = replace_dropped_layers(model, plan, IDS, progress=False)
    apply_plan(model, plan)
    assert report.fits[0].kept_layer == 1 and report.fits[0].dropped == (2, 3)
    torch.testing.assert_close(model(FRESH).logits, dense(FRESH).logits, rtol=1e-4, atol=1e-4)


def test_a_replacement_is_closer_to_the_unpruned_model_than_a_plain_drop():
    dense = tiny_model("llama", num_hidden_layers=6)
    plain, replaced = copy.deepcopy(dense), copy.deepcopy(dense)
    plan = Plan(drop_layers=(3, 4))
    report = replace_dropped_layers(replaced, plan, MANY, progress=False)
    apply_plan(plain, plan)
    apply_plan(replaced, plan)
    assert 0 <= report.fits[0].relative_error < 1
    assert _kl(dense, replaced, MANY) < _kl(dense, plain, MANY)
    assert _kl(dense, replaced) < _kl(dense, plain)  # on rows it was not fitted on too


def test_a_span_at_layer_zero_stays_a_plain_drop_and_an_empty_plan_changes_nothing():
    model = tiny_model("llama")
    before = copy.deepcopy(model)
    report = replace_dropped_layers(model, Plan(drop_layers=(0, 1)), IDS, progress=False)
    assert report.fits == () and report.skipped == ((0, 1),)
    assert replace_dropped_layers(model, Plan(), IDS, progress=False).fits == ()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))


def test_a_family_with_a_norm_after_the_mlp_is_refused():
    with pytest.raises(CompensationError, match="post_feedforward_layernorm"):
        replace_dropped_layers(tiny_model("gemma2"), Plan(drop_layers=(2,)), IDS, progress=False)


def test_prune_replaces_dropped_layers_from_the_cli(tmp_path, tokenizer):
    import json

    from prunekit import save_model
    from prunekit.cli import main

    save_model(tiny_model("llama", num_hidden_layers=6), tokenizer, tmp_path / "model")
    (tmp_path / "text.txt").write_text("The cat sat on the mat. The dog sat on the log. " * 200)
    Plan(drop_layers=(3, 4)).save(tmp_path / "plan.json")
    common = ["--plan", str(tmp_path / "plan.json"), "--calib", str(tmp_path / "text.txt"), "--calib-samples", "16",
              "--calib-seq-len", "32", "--compensation", "none"]
    assert main(["prune", str(tmp_path / "model"), "--out", str(tmp_path / "plain"), *common]) == 0
    assert main(["prune", str(tmp_path / "model"), "--out", str(tmp_path / "replaced"), "--replace-dropped-layers",
                 *common]) == 0
    step = json.loads((tmp_path / "replaced" / "prunekit.json").read_text())["pruning"]["steps"][0]
    assert step["replaced_dropped_layers"]["fits"][0]["dropped"] == [3, 4]
    import prunekit

    dense = prunekit.load(tmp_path / "model")[0]
    plain, replaced = prunekit.load(tmp_path / "plain")[0], prunekit.load(tmp_path / "replaced")[0]
    assert _kl(dense, replaced) != _kl(dense, plain)
