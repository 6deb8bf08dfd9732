"""Gemma 2: sandwich norms around both sublayers, alternating sliding/global layers
(config.layer_types, pruned with the layers), attention and final logit soft-capping; norms
scale by 1 + weight, embeddings by sqrt(hidden_size)."""
from prunekit.models.architecture import Architecture, register

GEMMA2 = register(Architecture(
    model_type="gemma2",
    attention_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    config_requires_heads_divide_hidden=True,
    attention_output_norm="post_attention_layernorm",
    mlp_output_norm="post_feedforward_layernorm",
    norm_weight_offset=1.0,
    embedding_scale="embed_scale",
))
