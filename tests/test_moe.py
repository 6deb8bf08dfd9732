"""Mixtures of experts (issue 23): whole-expert surgery on tiny random models of every MoE family.
Removing an expert equals masking its router logit to -inf; the empty plan is identity; the KV
cache agrees with no cache; saved models reload (stock classes for uniform expert counts, the
remote-code format for uneven ones); attention pruning still works beside the experts."""
from __future__ import annotations

import copy
import types

import pytest
import torch
from conftest import MOE_FAMILIES, assert_reloads_as_saved, tiny_moe_model
from torch.nn import functional as F

from prunekit import LayerPlan, Plan, apply_plan, architecture_for, model_structure, predicted_structure
from prunekit.models.modeling_prunekit import decoder_layers, moe_parts
from prunekit.plan.plan import PlanError

EXPERTS, TOP_K = 6, 2


def _routers(model):
    arch = architecture_for(model.config.model_type)
    for index, layer in enumerate(decoder_layers(model, arch.to_dict())):
        parts = moe_parts(getattr(layer, arch.mlp), arch.to_dict())
        if parts is not None:
            yield index, parts[0]


def _masked_forward(removed: tuple[int, ...]):
    """A router forward that sets the logits of `removed` to -inf before the stock routing math."""
    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        masked = logits.clone()
        masked[:, list(removed)] = float("-inf")
        probs = torch.softmax(masked.float(), dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", True):  # Mixtral always renormalises
            top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return logits, top_value.to(logits.dtype), top_index
    return forward


def _mask(model, removed_by_layer: dict[int, tuple[int, ...]]) -> None:
    for index, router in _routers(model):
        router.forward = types.MethodType(_masked_forward(removed_by_layer.get(index, ())), router)


def _keep(removed, size=EXPERTS):
    return tuple(i for i in range(size) if i not in set(removed))


def _sparse_layers(model) -> list[int]:
    return [index for index, _ in _routers(model)]


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (2, 11), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_masking_router_reproduces_stock_routing(moe_family):
    """The test's masked router with nothing masked is the stock router (anchors the next test)."""
    model = tiny_moe_model(moe_family)
    masked = copy.deepcopy(model)
    _mask(masked, {})
    x = _ids()
    torch.testing.assert_close(masked(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("removed", [(0,), (1, 4), (0, 2, 3, 5)])
@torch.no_grad()
def test_removing_experts_equals_masking_router_logits(moe_family, removed):
    model = tiny_moe_model(moe_family)
    sparse = _sparse_layers(model)
    # a different set in every sparse layer, so that a mix-up between layers shows
    removed_by_layer = {layer: tuple((e + offset) % EXPERTS for e in removed) for offset, layer in enumerate(sparse)}
    masked = copy.deepcopy(model)
    _mask(masked, removed_by_layer)
    plan = Plan(layers={layer: LayerPlan(keep_experts=_keep(r)) for layer, r in removed_by_layer.items()})
    predicted = predicted_structure(plan, model_structure(model))
    after = apply_plan(model, plan)
    assert after == predicted
    assert after.total_params == sum(p.numel() for p in model.parameters())
    for layer in sparse:
        assert after.layers[layer].num_experts == EXPERTS - len(removed)
    x = _ids()
    torch.testing.assert_close(model(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_removing_experts_below_top_k_routes_to_all_left(moe_family):
    model = tiny_moe_model(moe_family)
    sparse = _sparse_layers(model)
    plan = Plan(layers={layer: LayerPlan(keep_experts=(3,)) for layer in sparse})
    masked = copy.deepcopy(model)
    _mask(masked, {layer: _keep((3,)) for layer in sparse})
    for _, router in _routers(masked):
        router.top_k = 1  # -inf logits must not be picked: a model with one expert routes to it alone
    apply_plan(model, plan)
    assert model.config.num_experts_per_tok == 1
    x = _ids()
    torch.testing.assert_close(model(x).logits, masked(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_empty_plan_is_identity(moe_family):
    model = tiny_moe_model(moe_family)
    reference = copy.deepcopy(model)
    plans = [Plan(), Plan(layers={layer: LayerPlan(keep_experts=tuple(range(EXPERTS))) for layer in _sparse_layers(model)})]
    for plan in plans:
        before = model_structure(model)
        assert apply_plan(model, plan) == before
    x = _ids()
    torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=0, atol=0)


@torch.no_grad()
def test_attention_and_layers_prune_beside_experts(moe_family):
    """Dense structures keep working on MoE families: heads, KV groups, a whole MoE block, a layer."""
    model = tiny_moe_model(moe_family)
    plan = Plan(layers={0: LayerPlan(keep_kv_groups=(1,), keep_experts=(0, 1, 5)),
                        2: LayerPlan(keep_query_heads=(0, 2, 4, 6)),
                        3: LayerPlan(drop_mlp=True)}, drop_layers=(1,))
    if architecture_for(moe_family).attention_norms_span_heads:  # OLMoE: q/k norms over all heads
        with pytest.raises(PlanError, match="normalises queries and keys over all heads"):
            apply_plan(model, plan)
        plan = Plan(layers={0: LayerPlan(keep_experts=(0, 1, 5)), 2: LayerPlan(drop_attention=True),
                            3: LayerPlan(drop_mlp=True)}, drop_layers=(1,))
    predicted = predicted_structure(plan, model_structure(model))
    after = apply_plan(model, plan)
    assert after.layers == predicted.layers and after.num_layers == 3
    assert after.total_params == predicted.total_params
    assert after.total_params == sum(p.numel() for p in model.parameters())
    out = model.generate(_ids()[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 15


@torch.no_grad()
def test_kv_cache_equals_no_cache_after_expert_removal(moe_family):
    model = tiny_moe_model(moe_family)
    apply_plan(model, Plan(layers={layer: LayerPlan(keep_experts=_keep((layer % EXPERTS, 2))) for layer in _sparse_layers(model)}))
    prompt = _ids()[:1]
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@torch.no_grad()
def test_uniform_expert_counts_save_as_the_stock_family(moe_family, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunekit.export.huggingface import save_model

    model = tiny_moe_model(moe_family)
    arch = architecture_for(moe_family)
    apply_plan(model, Plan(layers={layer: LayerPlan(keep_experts=_keep((layer % EXPERTS, 4))) for layer in _sparse_layers(model)}))
    assert model.config.model_type == moe_family
    assert getattr(model.config, arch.num_experts_key) == EXPERTS - 2
    save_model(model, None, tmp_path / "out", source="tiny")
    assert not (tmp_path / "out" / "modeling_prunekit.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager").eval()
    x = _ids(1)
    torch.testing.assert_close(reloaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_uneven_expert_counts_save_with_remote_code(moe_family, tmp_path):
    from prunekit.export.huggingface import save_model

    model = tiny_moe_model(moe_family)
    sparse = _sparse_layers(model)
    plan = Plan(layers={layer: LayerPlan(keep_experts=tuple(range(1 + i))) for i, layer in enumerate(sparse)})
    after = apply_plan(model, plan)
    assert [s.num_experts for s in after.layers if s.num_experts] == [1 + i for i in range(len(sparse))]
    save_model(model, None, tmp_path / "out", source="tiny")
    assert_reloads_as_saved(model, tmp_path / "out", _ids(2), after)


def test_plan_errors_on_moe_layers(moe_family):
    model = tiny_moe_model(moe_family)
    structure = model_structure(model)
    sparse = _sparse_layers(model)
    with pytest.raises(PlanError, match="keeps no experts"):
        predicted_structure(Plan(layers={sparse[0]: LayerPlan(keep_experts=())}), structure)
    with pytest.raises(PlanError, match="out of range"):
        predicted_structure(Plan(layers={sparse[0]: LayerPlan(keep_experts=(0, EXPERTS))}), structure)
    with pytest.raises(PlanError, match="replace its keep_channels with keep_expert_channels"):
        predicted_structure(Plan(layers={sparse[0]: LayerPlan(keep_channels=(0, 1))}), structure)
    dense = [i for i in range(structure.num_layers) if i not in sparse]
    for layer in dense:  # Qwen3-MoE's dense layer
        with pytest.raises(PlanError, match="not a mixture-of-experts layer"):
            predicted_structure(Plan(layers={layer: LayerPlan(keep_experts=(0,))}), structure)


def test_plan_json_round_trips_keep_experts():
    plan = Plan(layers={2: LayerPlan(keep_experts=(0, 3))})
    again = Plan.from_dict(plan.to_dict())
    assert again.layers[2].keep_experts == (0, 3)
    assert plan.to_dict()["layers"] == {"2": {"keep_experts": [0, 3]}}


def test_families_are_registered():
    for family in MOE_FAMILIES:
        assert architecture_for(family).is_moe
    assert not architecture_for("llama").is_moe


def test_structure_counts_experts_and_active_flops(moe_family):
    model = tiny_moe_model(moe_family)
    structure = model_structure(model)
    assert structure.total_params == sum(p.numel() for p in model.parameters())
    assert structure.experts_per_token == TOP_K
    sparse = _sparse_layers(model)
    i = sparse[0]
    shape, costs = structure.layers[i], structure.layer_costs[i]
    assert shape.num_experts == EXPERTS
    # a token runs through top-k experts: FLOPs fall by 2 x the idle experts' weights
    idle = (EXPERTS - TOP_K) * shape.intermediate_size * 3 * structure.hidden_size
    assert structure.layer_flops(i, 0) == 2 * (structure.layer_params(i) - idle)


# ----------------------------------------------------------------------------- planner
def _expert_scores(structure, seed: int = 0):
    from prunekit.score.scores import Scores

    generator = torch.Generator().manual_seed(seed)
    return Scores("test", {"expert": [torch.rand(s.num_experts, generator=generator, dtype=torch.float64)
                                      for s in structure.layers]})


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_planner_removes_lowest_scored_experts(moe_family, allocation):
    from prunekit.plan.planner import PlannerSettings, make_plan, removed_fraction

    model = tiny_moe_model(moe_family)
    structure = model_structure(model)
    scores = _expert_scores(structure)
    settings = PlannerSettings(target=0.25, allocation=allocation, prune=("expert",))
    plan = make_plan(structure, scores, settings)
    after = predicted_structure(plan, structure)
    assert removed_fraction(structure, after, "non-embedding") >= 0.25
    counts = {s.num_experts for s in after.layers if s.num_experts}
    if allocation == "uniform":
        assert len(counts) == 1 and after.is_uniform()
    for layer, entry in plan.layers.items():
        assert set(entry.to_dict()) == {"keep_experts"}
        values = scores.values["expert"][layer]
        removed = [e for e in range(EXPERTS) if e not in entry.keep_experts]
        # within a layer the removed experts are the lowest-scored ones
        assert max(values[removed]) <= min(values[list(entry.keep_experts)])
    apply_plan(model, plan)
    assert model_structure(model).layers == after.layers


def test_planner_counts_experts_in_every_basis(moe_family):
    from prunekit.plan.planner import PlannerSettings, make_plan, max_removable_fraction, removed_fraction

    structure = model_structure(tiny_moe_model(moe_family))
    for basis in ("non-embedding", "total"):
        plan = make_plan(structure, _expert_scores(structure), PlannerSettings(target=0.1, basis=basis, prune=("expert",)))
        assert removed_fraction(structure, predicted_structure(plan, structure), basis) >= 0.1
    # A token runs through top-k experts however many there are: removing experts saves only router
    # FLOPs until fewer than top-k are left, and no KV cache at all.
    flops = max_removable_fraction(structure, PlannerSettings(target=0.1, basis="flops", prune=("expert",)))
    params = max_removable_fraction(structure, PlannerSettings(target=0.1, prune=("expert",)))
    assert 0 < flops < params / 2
    assert max_removable_fraction(structure, PlannerSettings(target=0.1, basis="kv-cache", prune=("expert",))) == 0


def test_planner_keeps_one_expert_per_layer_and_refuses_beyond(moe_family):
    from prunekit.plan.planner import PlannerSettings, check_reachable, max_removable_fraction

    structure = model_structure(tiny_moe_model(moe_family))
    settings = PlannerSettings(target=0.5, prune=("expert",))
    reachable = max_removable_fraction(structure, settings)
    with pytest.raises(PlanError, match="out of reach"):
        check_reachable(structure, PlannerSettings(target=min(reachable + 0.05, 0.99), prune=("expert",)))
