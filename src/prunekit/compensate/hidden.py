"""Compensation for hidden-size pruning: before surgery, refit the projections that read the
residual stream (q/k/v or qkv, gate/up or gate_up, and an untied output head) so that their kept
input channels reproduce, on the calibration data, what all channels produced.

A reader W [out, d] sees the output X of a norm over the stream; with K the kept and R the
removed channels and G = X Xᵀ, the refit is `refit_kept_columns` (least_squares.py):
W_K' = W_K + W_R G[R,K] (G[K,K] + λI)⁻¹, a ridge regression of the removed channels on the kept
ones. The Gram matrices come from one pass of the dense model; surgery then cuts the columns.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.compensate.least_squares import DEFAULT_RIDGE, refit_kept_columns
from prunekit.models.architecture import Architecture, architecture_for
from prunekit.models.modeling_prunekit import RemovedAttention, RemovedMLP, decoder_layers
from prunekit.models.structure import model_structure
from prunekit.plan.plan import Plan, kept_hidden


def _readers(layer: nn.Module, arch: Architecture) -> list[tuple[nn.Module, list[nn.Linear]]]:
    """(input norm, the projections that read its output) for each sublayer of `layer`."""
    from prunekit.score.statistics import input_norms

    norms = input_norms(layer, arch)
    attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
    groups = []
    if not isinstance(attention, RemovedAttention):
        groups.append([getattr(attention, n) for n in (arch.q_proj, arch.k_proj, arch.v_proj, arch.qkv_proj) if n])
    if not isinstance(mlp, RemovedMLP):
        groups.append([getattr(mlp, n) for n in (arch.gate_proj, arch.up_proj, arch.gate_up_proj) if n])
    return list(zip(norms, groups))


@torch.no_grad()
def norm_output_grams(model: nn.Module, norms: list[nn.Module], input_ids: torch.Tensor, *, batch_size: int = 8,
                      progress: bool = True) -> list[torch.Tensor]:
    """X Xᵀ (float64) of each norm's output over the calibration tokens, in one pass of `model`."""
    from prunekit.score.statistics import FeatureStats

    device = next(model.parameters()).device
    stats = [FeatureStats.empty(norm.weight.shape[0], True, device) for norm in norms]
    handles = [norm.register_forward_hook(lambda m, args, output, s=s: s.add(output.detach()))
               for norm, s in zip(norms, stats)]
    try:
        for start in tqdm(range(0, len(input_ids), batch_size), desc="hidden refit: calibration pass", unit="batch",
                          disable=not progress):
            model.base_model(input_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [s.gram for s in stats]


@torch.no_grad()
def refit_hidden_readers(model: nn.Module, plan: Plan, input_ids: torch.Tensor, *, ridge: float = DEFAULT_RIDGE,
                         batch_size: int = 8, progress: bool = True) -> dict:
    """Refit, in place and before `apply_plan`, every projection that reads the residual stream
    onto the channels `plan.keep_hidden` keeps. Returns what was done (for the run's record)."""
    structure = model_structure(model)
    keep = kept_hidden(plan, structure)
    if len(keep) == structure.hidden_size:
        return {"projections": 0, "ridge": ridge}
    arch = architecture_for(model.config.model_type)
    pairs = [pair for layer in decoder_layers(model, arch.to_dict()) for pair in _readers(layer, arch)]
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embedding.weight:  # a tied head is the embedding: it stays
        pairs.append((model.get_submodule(arch.final_norm), [head]))
    grams = norm_output_grams(model, [norm for norm, _ in pairs], input_ids, batch_size=batch_size, progress=progress)
    index = torch.tensor(keep, dtype=torch.long)
    count = 0
    for (_, readers), gram in zip(pairs, grams):
        for linear in readers:
            kept = refit_kept_columns(linear.weight.data, gram, index.to(gram.device), ridge)
            linear.weight.data[:, index.to(linear.weight.device)] = kept.to(linear.weight.dtype).to(linear.weight.device)
            count += 1
    return {"projections": count, "ridge": ridge}
