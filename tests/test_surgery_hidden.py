"""Hidden-size pruning on every family: keeping residual channels equals the dense model with the
others zeroed (embedding columns and o/down output rows), the norms' sqrt(d / d') folded into
their weights; the cost model predicts every count; cache, save and reload agree."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_model, zero_contributions

import prunekit
from prunekit import LayerPlan, Plan, apply_plan, architecture_for, model_structure, predicted_structure, save_model
from prunekit.export.huggingface import MODELING_FILE
from prunekit.models.modeling_prunekit import RemovedAttention, RemovedMLP, decoder_layers
from prunekit.plan.plan import PlanError

HIDDEN, HEAD_DIM = 48, 12
REMOVED = (0, 5, 17, 30, 41, 44, 46, 47)           # 40 kept: 8 heads still divide it
KEEP = tuple(i for i in range(HIDDEN) if i not in REMOVED)
KEEP_36 = KEEP[:36]                                 # 36 kept: 8 heads do not divide it
X = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(0))


def hidden_norms(model) -> list[torch.nn.Module]:
    """Every norm over the residual stream: the sublayers' (Gemma's sandwich norms too) and the final one."""
    arch = architecture_for(model.config.model_type)
    norms = [model.get_submodule(arch.final_norm)]
    for layer in decoder_layers(model, arch.to_dict()):
        norms += [getattr(layer, name) for name in arch.attention_norms + arch.mlp_norms]
    return [n for n in norms if not isinstance(n, torch.nn.Identity)]


def zero_hidden_channels(model, removed) -> None:
    """The dense reference of a hidden-pruned model: the removed channels of the residual stream
    stay zero (embedding columns and o/down output rows zeroed), and each norm over the stream,
    which averages over all d channels where the pruned one averages over d', gets its epsilon
    scaled by d' / d: x / sqrt(S/d' + eps) * sqrt(d/d') == x / sqrt(S/d + eps * d'/d) exactly."""
    arch = architecture_for(model.config.model_type)
    removed = torch.tensor(sorted(removed))
    d = model.get_input_embeddings().weight.shape[1]
    kept = d - len(removed)
    with torch.no_grad():
        model.get_input_embeddings().weight[:, removed] = 0
        for layer in decoder_layers(model, arch.to_dict()):
            attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
            writers = ([getattr(attention, arch.o_proj)] if not isinstance(attention, RemovedAttention) else []) + \
                      ([getattr(mlp, arch.down_proj)] if not isinstance(mlp, RemovedMLP) else [])
            for linear in writers:
                linear.weight[removed] = 0
                if linear.bias is not None:
                    linear.bias[removed] = 0
    for norm in hidden_norms(model):
        attribute = "variance_epsilon" if hasattr(norm, "variance_epsilon") else "eps"
        setattr(norm, attribute, getattr(norm, attribute) * kept / d)


def _check_equal_to_zeroed(family, plan, removed, zeroing=(), **overrides):
    pruned = tiny_model(family, **overrides)
    reference = copy.deepcopy(pruned)
    zero_hidden_channels(reference, removed)
    for z in zeroing:
        zero_contributions(reference, head_dim=HEAD_DIM, **z)
    predicted = predicted_structure(plan, model_structure(pruned))
    after = apply_plan(pruned, plan)
    torch.testing.assert_close(pruned(X).logits, reference(X).logits, atol=2e-5, rtol=1e-4)
    assert sum(p.numel() for p in pruned.parameters()) == predicted.total_params == after.total_params
    # the one cost model: parameters in every basis, FLOPs, KV cache, per layer
    assert predicted.to_dict() == after.to_dict()
    assert after.hidden_size == pruned.config.hidden_size == len(plan.keep_hidden)
    assert after.head_dim == HEAD_DIM
    return pruned


def test_hidden_removal_equals_zeroing(family):
    _check_equal_to_zeroed(family, Plan(keep_hidden=KEEP), REMOVED)


@pytest.mark.parametrize("family, tied", [("llama", True), ("gemma2", False), ("qwen2", False)])
def test_tied_and_untied_output_heads(family, tied):
    model = _check_equal_to_zeroed(family, Plan(keep_hidden=KEEP), REMOVED, tie_word_embeddings=tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


def test_hidden_with_heads_channels_and_layers(family):
    plan = Plan(
        keep_hidden=KEEP_36,
        layers={0: LayerPlan(drop_attention=True, keep_channels=tuple(range(10, 80))),
                1: LayerPlan(keep_query_heads=(1, 2, 3, 5, 6, 7)), 3: LayerPlan(drop_mlp=True)},
        drop_layers=(2,),
    )
    removed = [i for i in range(HIDDEN) if i not in KEEP_36]
    zeroing = [dict(layer=0, attention=True, channels=range(10)), dict(layer=1, heads=(0, 4)),
               dict(layer=3, mlp=True), dict(layer=2, attention=True, mlp=True)]
    _check_equal_to_zeroed(family, plan, removed, zeroing)


def test_a_keep_hidden_of_every_channel_changes_nothing(family):
    model = tiny_model(family)
    reference = copy.deepcopy(model)
    apply_plan(model, Plan(keep_hidden=tuple(range(HIDDEN))))
    assert type(model) is type(reference) and model.config.to_dict() == reference.config.to_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert torch.equal(model(X).logits, reference(X).logits)


@pytest.mark.parametrize("keep, message", [
    ((), "keep_hidden is empty"),
    ((0, 1, 48), r"keep_hidden \[48\] out of range"),
    ((0, 1, 1), "lists an index twice"),
])
def test_bad_keep_hidden_is_refused_before_any_weight_changes(keep, message):
    model = tiny_model("llama")
    reference = copy.deepcopy(model)
    with pytest.raises(PlanError, match=message):
        apply_plan(model, Plan(keep_hidden=keep))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_plan_json_round_trip_and_type_errors():
    plan = Plan(keep_hidden=(3, 1, 2))
    data = plan.to_dict()
    assert data["keep_hidden"] == [1, 2, 3] and Plan.from_dict(data).keep_hidden == (1, 2, 3)
    assert "keep_hidden" not in Plan().to_dict()
    with pytest.raises(PlanError, match="keep_hidden must be a list of integers"):
        Plan.from_dict({"keep_hidden": "0-40"})
    with pytest.raises(PlanError, match="keep_hidden must be an integer"):
        Plan.from_dict({"keep_hidden": [0, "a"]})


def test_cost_model_counts_the_hidden_size_in_every_basis():
    structure = model_structure(tiny_model("llama"))
    smaller = structure.at_hidden_size(40)
    assert smaller.embedding_params == structure.embedding_params * 40 // 48
    assert smaller.non_embedding_params < structure.non_embedding_params
    assert smaller.flops_per_token() < structure.flops_per_token()
    assert smaller.kv_cache_bytes_per_token() == structure.kv_cache_bytes_per_token()
    assert structure.at_hidden_size(48) is structure


@pytest.mark.parametrize("plan", [Plan(keep_hidden=KEEP), Plan(keep_hidden=KEEP_36, layers={1: LayerPlan(keep_kv_groups=(0,))})],
                         ids=["hidden", "hidden+uneven"])
def test_generation_with_cache_equals_without(family, plan):
    model = tiny_model(family)
    apply_plan(model, plan)
    prompt = torch.randint(3, 259, (2, 5))
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, use_cache=True, **settings), model.generate(prompt, use_cache=False, **settings))


def test_uniform_hidden_saves_as_the_stock_family(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = Plan(keep_hidden=KEEP, layers={i: LayerPlan(keep_channels=tuple(range(0, 80, 2))) for i in range(4)})
    model = tiny_model(family)
    apply_plan(model, plan)
    saved = save_model(model, tokenizer, tmp_path / "out", plan=plan, source=f"tiny-{family}")
    assert saved.format == "stock"
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["hidden_size"] == 40 and config["model_type"] == family and "auto_map" not in config
    assert not (tmp_path / "out" / MODELING_FILE).exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    torch.testing.assert_close(reloaded(X).logits, model(X).logits, atol=0, rtol=0)


def test_hidden_that_heads_do_not_divide_and_uneven_layers_reload(family, tokenizer, tmp_path):
    plan = Plan(keep_hidden=KEEP_36, layers={0: LayerPlan(drop_attention=True), 1: LayerPlan(keep_channels=tuple(range(30)))})
    model = tiny_model(family)
    apply_plan(model, plan)
    saved = save_model(model, tokenizer, tmp_path / "out", plan=plan, source=f"tiny-{family}")
    assert saved.format == "prunekit"
    reloaded, _ = prunekit.load(tmp_path / "out", attn_implementation="eager")
    torch.testing.assert_close(reloaded(X).logits, model(X).logits, atol=0, rtol=0)
    assert model_structure(reloaded).to_dict() == model_structure(model).to_dict()


def test_uniform_hidden_that_heads_do_not_divide_reloads_without_prunekit(tokenizer, tmp_path):
    """Llama's and Gemma's configs reject hidden 36 with 8 heads: prunekit's format, read by its
    modeling code with prunekit unimportable; Mistral's config accepts it and stays stock."""
    expected, formats = {}, {}
    for family in ("llama", "gemma3_text", "mistral"):
        model = tiny_model(family)
        apply_plan(model, Plan(keep_hidden=KEEP_36))
        formats[family] = save_model(model, tokenizer, tmp_path / family, plan=Plan(keep_hidden=KEEP_36)).format
        expected[family] = model(X).logits
    assert formats == {"llama": "prunekit", "gemma3_text": "prunekit", "mistral": "stock"}
    torch.save(X, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["prunekit"] = None
        from transformers import AutoModelForCausalLM
        x = torch.load({str(tmp_path / "x.pt")!r})
        for family in {sorted(expected)!r}:
            model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r} + "/" + family, trust_remote_code=True, attn_implementation="eager").eval()
            with torch.no_grad():
                torch.save(model(x).logits, {str(tmp_path)!r} + f"/{{family}}.logits.pt")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for family, logits in expected.items():
        torch.testing.assert_close(torch.load(tmp_path / f"{family}.logits.pt"), logits, atol=0, rtol=0)


def test_model_card_costs_the_source_back_at_its_hidden_size():
    """Where the source is not at hand, the card rebuilds its structure from the plan's signature."""
    from prunekit.export.model_card import before_structure
    from prunekit.plan import structure_signature

    dense = tiny_model("llama")
    before = model_structure(dense)
    plan = Plan(keep_hidden=KEEP, layers={1: LayerPlan(keep_channels=tuple(range(40)))})
    after = apply_plan(tiny_model("llama"), plan)
    rebuilt = before_structure(structure_signature(before), after, [], source=None)
    assert (rebuilt.hidden_size, rebuilt.total_params, rebuilt.non_embedding_params) == (
        HIDDEN, before.total_params, before.non_embedding_params)
