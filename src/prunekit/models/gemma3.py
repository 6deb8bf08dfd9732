"""Gemma 3 (text): Gemma 2's sandwich norms, q/k norms on head_dim, local/global layer types
with their own rotary embeddings (chosen per layer from config.layer_types); norms scale by 1 + weight, embeddings by sqrt(hidden_size)."""
from prunekit.models.architecture import Architecture, register

GEMMA3_TEXT = register(Architecture(
    model_type="gemma3_text",
    attention_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    config_requires_heads_divide_hidden=True,
    attention_output_norm="post_attention_layernorm",
    mlp_output_norm="post_feedforward_layernorm",
    norm_weight_offset=1.0,
    embedding_scale="embed_scale",
))
