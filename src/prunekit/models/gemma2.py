"""Gemma 2: sandwich norms around both sublayers, alternating sliding/global layers
(config.layer_types, pruned with the layers), attention and final logit soft-capping."""
from prunekit.models.architecture import Architecture, register

GEMMA2 = register(Architecture(
    model_type="gemma2",
    attention_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
    config_requires_heads_divide_hidden=True,
    attention_output_norm="post_attention_layernorm",
    mlp_output_norm="post_feedforward_layernorm",
))
