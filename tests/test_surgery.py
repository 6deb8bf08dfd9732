"""Surgery invariances on every family: removing a component equals zeroing its contribution,
an empty plan changes nothing, the KV cache agrees with no cache, parameter counts match."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model, zero_contributions

from prunekit import LayerPlan, Plan, apply_plan, architecture_for, model_structure, predicted_structure
from prunekit.models.modeling_prunekit import decoder_layers

HEAD_DIM, HEADS, GROUPS, FFN, LAYERS = 12, 8, 2, 80, 4
PER_GROUP = HEADS // GROUPS


def _layers(model):
    return decoder_layers(model, architecture_for(model.config.model_type).to_dict())


def _zero(model, layer: int, **parts) -> None:
    zero_contributions(model, layer, head_dim=HEAD_DIM, **parts)


def _keep(removed, size):
    return tuple(i for i in range(size) if i not in set(removed))


# Each case: (name, plan, zeroing) with the removed units spelled out once for both.
CASES = {
    "kv_group": (Plan(layers={1: LayerPlan(keep_kv_groups=(1,))}), [dict(layer=1, heads=range(0, 4))]),
    "heads_per_group": (Plan(layers={2: LayerPlan(keep_query_heads=_keep({1, 6}, HEADS))}), [dict(layer=2, heads=(1, 6))]),
    "channels": (Plan(layers={0: LayerPlan(keep_channels=_keep({0, 5, 17, 79}, FFN))}), [dict(layer=0, channels=(0, 5, 17, 79))]),
    "drop_attention": (Plan(layers={0: LayerPlan(drop_attention=True)}), [dict(layer=0, attention=True)]),
    "drop_mlp": (Plan(layers={3: LayerPlan(drop_mlp=True)}), [dict(layer=3, mlp=True)]),
    "drop_layer": (Plan(drop_layers=(2,)), [dict(layer=2, attention=True, mlp=True)]),
    "mixed": (
        Plan(
            layers={
                0: LayerPlan(drop_attention=True, keep_channels=_keep(range(10), FFN)),
                1: LayerPlan(keep_query_heads=_keep({0, 4}, HEADS), keep_channels=_keep(range(40, 80), FFN)),
                3: LayerPlan(keep_kv_groups=(0,), drop_mlp=True),
            },
            drop_layers=(2,),
        ),
        [dict(layer=0, attention=True, channels=range(10)), dict(layer=1, heads=(0, 4), channels=range(40, 80)),
         dict(layer=3, heads=range(4, 8), mlp=True), dict(layer=2, attention=True, mlp=True)],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_removal_equals_zeroing(family, case):
    plan, zeroing = CASES[case]
    pruned = tiny_model(family)
    zeroed = copy.deepcopy(pruned)
    for z in zeroing:
        _zero(zeroed, **z)
    x = torch.randint(3, 259, (2, 11))
    predicted = predicted_structure(plan, model_structure(pruned))
    after = apply_plan(pruned, plan)
    torch.testing.assert_close(pruned(x).logits, zeroed(x).logits, atol=2e-5, rtol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) == predicted.total_params == after.total_params
    assert after.layers == predicted.layers


def test_pruned_model_is_physically_smaller(family):
    model = tiny_model(family)
    plan, _ = CASES["mixed"]
    apply_plan(model, plan)
    layers = _layers(model)
    assert len(layers) == 3 and model.config.num_hidden_layers == 3
    arch = architecture_for(family)
    attention = getattr(layers[1], arch.attention)
    q_rows = (getattr(attention, arch.qkv_proj).out_features - 2 * GROUPS * HEAD_DIM) if arch.qkv_proj \
        else getattr(attention, arch.q_proj).out_features
    assert q_rows == 6 * HEAD_DIM
    assert getattr(getattr(layers[1], arch.mlp), arch.down_proj).in_features == 40
    assert not any(p.numel() == 0 for p in model.parameters())
    if getattr(model.config, "layer_types", None):
        assert len(model.config.layer_types) == 3


def test_empty_plan_is_identity(family):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    x = torch.randint(3, 259, (2, 7))
    apply_plan(model, Plan())
    apply_plan(model, Plan(layers={1: LayerPlan(keep_query_heads=tuple(range(HEADS)), keep_channels=tuple(range(FFN)))}))
    assert type(model) is type(reference) and model.config.to_dict() == reference.config.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert torch.equal(model(x).logits, reference(x).logits)


@pytest.mark.parametrize("case", ["mixed", "drop_attention", "uniform"])
def test_generation_with_cache_equals_without(family, case):
    uniform = Plan(
        layers={i: LayerPlan(keep_kv_groups=(1,), keep_channels=_keep(range(i, 80, 5), FFN)) for i in (0, 1, 3)},
        drop_layers=(2,),
    )
    plan = uniform if case == "uniform" else CASES[case][0]
    model = tiny_model(family)
    apply_plan(model, plan)
    prompt = torch.randint(3, 259, (2, 5))
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **settings)
    without_cache = model.generate(prompt, use_cache=False, **settings)
    assert with_cache.shape[1] == 17
    assert torch.equal(with_cache, without_cache)


def test_gqa_counts_follow_the_plan(family):
    model = tiny_model(family)
    apply_plan(model, Plan(layers={0: LayerPlan(keep_kv_groups=(0,)), 1: LayerPlan(keep_query_heads=(0, 1, 4, 5))}))
    shapes = model_structure(model).layers
    assert (shapes[0].num_attention_heads, shapes[0].num_key_value_heads) == (4, 1)
    assert (shapes[1].num_attention_heads, shapes[1].num_key_value_heads) == (4, 2)
    assert shapes[2].heads_per_group == 4


def test_structure_counts_every_parameter(family):
    model = tiny_model(family)
    structure = model_structure(model)
    assert structure.total_params == sum(p.numel() for p in model.parameters())
    assert structure.layers[0].num_attention_heads == HEADS and structure.layers[0].intermediate_size == FFN
    assert structure.is_uniform()
