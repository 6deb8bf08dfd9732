"""Phi-3: fused qkv_proj ([q | k | v] rows) and gate_up_proj ([gate | up] rows); the attention
splits qkv by config.num_attention_heads at run time."""
from prunekit.models.architecture import Architecture, register

PHI3 = register(Architecture(
    model_type="phi3",
    q_proj=None, k_proj=None, v_proj=None, qkv_proj="qkv_proj",
    gate_proj=None, up_proj=None, gate_up_proj="gate_up_proj",
    attention_reads_config=True,
))
