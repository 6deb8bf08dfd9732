"""Mixtral: a Mistral decoder whose MLP is a sparse block of `num_local_experts` SwiGLU experts;
the router softmaxes over all experts, takes the top `num_experts_per_tok` and always
renormalises them. Every layer is a MoE layer and `intermediate_size` is each expert's width."""
from prunekit.models.architecture import Architecture, register

MIXTRAL = register(Architecture(
    model_type="mixtral", router="gate", experts="experts", num_experts_key="num_local_experts",
    expert_width_key="intermediate_size",
    notes=("experts are fused 3-D parameters (experts.gate_up_proj, experts.down_proj); the router is mlp.gate",),
))
