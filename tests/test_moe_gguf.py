"""GGUF export of mixtures of experts (issue 23): tiny random Mixtral and Qwen3-MoE models, dense
and with whole experts or channels inside experts removed uniformly, written as llama.cpp's `llama`
(Mixtral) or `qwen3moe` architecture with expert tensors and run by llama.cpp itself give the
logits transformers gives; uneven expert counts, which llama.cpp cannot build, are refused before
anything is written."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_moe_model
from test_gguf import X, _llama_cpp_logits, _tensor_names, bpe_tokenizer

from prunekit import LayerPlan, Plan, apply_plan
from prunekit.export.gguf import GGUFExportError, write_gguf

PLANS = {
    "dense": Plan(),
    "four experts left": Plan(layers={i: LayerPlan(keep_experts=tuple(e for e in range(6) if e not in (i, (i + 3) % 6)))
                                      for i in range(4)}),
    "one expert left": Plan(layers={i: LayerPlan(keep_experts=(i,)) for i in range(4)}),
    "heads and experts": Plan(layers={i: LayerPlan(keep_kv_groups=(1,), keep_experts=(0, 2, 4)) for i in range(4)}),
    # 16 channels of each expert, a different set in every expert and layer (both families' experts are >= 24 wide)
    "expert channels": Plan(layers={i: LayerPlan(keep_expert_channels=tuple(
        tuple(c for c in range(24) if (c + e + i) % 3) for e in range(6))) for i in range(4)}),
    "experts and their channels": Plan(layers={i: LayerPlan(keep_experts=(0, 2, 5), keep_expert_channels=tuple(
        tuple(c for c in range(24) if (c + e) % 3 != i % 3) for e in (0, 2, 5))) for i in range(4)}),
}


@pytest.mark.parametrize("name", PLANS)
def test_llama_cpp_runs_pruned_mixtral_like_transformers(name, tmp_path, one_thread):
    pytest.importorskip("llama_cpp")
    model = tiny_moe_model("mixtral")
    apply_plan(model, PLANS[name])
    exported = write_gguf(model, bpe_tokenizer(), tmp_path / "m.gguf")
    assert exported.arch == "llama" and exported.layers == 4
    assert "blk.0.ffn_gate_exps.weight" in _tensor_names(exported.path)
    with torch.no_grad():
        expected = model(torch.tensor([X])).logits[0].numpy()
    got = _llama_cpp_logits(exported.path, X)
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max(), np.abs(got - expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


@pytest.mark.parametrize("name", ["dense", "four experts left", "one expert left", "expert channels",
                                  "experts and their channels"])
def test_llama_cpp_runs_pruned_qwen3_moe_like_transformers(name, tmp_path, one_thread):
    pytest.importorskip("llama_cpp")
    model = tiny_moe_model("qwen3_moe", mlp_only_layers=[])  # llama.cpp's qwen3moe has no dense layers
    apply_plan(model, PLANS[name])
    exported = write_gguf(model, bpe_tokenizer(), tmp_path / "m.gguf")
    assert exported.arch == "qwen3moe" and exported.layers == 4
    assert {"blk.0.attn_q_norm.weight", "blk.0.ffn_gate_inp.weight"} <= _tensor_names(exported.path)
    with torch.no_grad():
        expected = model(torch.tensor([X])).logits[0].numpy()
    got = _llama_cpp_logits(exported.path, X)
    assert np.abs(got - expected).max() < 0.02 * np.abs(expected).max(), np.abs(got - expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.95


def test_uneven_expert_counts_are_refused(tmp_path):
    model = tiny_moe_model("mixtral")
    apply_plan(model, Plan(layers={0: LayerPlan(keep_experts=(0, 1))}))
    with pytest.raises(GGUFExportError, match="one expert count.*--allocation uniform"):
        write_gguf(model, bpe_tokenizer(), tmp_path / "m.gguf")
    assert not list(tmp_path.iterdir())


def test_moe_families_without_a_gguf_table_are_refused(tmp_path):
    with pytest.raises(GGUFExportError, match="supports llama, mixtral, qwen3_moe"):
        write_gguf(tiny_moe_model("qwen2_moe"), bpe_tokenizer(), tmp_path / "m.gguf")
    with pytest.raises(GGUFExportError, match="one expert count"):  # Qwen3-MoE with a dense layer
        write_gguf(tiny_moe_model("qwen3_moe"), bpe_tokenizer(), tmp_path / "m.gguf")
    with pytest.raises(GGUFExportError, match="norm_topk_prob"):
        write_gguf(tiny_moe_model("qwen3_moe", mlp_only_layers=[], norm_topk_prob=False), bpe_tokenizer(),
                   tmp_path / "m.gguf")
