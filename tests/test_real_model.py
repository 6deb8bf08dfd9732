"""The core on the real SmolLM2-135M-Instruct (GGUF, 30 layers, 9 query / 3 KV heads)."""
from __future__ import annotations

import copy

import pytest
import torch

import prunekit
from prunekit import LayerPlan, Plan, apply_plan, model_structure

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return prunekit.load("smollm2-135m", attn_implementation="eager")


def test_loads_as_an_ordinary_dense_llama(smollm2):
    model, tokenizer = smollm2
    structure = model_structure(model)
    assert structure.model_type == "llama" and structure.num_layers == 30
    assert (structure.layers[0].num_attention_heads, structure.layers[0].num_key_value_heads) == (9, 3)
    assert structure.total_params == 134_515_008 == sum(p.numel() for p in model.parameters())
    assert structure.embedding_params == 49152 * 576  # tied: counted once
    assert tokenizer("Hello world")["input_ids"]


def test_removal_equals_zeroing_and_saves(smollm2, tmp_path):
    model, tokenizer = smollm2
    pruned = copy.deepcopy(model)
    zeroed = copy.deepcopy(model)
    plan = Plan(
        layers={
            3: LayerPlan(keep_kv_groups=(0, 2)),
            10: LayerPlan(keep_query_heads=(0, 2, 3, 5, 6, 8), keep_channels=tuple(range(0, 1536, 2))),
            20: LayerPlan(drop_attention=True),
        },
        drop_layers=(27,),
    )
    layers = zeroed.model.layers
    with torch.no_grad():
        layers[3].self_attn.o_proj.weight[:, 3 * 64:6 * 64] = 0
        for head in (1, 4, 7):
            layers[10].self_attn.o_proj.weight[:, head * 64:(head + 1) * 64] = 0
        layers[10].mlp.down_proj.weight[:, 1::2] = 0
        layers[20].self_attn.o_proj.weight.zero_()
        layers[27].self_attn.o_proj.weight.zero_()
        layers[27].mlp.down_proj.weight.zero_()
    apply_plan(pruned, plan)
    ids = tokenizer("The capital of France is Paris. The capital of Germany is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, zeroed(ids).logits, atol=1e-4, rtol=1e-4)
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(pruned.generate(ids, use_cache=True, **settings), pruned.generate(ids, use_cache=False, **settings))

    # float32 as loaded: the save must reload bit for bit (by default a GGUF source saves in its bf16)
    saved = prunekit.save_model(pruned, tokenizer, tmp_path / "uneven", plan=plan, source="smollm2-135m",
                                save_dtype="float32")
    assert saved.format == "prunekit"
    reloaded, _ = prunekit.load(tmp_path / "uneven", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, atol=0, rtol=0)


def test_uniform_plan_gives_a_stock_llama(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    pruned = copy.deepcopy(model)
    plan = Plan(layers={i: LayerPlan(keep_query_heads=(0, 1, 3, 4, 6, 7), keep_channels=tuple(range(1024)))
                        for i in range(30)})
    apply_plan(pruned, plan)
    saved = prunekit.save_model(pruned, tokenizer, tmp_path / "uniform", plan=plan, source="smollm2-135m",
                                save_dtype="float32")  # as loaded, so the reload is exact
    assert saved.format == "stock"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform", attn_implementation="eager").eval()
    assert (reloaded.config.num_attention_heads, reloaded.config.num_key_value_heads, reloaded.config.intermediate_size) == (6, 3, 1024)
    ids = tokenizer("A short test sentence.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, pruned(ids).logits, atol=0, rtol=0)
