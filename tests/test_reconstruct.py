"""Block reconstruction: zero steps change nothing; a model that is its own target stays as it is;
training never leaves a layer worse on the held-apart rows and brings the pruned model closer to
the dense one; the same seed gives the same weights; dropped layers map to their sources."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from prunekit import LayerPlan, Plan, apply_plan
from prunekit.compensate import CompensationError, compensate_sequential
from prunekit.compensate.reconstruct import dense_layer_copies, reconstruct_blocks

IDS = torch.randint(3, 259, (48, 32), generator=torch.Generator().manual_seed(0))
FRESH = torch.randint(3, 259, (32, 32), generator=torch.Generator().manual_seed(1))  # never trained on
PLAN = Plan(layers={
    1: LayerPlan(keep_channels=tuple(range(0, 80, 2)), keep_query_heads=(0, 1, 2, 4, 5, 6)),
    2: LayerPlan(keep_channels=tuple(range(30))),
    3: LayerPlan(keep_kv_groups=(1,), keep_channels=tuple(range(40, 80))),
})

pytestmark = pytest.mark.usefixtures("one_thread")


def _pruned(family: str = "llama", plan: Plan = PLAN):
    model = tiny_model(family)
    dense = copy.deepcopy(model)
    layers = dense_layer_copies(model)
    compensate_sequential(model, plan, IDS, progress=False)
    apply_plan(model, plan)
    return dense, layers, model


def _kl(reference, model) -> float:
    with torch.no_grad():
        p = reference(FRESH).logits.log_softmax(-1)
        q = model(FRESH).logits.log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def _same_weights(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_zero_steps_change_nothing():
    _, layers, model = _pruned()
    before = copy.deepcopy(model)
    report = reconstruct_blocks(model, layers, IDS, steps=0, progress=False)
    assert report.layers == () and _same_weights(model, before)


def test_a_model_that_is_its_own_target_stays_as_it_is():
    model = tiny_model("qwen2")
    before = copy.deepcopy(model)
    report = reconstruct_blocks(model, dense_layer_copies(model), IDS, steps=10, eval_every=5, progress=False)
    assert all(layer.error_before == 0 and layer.best_step == 0 for layer in report.layers)
    assert _same_weights(model, before)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_training_helps_and_never_hurts_the_held_out_rows(family):
    dense, layers, model = _pruned(family)
    kl_before = _kl(dense, model)
    report = reconstruct_blocks(model, layers, IDS, steps=60, lr=3e-4, batch_size=8, eval_every=10, progress=False)
    assert all(r.error_after <= r.error_before for r in report.layers)
    assert any(r.error_after < r.error_before for r in report.layers)
    assert _kl(dense, model) < kl_before
    assert report.held_out_rows == 6 and report.to_dict()["layers"][0]["source_layer"] == 0


def test_same_seed_same_weights():
    _, layers, first = _pruned()
    second = copy.deepcopy(first)
    for model in (first, second):
        reconstruct_blocks(model, layers, IDS, steps=12, lr=1e-3, eval_every=4, seed=3, progress=False)
    assert _same_weights(first, second)


def test_a_killed_reconstruction_resumes_from_its_checkpoints_with_the_same_weights(tmp_path, monkeypatch):
    from prunekit.compensate import reconstruct

    _, layers, straight = _pruned()
    killed = copy.deepcopy(straight)
    settings = dict(steps=12, lr=1e-3, eval_every=4, seed=3, progress=False)
    straight_report = reconstruct_blocks(straight, layers, IDS, **settings)
    train = reconstruct._train_layer
    calls = {"n": 0}

    def dies_in_the_third_layer(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(reconstruct, "_train_layer", dies_in_the_third_layer)
    with pytest.raises(KeyboardInterrupt):
        reconstruct_blocks(killed, layers, IDS, checkpoint_dir=tmp_path, **settings)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layer-0000.pt", "layer-0001.pt"]
    calls["n"] = 10  # no more kills; count what the rerun trains
    _, _, resumed_model = _pruned()  # the same prune again: the weights reconstruction starts from
    report = reconstruct_blocks(resumed_model, layers, IDS, checkpoint_dir=tmp_path, **settings)
    assert calls["n"] == 10 + len(report.layers) - 2  # layers 0 and 1 were loaded, not trained again
    assert _same_weights(resumed_model, straight) and report == straight_report
    # a checkpoint of another prune (other weights) is never loaded
    other = tiny_model("llama", seed=5)
    apply_plan(other, PLAN)
    reconstruct_blocks(other, layers, IDS, checkpoint_dir=tmp_path, **settings)
    assert calls["n"] == 10 + 2 * len(report.layers) - 2


def test_dropped_layers_map_to_their_sources():
    plan = Plan(drop_layers=(1,), layers={2: LayerPlan(keep_channels=tuple(range(40)))})
    dense, layers, model = _pruned("llama", plan)
    report = reconstruct_blocks(model, layers, IDS, steps=8, lr=1e-3, eval_every=4, sources=[0, 2, 3], progress=False)
    assert [r.source_layer for r in report.layers] == [0, 2, 3]
    with pytest.raises(CompensationError, match="source indices"):
        reconstruct_blocks(model, layers, IDS, steps=8, progress=False)


def test_bad_settings_are_refused():
    _, layers, model = _pruned()
    with pytest.raises(CompensationError, match="steps"):
        reconstruct_blocks(model, layers, IDS, steps=-1, progress=False)
    with pytest.raises(CompensationError, match="learning rate"):
        reconstruct_blocks(model, layers, IDS, steps=5, lr=0, progress=False)
    with pytest.raises(CompensationError, match="2 calibration rows"):
        reconstruct_blocks(model, layers, IDS[:1], steps=5, progress=False)
