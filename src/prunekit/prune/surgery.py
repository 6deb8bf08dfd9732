"""Surgery: execute a plan on a model, in place. Weight matrices are rebuilt smaller, layers
renumbered, the config updated; nothing is masked. Surgery never sees a score."""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from prunekit.models.architecture import Architecture, architecture_for
from prunekit.models.modeling_prunekit import (
    RemovedAttention,
    RemovedMLP,
    empty_linear,
    decoder_layers,
    moe_parts,
    pruned_classes,
    set_attention_width,
    set_expert_count,
    set_mlp_width,
    set_shared_expert_width,
    shared_expert_of,
)
from prunekit.models.structure import ModelStructure, model_structure
from prunekit.plan.plan import KeptLayer, Plan, PlanError, kept_hidden, resolve_plan


def _rows(units: tuple[int, ...], unit_size: int, offset: int = 0) -> torch.Tensor:
    """Row indices of whole units (heads of head_dim rows, or single channels)."""
    return torch.tensor([offset + u * unit_size + r for u in units for r in range(unit_size)], dtype=torch.long)


def _copy_rows(new: nn.Linear, old: nn.Linear, rows: torch.Tensor) -> None:
    new.weight.copy_(old.weight.index_select(0, rows.to(old.weight.device)))
    if old.bias is not None:
        new.bias.copy_(old.bias.index_select(0, rows.to(old.bias.device)))


def _copy_columns(new: nn.Linear, old: nn.Linear, columns: torch.Tensor) -> None:
    new.weight.copy_(old.weight.index_select(1, columns.to(old.weight.device)))
    if old.bias is not None:
        new.bias.copy_(old.bias)


def _prune_attention(layer: nn.Module, arch: Architecture, kept: KeptLayer, before, config, head_dim: int) -> None:
    if kept.shape.num_attention_heads == before.num_attention_heads and kept.shape.num_key_value_heads == before.num_key_value_heads:
        return
    attention = getattr(layer, arch.attention)
    old = {name: getattr(attention, name) for name in (arch.q_proj, arch.k_proj, arch.v_proj, arch.qkv_proj, arch.o_proj) if name}
    set_attention_width(layer, arch.to_dict(), len(kept.query_heads), len(kept.kv_groups), config)
    if not kept.query_heads:
        return
    q_rows = _rows(kept.query_heads, head_dim)
    kv_rows = _rows(kept.kv_groups, head_dim)
    if arch.qkv_proj:
        k_offset = before.num_attention_heads * head_dim
        v_offset = k_offset + before.num_key_value_heads * head_dim
        fused_rows = torch.cat([q_rows, kv_rows + k_offset, kv_rows + v_offset])
        _copy_rows(getattr(attention, arch.qkv_proj), old[arch.qkv_proj], fused_rows)
    else:
        _copy_rows(getattr(attention, arch.q_proj), old[arch.q_proj], q_rows)
        _copy_rows(getattr(attention, arch.k_proj), old[arch.k_proj], kv_rows)
        _copy_rows(getattr(attention, arch.v_proj), old[arch.v_proj], kv_rows)
    _copy_columns(getattr(attention, arch.o_proj), old[arch.o_proj], q_rows)


def kept_expert_weights(gate_up: torch.Tensor, down: torch.Tensor, experts: torch.Tensor,
                        channels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused expert weights (gate_up [E, 2w, d]: gate rows, then up rows; down [E, d, w]) of
    the kept `experts`, each narrowed to its own kept `channels` ([experts kept, w'] or None for all)."""
    gate_up, down = gate_up.index_select(0, experts), down.index_select(0, experts)
    if channels is None:
        return gate_up, down
    width = down.shape[2]
    rows = torch.cat([channels, channels + width], dim=1)  # each expert's gate rows, then its up rows
    gate_up = gate_up.gather(1, rows.unsqueeze(2).expand(-1, -1, gate_up.shape[2]))
    down = down.gather(2, channels.unsqueeze(1).expand(-1, down.shape[1], -1))
    return gate_up, down


def _prune_experts(layer: nn.Module, arch: Architecture, kept: KeptLayer, before, config) -> None:
    """Keep the routed experts `kept.experts` of a MoE layer (their weights and router rows), each
    narrowed to its own `kept.expert_channels`."""
    if len(kept.experts) == before.num_experts and not kept.expert_channels:
        return
    router, experts = moe_parts(getattr(layer, arch.mlp), arch.to_dict())
    old = {"router": router.weight, "bias": getattr(router, "bias", None),
           "gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj}
    set_expert_count(layer, arch.to_dict(), len(kept.experts), config, width=kept.shape.intermediate_size)
    device = old["down_proj"].device
    index = torch.tensor(kept.experts, dtype=torch.long)
    router.weight.copy_(old["router"].index_select(0, index.to(old["router"].device)))
    if old["bias"] is not None:
        router.bias.copy_(old["bias"].index_select(0, index.to(old["bias"].device)))
    channels = torch.tensor(kept.expert_channels, dtype=torch.long, device=device) if kept.expert_channels else None
    gate_up, down = kept_expert_weights(old["gate_up_proj"], old["down_proj"], index.to(device), channels)
    experts.gate_up_proj.copy_(gate_up)
    experts.down_proj.copy_(down)


def _ffn_projections(ffn: nn.Module, arch: Architecture) -> dict[str, nn.Linear]:
    return {name: getattr(ffn, name) for name in (arch.gate_proj, arch.up_proj, arch.gate_up_proj, arch.down_proj) if name}


def _copy_ffn_channels(ffn: nn.Module, arch: Architecture, old: dict[str, nn.Linear], channels: tuple[int, ...],
                       width: int) -> None:
    """Fill the narrowed gated FFN `ffn` with the gate/up rows and down columns of `channels` of its
    `old` projections (`width` channels wide)."""
    rows = torch.tensor(channels, dtype=torch.long)
    if arch.gate_up_proj:
        fused_rows = torch.cat([rows, rows + width])
        _copy_rows(getattr(ffn, arch.gate_up_proj), old[arch.gate_up_proj], fused_rows)
    else:
        _copy_rows(getattr(ffn, arch.gate_proj), old[arch.gate_proj], rows)
        _copy_rows(getattr(ffn, arch.up_proj), old[arch.up_proj], rows)
    _copy_columns(getattr(ffn, arch.down_proj), old[arch.down_proj], rows)


def _prune_shared_expert(layer: nn.Module, arch: Architecture, kept: KeptLayer, before, config) -> None:
    """Keep the channels `kept.shared_channels` of a MoE layer's shared expert."""
    if len(kept.shared_channels) == before.shared_expert_size:
        return
    old = _ffn_projections(shared_expert_of(layer, arch.to_dict()), arch)
    set_shared_expert_width(layer, arch.to_dict(), len(kept.shared_channels), config)
    _copy_ffn_channels(shared_expert_of(layer, arch.to_dict()), arch, old, kept.shared_channels, before.shared_expert_size)


def _prune_mlp(layer: nn.Module, arch: Architecture, kept: KeptLayer, before, config) -> None:
    if before.num_experts:
        if kept.channels:
            _prune_experts(layer, arch, kept, before, config)
            _prune_shared_expert(layer, arch, kept, before, config)
        else:
            set_mlp_width(layer, arch.to_dict(), 0, config)
        return
    if len(kept.channels) == before.intermediate_size:
        return
    mlp = getattr(layer, arch.mlp)
    old = _ffn_projections(mlp, arch)
    set_mlp_width(layer, arch.to_dict(), len(kept.channels), config)
    if kept.channels:
        _copy_ffn_channels(mlp, arch, old, kept.channels, before.intermediate_size)


def rms_fold_factor(old_hidden: int, new_hidden: int) -> float:
    """What a norm over the residual stream must multiply by after hidden pruning: it divides by
    the RMS over the channels it sees, and d' kept channels of a stream whose removed channels
    are zero have an RMS sqrt(d / d') times the RMS over all d (up to the norm's epsilon)."""
    return math.sqrt(old_hidden / new_hidden)


def folded_norm_weight(weight: torch.Tensor, channels: torch.Tensor, factor: float, offset: float) -> torch.Tensor:
    """The kept entries of a norm weight that multiplies by (offset + weight), scaled by `factor`."""
    kept = weight.index_select(0, channels.to(weight.device))
    return ((kept.float() + offset) * factor - offset).to(weight.dtype)


def _linear_with(old: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    new = empty_linear(weight.shape[1], weight.shape[0], old)
    new.weight.copy_(weight)
    if bias is not None:
        new.bias.copy_(bias)
    return new


def _read_hidden(module: nn.Module, name: str | None, channels: torch.Tensor) -> None:
    """Keep the input columns of channels for a projection that reads the residual stream."""
    if name:
        old = getattr(module, name)
        setattr(module, name, _linear_with(old, old.weight.index_select(1, channels.to(old.weight.device)), old.bias))


def _write_hidden(module: nn.Module, name: str, channels: torch.Tensor) -> None:
    """Keep the output rows (and bias) of channels for a projection that writes the residual stream."""
    old = getattr(module, name)
    rows = channels.to(old.weight.device)
    bias = old.bias.index_select(0, rows) if old.bias is not None else None
    setattr(module, name, _linear_with(old, old.weight.index_select(0, rows), bias))


def _fold_norm(module: nn.Module, channels: torch.Tensor, factor: float, offset: float) -> None:
    if isinstance(module, nn.Identity):  # the norm of a removed sublayer
        return
    module.weight = nn.Parameter(folded_norm_weight(module.weight.data, channels, factor, offset),
                                 requires_grad=module.weight.requires_grad)


def prune_hidden(model: nn.Module, arch: Architecture, channels: tuple[int, ...], old_hidden: int) -> None:
    """Keep `channels` of the residual stream, in place: embedding columns, output-head columns,
    every norm over the stream (scaled by `rms_fold_factor`), the input columns of q/k/v/gate/up
    and the output rows of o/down. The model then computes what the dense model computes with
    the other channels zeroed, up to the norms' epsilon."""
    new_hidden = len(channels)
    index = torch.tensor(channels, dtype=torch.long)
    factor = rms_fold_factor(old_hidden, new_hidden)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    # A family that scales embeddings by sqrt(hidden) scales them by sqrt(d') now: the weights
    # take the rest, so the residual stream stays what it was.
    embedding_factor = factor if arch.embedding_scale else 1.0
    kept_embedding = embedding.weight.data.index_select(1, index.to(embedding.weight.device))
    embedding.weight = nn.Parameter(kept_embedding * embedding_factor, requires_grad=embedding.weight.requires_grad)
    embedding.embedding_dim = new_hidden
    if arch.embedding_scale:
        getattr(embedding, arch.embedding_scale).fill_(new_hidden**0.5)
        if hasattr(embedding, "scalar_embed_scale"):
            embedding.scalar_embed_scale = new_hidden**0.5
    if tied:
        head.weight = embedding.weight
    elif head is not None:
        head.weight = nn.Parameter(head.weight.data.index_select(1, index.to(head.weight.device)),
                                   requires_grad=head.weight.requires_grad)
    if head is not None:
        head.in_features = new_hidden
    # A tied head was rescaled with the embedding; the final norm, which feeds only the head, undoes it.
    final_factor = factor / embedding_factor if tied else factor
    _fold_norm(model.get_submodule(arch.final_norm), index, final_factor, arch.norm_weight_offset)
    for layer in decoder_layers(model, arch.to_dict()):
        for name in arch.attention_norms + arch.mlp_norms:
            _fold_norm(getattr(layer, name), index, factor, arch.norm_weight_offset)
        attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
        if not isinstance(attention, RemovedAttention):
            for name in (arch.q_proj, arch.k_proj, arch.v_proj, arch.qkv_proj):
                _read_hidden(attention, name, index)
            _write_hidden(attention, arch.o_proj, index)
            own = getattr(attention, "config", None)
            if own is not None and own is not model.config:
                own.hidden_size = new_hidden
        if not isinstance(mlp, RemovedMLP):
            for name in (arch.gate_proj, arch.up_proj, arch.gate_up_proj):
                _read_hidden(mlp, name, index)
            _write_hidden(mlp, arch.down_proj, index)
    model.config.hidden_size = new_hidden


def prune_layer(layer: nn.Module, arch: Architecture, kept: KeptLayer, before, config, head_dim: int) -> None:
    """Cut one decoder layer, in place, to what `kept` keeps of it (`before`: its shape now)."""
    _prune_attention(layer, arch, kept, before, config, head_dim)
    _prune_mlp(layer, arch, kept, before, config)


def _renumber_layers(model: nn.Module, arch: Architecture, kept: list[KeptLayer]) -> None:
    """Keep only the surviving decoder layers and give them (and their caches) new indices."""
    layers = decoder_layers(model, arch.to_dict())
    survivors = [layers[k.source_index] for k in kept]
    parent_name, _, list_name = arch.layers.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, list_name, nn.ModuleList(survivors))
    for new_index, layer in enumerate(survivors):
        for module in (layer, getattr(layer, arch.attention)):
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        config.layer_types = [layer_types[k.source_index] for k in kept]
    config.num_hidden_layers = len(survivors)


def _set_model_format(model: nn.Module, arch: Architecture, structure: ModelStructure) -> None:
    """Describe the new shapes in the config: the stock fields when every layer has the same
    shape and the stock config accepts it, else prunekit's per-layer `layer_shapes`."""
    config = model.config
    shape = structure.layers[0]
    stock_ok = structure.is_uniform() and not (
        arch.config_requires_heads_divide_hidden and config.hidden_size % shape.num_attention_heads
    )
    config_class, model_class = pruned_classes(arch.model_type, arch.to_dict())
    if stock_ok:
        if isinstance(config, config_class):  # a pruned model that became uniform again
            model.__class__ = model_class.__mro__[1]
            config.__class__ = config_class.__mro__[1]
            config.model_type = config.__class__.model_type  # loaded configs carry it per instance
            del config.layer_shapes
        config.num_attention_heads = shape.num_attention_heads
        config.num_key_value_heads = shape.num_key_value_heads
        dense = next((s for s in structure.layers if not s.num_experts), None)
        moe = next((s for s in structure.layers if s.num_experts), None)
        if dense is not None:
            config.intermediate_size = dense.intermediate_size
        if moe is not None:
            setattr(config, arch.expert_width_key, moe.intermediate_size)
            setattr(config, arch.num_experts_key, moe.num_experts)
            setattr(config, arch.top_k_key, min(getattr(config, arch.top_k_key), moe.num_experts))
            if arch.shared_expert_width_key and moe.shared_expert_size:
                setattr(config, arch.shared_expert_width_key, moe.shared_expert_size)
    else:
        # The stock fields keep the source's values (its config class validates them);
        # from_pretrained builds that model, then reshapes each layer to layer_shapes.
        if not isinstance(config, config_class):
            model.__class__ = model_class
            config.__class__ = config_class
            config.model_type = config_class.model_type
        config.layer_shapes = [s.to_dict() for s in structure.layers]
        if arch.config_requires_heads_divide_hidden and config.hidden_size % config.num_attention_heads:
            # A pruned hidden size that the source's head count does not divide: the stock fields
            # only size the constructor (layer_shapes reshapes every layer), so give it counts
            # that the config class accepts.
            config.num_attention_heads = math.gcd(config.hidden_size, config.num_attention_heads)
            config.num_key_value_heads = math.gcd(config.num_attention_heads, config.num_key_value_heads)
    if arch.attention_reads_config:
        # Layers whose head counts now match the model config share it again.
        for layer in decoder_layers(model, arch.to_dict()):
            attention = getattr(layer, arch.attention)
            own = getattr(attention, "config", None)
            if own is not None and own is not config and (own.num_attention_heads, own.num_key_value_heads) == (
                config.num_attention_heads, config.num_key_value_heads
            ):
                attention.config = config


@torch.no_grad()
def apply_plan(model: nn.Module, plan: Plan) -> ModelStructure:
    """Prune `model` in place to `plan`; returns the new structure.

    Every check runs before the first weight changes: a bad plan leaves the model untouched.
    """
    arch = architecture_for(model.config.model_type)
    before = model_structure(model)
    kept = resolve_plan(plan, before)
    hidden = kept_hidden(plan, before)
    prunes_hidden = len(hidden) < before.hidden_size
    if arch.attention_norms_span_heads and any(k.shape.num_attention_heads not in (0, before.layers[k.source_index].num_attention_heads)
                                               or k.shape.num_key_value_heads not in (0, before.layers[k.source_index].num_key_value_heads)
                                               for k in kept):
        raise PlanError(f"{arch.model_type} normalises queries and keys over all heads at once, so removing some heads "
                        f"would change what the kept ones compute; prune experts, whole attention sublayers or layers "
                        f"instead (remove head and kv_group from --prune-structures)")
    if prunes_hidden and arch.is_moe:
        raise PlanError(f"prunekit cannot prune the hidden size of {arch.model_type} (a mixture of experts) yet; "
                        f"remove keep_hidden from the plan (or hidden from --prune-structures)")
    if plan.is_empty() or (not prunes_hidden and replace(plan, keep_hidden=None).is_empty()):
        return before
    config = model.config
    config.head_dim = before.head_dim  # explicit from now on: heads no longer divide hidden_size
    if prunes_hidden:  # first, so that the layers' new projections are built at the new width
        prune_hidden(model, arch, hidden, before.hidden_size)
    layers = decoder_layers(model, arch.to_dict())
    for k in kept:
        prune_layer(layers[k.source_index], arch, k, before.layers[k.source_index], config, before.head_dim)
    _renumber_layers(model, arch, kept)
    after = model_structure(model)
    _set_model_format(model, arch, after)
    return after
