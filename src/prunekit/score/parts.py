"""Per-layer access to the weights a criterion needs: the rows and columns that belong to each
head, KV group and FFN channel, whatever the family's module layout (separate or fused)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.models.architecture import Architecture, architecture_for
from prunekit.models.modeling_prunekit import RemovedAttention, RemovedMLP, decoder_layers, head_dim_of, shared_expert_of


@dataclass
class AttentionWeights:
    q: torch.Tensor        # [heads, head_dim, hidden]     (rows of q_proj per head)
    k: torch.Tensor        # [groups, head_dim, hidden]
    v: torch.Tensor        # [groups, head_dim, hidden]
    o: torch.Tensor        # [heads, hidden, head_dim]     (columns of o_proj per head)
    heads_per_group: int


@dataclass
class MLPWeights:
    gate: torch.Tensor     # [channels, hidden]
    up: torch.Tensor       # [channels, hidden]
    down: torch.Tensor     # [channels, hidden]  (columns of down_proj, transposed)


def _grad_or_weight(p: nn.Parameter, use_grad: bool) -> torch.Tensor:
    return p.grad if use_grad else p.data


def attention_weights(layer: nn.Module, arch: Architecture, head_dim: int, *, grad: bool = False) -> AttentionWeights | None:
    attention = getattr(layer, arch.attention)
    if isinstance(attention, RemovedAttention):
        return None
    o = _grad_or_weight(getattr(attention, arch.o_proj).weight, grad)
    heads = o.shape[1] // head_dim
    if arch.qkv_proj:
        qkv = _grad_or_weight(getattr(attention, arch.qkv_proj).weight, grad)
        groups = (qkv.shape[0] // head_dim - heads) // 2
        q, k, v = qkv.split([heads * head_dim, groups * head_dim, groups * head_dim])
    else:
        q, k, v = (_grad_or_weight(getattr(attention, name).weight, grad) for name in (arch.q_proj, arch.k_proj, arch.v_proj))
        groups = k.shape[0] // head_dim
    hidden = o.shape[0]
    return AttentionWeights(
        q=q.reshape(heads, head_dim, hidden),
        k=k.reshape(groups, head_dim, hidden),
        v=v.reshape(groups, head_dim, hidden),
        o=o.reshape(hidden, heads, head_dim).permute(1, 0, 2),
        heads_per_group=heads // groups,
    )


def mlp_weights(layer: nn.Module, arch: Architecture, *, grad: bool = False) -> MLPWeights | None:
    mlp = getattr(layer, arch.mlp)
    if isinstance(mlp, RemovedMLP) or not hasattr(mlp, arch.down_proj):  # removed, or a MoE block (experts go whole)
        return None
    down = _grad_or_weight(getattr(mlp, arch.down_proj).weight, grad)
    if arch.gate_up_proj:
        gate, up = _grad_or_weight(getattr(mlp, arch.gate_up_proj).weight, grad).chunk(2, dim=0)
    else:
        gate, up = (_grad_or_weight(getattr(mlp, name).weight, grad) for name in (arch.gate_proj, arch.up_proj))
    return MLPWeights(gate=gate, up=up, down=down.T)


def shared_expert_weights(layer: nn.Module, arch: Architecture, *, grad: bool = False) -> MLPWeights | None:
    """The weights of the shared expert of a MoE layer (Qwen2-MoE), a dense gated MLP; None when the
    layer has none."""
    shared = shared_expert_of(layer, arch.to_dict())
    if shared is None:
        return None
    down = _grad_or_weight(getattr(shared, arch.down_proj).weight, grad)
    gate, up = (_grad_or_weight(getattr(shared, name).weight, grad) for name in (arch.gate_proj, arch.up_proj))
    return MLPWeights(gate=gate, up=up, down=down.T)


def layers_of(model: nn.Module) -> tuple[Architecture, list[nn.Module], int]:
    arch = architecture_for(model.config.model_type)
    return arch, list(decoder_layers(model, arch.to_dict())), head_dim_of(model.config)


def group_sum(head_scores: torch.Tensor, heads_per_group: int) -> torch.Tensor:
    """Scores of KV groups as the sum over their query heads."""
    return head_scores.reshape(-1, heads_per_group).sum(-1)
