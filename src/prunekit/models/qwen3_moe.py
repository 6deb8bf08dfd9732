"""Qwen3-MoE: Qwen3 attention (per-head q/k norms) with sparse MLP blocks of `num_experts` experts
of width `moe_intermediate_size`; top-k is renormalised only with `norm_topk_prob`. Layers in
`mlp_only_layers` (or off the `decoder_sparse_step`) keep a dense MLP of `intermediate_size`."""
from prunekit.models.architecture import Architecture, register

QWEN3_MOE = register(Architecture(
    model_type="qwen3_moe", router="gate", experts="experts", num_experts_key="num_experts",
    expert_width_key="moe_intermediate_size",
    notes=("dense layers (mlp_only_layers) have gate_proj/up_proj/down_proj like Qwen3",),
))
