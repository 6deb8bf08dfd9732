"""OLMoE: sparse MLP blocks of `num_experts` routed experts (config alias `num_local_experts`) of
width `intermediate_size`, top-k renormalised only with `norm_topk_prob`. Its q_norm and k_norm
are RMSNorms over all query (key) heads at once, not per head: removing a head would change what
the kept heads compute, so OLMoE's attention heads are not pruned (experts, MoE blocks and layers are)."""
from prunekit.models.architecture import Architecture, register

OLMOE = register(Architecture(
    model_type="olmoe", router="gate", experts="experts", num_experts_key="num_experts",
    expert_width_key="intermediate_size", attention_norms_span_heads=True,
))
