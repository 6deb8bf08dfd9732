"""Qwen2-MoE: Qwen2 attention (q/k/v biases) with sparse MLP blocks of `num_experts` routed
experts of width `moe_intermediate_size` plus one shared expert (`shared_expert_intermediate_size`)
that every token goes through, scaled by sigmoid(shared_expert_gate(x)). Removing routed experts
leaves the shared expert whole; its own channels are pruned like a dense FFN's (`channel`)."""
from prunekit.models.architecture import Architecture, register

QWEN2_MOE = register(Architecture(
    model_type="qwen2_moe", router="gate", experts="experts", num_experts_key="num_experts",
    expert_width_key="moe_intermediate_size", shared_expert="shared_expert", shared_expert_gate="shared_expert_gate",
    shared_expert_width_key="shared_expert_intermediate_size",
))
