"""Property-based surgery checks: random plans on random tiny architectures of every family (GQA
ratios, odd widths, one to three layers) always give a model that runs and whose invariants hold:
removal equals zeroing, parameter counts equal the prediction, the KV cache equals no cache, and
a save reloads with the same logits."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, byte_tokenizer, tiny_model, zero_contributions

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import prunekit  # noqa: E402
from prunekit import LayerPlan, Plan, apply_plan, model_structure, predicted_structure  # noqa: E402


@st.composite
def architectures_and_plans(draw):
    family = draw(st.sampled_from(FAMILIES))
    groups, per_group = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3]))
    heads, head_dim = groups * per_group, draw(st.sampled_from([4, 8]))
    layers, ffn = draw(st.integers(1, 3)), draw(st.integers(3, 37))
    config = dict(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim,
                  hidden_size=heads * head_dim * draw(st.sampled_from([1, 2])), intermediate_size=ffn)
    if family == "gemma3_text":
        config["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"][:layers]
    dropped = draw(st.sets(st.integers(0, layers - 1), max_size=layers - 1))
    layer_plans, zeroing = {}, []
    for layer in range(layers):
        if layer in dropped:
            zeroing.append(dict(layer=layer, heads=range(heads), channels=range(ffn)))
            continue
        attention, mlp = draw(st.sampled_from(["keep", "drop", "groups", "heads"])), draw(st.sampled_from(["keep", "drop", "channels"]))
        if attention == "drop" and mlp == "drop":
            mlp = "keep"  # a layer with nothing left is dropped as a layer, not by emptying it
        plan, removed_heads, removed_channels = {}, set(), set()
        if attention == "drop":
            plan["drop_attention"], removed_heads = True, set(range(heads))
        elif attention in ("groups", "heads"):
            kept_groups = sorted(draw(st.sets(st.integers(0, groups - 1), min_size=1, max_size=groups)))
            count = draw(st.integers(1, per_group)) if attention == "heads" else per_group
            kept = [g * per_group + h for g in kept_groups
                    for h in sorted(draw(st.permutations(range(per_group)))[:count])]
            plan["keep_kv_groups"], plan["keep_query_heads"] = tuple(kept_groups), tuple(kept)
            removed_heads = set(range(heads)) - set(kept)
        if mlp == "drop":
            plan["drop_mlp"], removed_channels = True, set(range(ffn))
        elif mlp == "channels":
            kept = draw(st.sets(st.integers(0, ffn - 1), min_size=1, max_size=ffn))
            plan["keep_channels"], removed_channels = tuple(sorted(kept)), set(range(ffn)) - kept
        if plan:
            layer_plans[layer] = LayerPlan(**plan)
        zeroing.append(dict(layer=layer, heads=removed_heads, channels=removed_channels))
    return family, config, Plan(layers=layer_plans, drop_layers=tuple(sorted(dropped))), zeroing, head_dim


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=architectures_and_plans())
def test_random_plans_keep_every_invariant(case, tmp_path_factory):
    family, config, plan, zeroing, head_dim = case
    pruned = tiny_model(family, **config)
    zeroed = copy.deepcopy(pruned)
    for z in zeroing:
        zero_contributions(zeroed, head_dim=head_dim, **z)
    predicted = predicted_structure(plan, model_structure(pruned))
    after = apply_plan(pruned, plan)
    assert sum(p.numel() for p in pruned.parameters()) == predicted.total_params == after.total_params

    x = torch.randint(3, 259, (2, 9))
    with torch.no_grad():
        logits = pruned(x).logits
        torch.testing.assert_close(logits, zeroed(x).logits, atol=2e-5, rtol=1e-4)
    generate = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(pruned.generate(x[:, :4], use_cache=True, **generate),
                       pruned.generate(x[:, :4], use_cache=False, **generate))

    out = tmp_path_factory.mktemp("saved")
    prunekit.save_model(pruned, byte_tokenizer(), out / "model", plan=plan, force=True)
    reloaded, _ = prunekit.load(out / "model")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, logits, atol=1e-6, rtol=1e-6)
