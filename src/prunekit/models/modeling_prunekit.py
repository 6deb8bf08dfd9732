"""Modeling code for pruned models whose decoder layers differ in shape.

A pruned model whose layers all keep the same shape is saved as a stock Hugging Face model.
When widths differ from layer to layer, or a layer lost its attention or MLP, the saved
directory carries this file: it subclasses the stock model class of the family and, after the
stock constructor, gives every decoder layer the widths listed in `config.layer_shapes`.
Nothing is masked: the smaller layers hold smaller weight matrices.

This file must stay self-contained (torch and transformers only), because
`AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` runs it where prunekit
is not installed. prunekit itself imports it to build and reshape models, so the two can never
disagree. When prunekit copies it into a model directory it fills in the two constants below.
"""
from __future__ import annotations

import copy
import functools

import torch
import transformers
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# Filled in when a pruned model is saved: the stock family and its module names
# (prunekit.models.architecture.Architecture as a dict).
BASE_MODEL_TYPE: str | None = None
ARCHITECTURE: dict | None = None


class RemovedAttention(nn.Module):
    """Stands where a removed attention sublayer was: no weights; adds nothing to the residual.

    It still appends an empty (zero-head) key/value entry to the cache, so that the cache's
    sequence length, which transformers reads from the first layer, stays right when the first
    layers lose their attention. Zero heads cost no memory.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        # transformers < 5.20 calls the cache `past_key_values`, later versions `cache`.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            batch, seq_len = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(batch, 0, seq_len, 1)
            cache.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """Stands where a removed MLP sublayer was: no weights; adds nothing to the residual."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def _module(root: nn.Module, dotted: str) -> nn.Module:
    return functools.reduce(getattr, dotted.split("."), root)


def decoder_layers(model: nn.Module, arch: dict) -> nn.ModuleList:
    return _module(model, arch["layers"])


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def empty_linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    """A Linear of the new size on `like`'s device and dtype, left uninitialised (weights come next)."""
    linear = nn.Linear(in_features, out_features, bias=like.bias is not None, device="meta", dtype=like.weight.dtype)
    return linear if like.weight.is_meta else linear.to_empty(device=like.weight.device)


def set_attention_width(layer: nn.Module, arch: dict, num_heads: int, num_kv_heads: int, config) -> None:
    """Give the attention of `layer` `num_heads` query heads in `num_kv_heads` groups.

    New projection matrices replace the old ones (uninitialised: the caller loads weights);
    zero heads replaces the whole attention sublayer, and its norms, with stand-ins.
    """
    attention = getattr(layer, arch["attention"])
    if num_heads == 0:
        layer_idx = getattr(attention, "layer_idx", getattr(layer, "layer_idx", None))
        setattr(layer, arch["attention"], RemovedAttention(layer_idx))
        for norm in arch["attention_norms"]:
            setattr(layer, norm, nn.Identity())
        return
    head_dim = head_dim_of(config)
    hidden = config.hidden_size
    o_proj = getattr(attention, arch["o_proj"])
    if arch["qkv_proj"]:
        qkv = getattr(attention, arch["qkv_proj"])
        setattr(attention, arch["qkv_proj"], empty_linear(hidden, (num_heads + 2 * num_kv_heads) * head_dim, qkv))
    else:
        for name, heads in ((arch["q_proj"], num_heads), (arch["k_proj"], num_kv_heads), (arch["v_proj"], num_kv_heads)):
            setattr(attention, name, empty_linear(hidden, heads * head_dim, getattr(attention, name)))
    setattr(attention, arch["o_proj"], empty_linear(num_heads * head_dim, hidden, o_proj))
    attention.num_key_value_groups = num_heads // num_kv_heads
    # Some families keep the counts as attributes; keep them true.
    for attribute, value in (("num_heads", num_heads), ("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if hasattr(attention, attribute):
            setattr(attention, attribute, value)
    if arch["attention_reads_config"] and (
        attention.config.num_attention_heads != num_heads or attention.config.num_key_value_heads != num_kv_heads
    ):
        attention.config = copy.copy(attention.config)
        attention.config.num_attention_heads = num_heads
        attention.config.num_key_value_heads = num_kv_heads


def set_mlp_width(layer: nn.Module, arch: dict, intermediate_size: int, config) -> None:
    """Give the MLP of `layer` `intermediate_size` channels (zero removes the MLP and its norms)."""
    mlp = getattr(layer, arch["mlp"])
    if intermediate_size == 0:
        setattr(layer, arch["mlp"], RemovedMLP())
        for norm in arch["mlp_norms"]:
            setattr(layer, norm, nn.Identity())
        return
    _set_ffn_width(mlp, arch, intermediate_size, config.hidden_size)


def _set_ffn_width(mlp: nn.Module, arch: dict, intermediate_size: int, hidden: int) -> None:
    """New (uninitialised) gate/up rows and down columns for a gated FFN of `intermediate_size` channels."""
    if arch["gate_up_proj"]:
        fused = getattr(mlp, arch["gate_up_proj"])
        setattr(mlp, arch["gate_up_proj"], empty_linear(hidden, 2 * intermediate_size, fused))
    else:
        for name in (arch["gate_proj"], arch["up_proj"]):
            setattr(mlp, name, empty_linear(hidden, intermediate_size, getattr(mlp, name)))
    setattr(mlp, arch["down_proj"], empty_linear(intermediate_size, hidden, getattr(mlp, arch["down_proj"])))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = intermediate_size


def shared_expert_of(layer: nn.Module, arch: dict) -> nn.Module | None:
    """The shared expert of `layer`'s MoE block (Qwen2-MoE), or None (a dense, removed or plain MoE MLP)."""
    mlp = getattr(layer, arch["mlp"])
    name = arch.get("shared_expert")
    return getattr(mlp, name) if name and moe_parts(mlp, arch) is not None else None


def set_shared_expert_width(layer: nn.Module, arch: dict, width: int, config) -> None:
    """Give the shared expert of `layer`'s MoE block `width` channels (its gate/up rows and down
    columns, uninitialised: the caller loads weights)."""
    _set_ffn_width(shared_expert_of(layer, arch), arch, width, config.hidden_size)


def moe_parts(mlp: nn.Module, arch: dict) -> tuple[nn.Module, nn.Module] | None:
    """(router, experts) of a sparse MoE block, or None for a dense (or removed) MLP."""
    if not arch.get("experts") or not hasattr(mlp, arch["experts"]):
        return None
    return getattr(mlp, arch["router"]), getattr(mlp, arch["experts"])


def _empty_like_parameter(old: nn.Parameter, shape: tuple[int, ...]) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad)


def set_expert_count(layer: nn.Module, arch: dict, num_experts: int, config, width: int | None = None) -> None:
    """Give the sparse MoE block of `layer` `num_experts` routed experts, each `width` channels wide
    (default: as wide as now): new (uninitialised) router rows and expert weights, and top-k at
    most the experts left."""
    mlp = getattr(layer, arch["mlp"])
    router, experts = moe_parts(mlp, arch)
    width = experts.down_proj.shape[2] if width is None else width
    hidden = experts.down_proj.shape[1]
    router.weight = _empty_like_parameter(router.weight, (num_experts, router.weight.shape[1]))
    if getattr(router, "bias", None) is not None:
        router.bias = _empty_like_parameter(router.bias, (num_experts,))
    experts.gate_up_proj = _empty_like_parameter(experts.gate_up_proj, (num_experts, 2 * width, hidden))
    experts.down_proj = _empty_like_parameter(experts.down_proj, (num_experts, hidden, width))
    if hasattr(experts, "intermediate_dim"):
        experts.intermediate_dim = width
    top_k = min(getattr(config, arch["top_k_key"]), num_experts)
    for module in (router, experts, mlp):
        if hasattr(module, "num_experts"):
            module.num_experts = num_experts
        if hasattr(module, "top_k"):
            module.top_k = top_k


def apply_layer_shapes(model: nn.Module, arch: dict, layer_shapes: list[dict]) -> None:
    """Reshape every decoder layer whose shape in `layer_shapes` differs from the config's."""
    config = model.config
    layers = decoder_layers(model, arch)
    if len(layer_shapes) != len(layers):
        raise ValueError(f"config.layer_shapes lists {len(layer_shapes)} layers, the model has {len(layers)}")
    for layer, shape in zip(layers, layer_shapes):
        heads, kv_heads, ffn = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]
        if (heads, kv_heads) != (config.num_attention_heads, config.num_key_value_heads):
            set_attention_width(layer, arch, heads, kv_heads, config)
        if moe_parts(getattr(layer, arch["mlp"]), arch) is not None:
            # A MoE layer: the stock config sizes its experts; their count, their width or the whole block changes.
            if ffn == 0:
                set_mlp_width(layer, arch, 0, config)
            elif (shape.get("num_experts", 0), ffn) != (getattr(config, arch["num_experts_key"]),
                                                        getattr(config, arch["expert_width_key"])):
                set_expert_count(layer, arch, shape["num_experts"], config, width=ffn)
            # (shapes saved before shared experts were pruned do not list them: those kept the config's width)
            shared, width_key = shape.get("shared_expert_size"), arch.get("shared_expert_width_key")
            if ffn and shared and width_key and shared != getattr(config, width_key):
                set_shared_expert_width(layer, arch, shared, config)
        elif ffn != config.intermediate_size:
            set_mlp_width(layer, arch, ffn, config)


@functools.lru_cache(maxsize=None)
def _pruned_classes(base_model_type: str, architecture_items: tuple, config_model_type: str):
    architecture = dict(architecture_items)
    base_config_class = CONFIG_MAPPING[base_model_type]
    base_model_class = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[base_model_type])

    class PrunekitConfig(base_config_class):
        """The family's config plus `layer_shapes`: per decoder layer, its head counts and FFN width
        (and in a MoE layer its expert count and shared expert's width).

        The family's own fields keep the values of the model before pruning (the stock config
        validates them, e.g. that heads divide hidden_size); `layer_shapes` overrides them.
        """

        model_type = config_model_type

        def __init__(self, layer_shapes: list[dict] | None = None, **kwargs):
            self.layer_shapes = list(layer_shapes or [])
            super().__init__(**kwargs)

    class PrunekitForCausalLM(base_model_class):
        config_class = PrunekitConfig

        def __init__(self, config):
            super().__init__(config)
            apply_layer_shapes(self, architecture, config.layer_shapes)

    for cls in (PrunekitConfig, PrunekitForCausalLM):
        cls.__module__ = __name__
    return PrunekitConfig, PrunekitForCausalLM


def pruned_classes(base_model_type: str, architecture: dict, model_type: str | None = None):
    """The config and model classes for pruned models of one family (built once, then cached).

    Inside prunekit their model_type is `prunekit_<family>`, so that nothing mistakes a pruned
    model for a stock one. A saved directory says the family's own model_type instead: transformers
    then knows the config without remote code, and `AutoTokenizer.from_pretrained(path)` loads the
    tokenizer without asking to trust remote code; `auto_map` still sends
    `AutoModelForCausalLM(..., trust_remote_code=True)` to this file, which runs with that model_type.
    """
    items = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in architecture.items())
    return _pruned_classes(base_model_type, items, model_type or f"prunekit_{base_model_type}")


if BASE_MODEL_TYPE is not None:
    PrunekitConfig, PrunekitForCausalLM = pruned_classes(BASE_MODEL_TYPE, ARCHITECTURE, model_type=BASE_MODEL_TYPE)
