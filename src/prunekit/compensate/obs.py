"""Structured OBS: choose WHICH units of a layer go by what the optimal update of the kept
weights can restore, then apply that update (ZipLM, SlimGPT).

For a projection W [out, in] whose inputs X have the damped Gram matrix H = X Xᵀ + λI, removing
the input columns S and moving the kept columns optimally,

    W' = argmin_{W'_S = 0} tr((W' − W) H (W' − W)ᵀ)  =  W − W_S [(H⁻¹)_SS]⁻¹ (H⁻¹)_S,:

costs tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ), i.e. ||(W' − W) X||² + λ||W' − W||². The same update is the
least-squares refit of the kept columns with a ridge pulling toward W_K (least_squares.py), so
OBS changes only the choice, not the kind of repair. Removing S in steps, each step updating W
and down-dating H⁻¹ (H⁻¹ ← H⁻¹ − H⁻¹_:,S [(H⁻¹)_SS]⁻¹ H⁻¹_S,:), gives the same W' and the same
total cost as removing S at once; greedy selection picks, step by step, the cheapest units given
what has already gone.

Units: FFN channels are single columns of down_proj, removed `channels_per_step` at a time (the
cheapest by single-column cost, then jointly); heads are head_dim columns of o_proj. GQA needs
the same number of query heads in every kept KV group, so whole groups go first, then single
heads, one at a time, from the groups that still owe one.

How many units each layer loses comes from the plan (the planner's allocation); `select_and_update`
only re-picks which ones, sequentially, on the inputs of the model pruned up to each layer, and
returns the revised plan: the same widths, so the same parameter count.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from prunekit.compensate.bias import CompensationError
from prunekit.compensate.least_squares import DEFAULT_RIDGE, reconstruction_error, refit_kept_columns
from prunekit.compensate.sequential import ProjectionSolver, sequential_pass
from prunekit.models.modeling_prunekit import head_dim_of
from prunekit.models.structure import model_structure
from prunekit.plan.plan import KeptLayer, LayerPlan, Plan, resolve_plan

# SlimGPT's and the SmolLM2 reproduction's damping: 1% of the mean diagonal of H. Relative, so one
# value fits any token count and activation scale.
DEFAULT_DAMPING = 1e-2
# The SmolLM2 reproduction removed 8 FFN channels per exact step (48.96 at 20%).
DEFAULT_CHANNELS_PER_STEP = 8


# --------------------------------------------------------------------------- tensor math


def damped_inverse(gram: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """(H + λI)⁻¹ in float64 with λ = damping × mean diagonal of H (1 when every feature is dead)."""
    gram = gram.to(torch.float64)
    energy = gram.diagonal().mean()
    scale = damping * (energy if energy > 0 else 1.0)
    damped = gram + scale * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(damped)
    if info:
        raise CompensationError(f"the damped Gram matrix is not positive definite (damping={damping}); "
                                f"pass a positive damping such as {DEFAULT_DAMPING}")
    return torch.cholesky_inverse(factor)


def removal_cost(weight: torch.Tensor, hinv: torch.Tensor, removed: torch.Tensor) -> float:
    """tr(W_S [(H⁻¹)_SS]⁻¹ W_Sᵀ): the damped output error of removing columns S with the optimal update."""
    if len(removed) == 0:
        return 0.0
    weight = weight.to(hinv.dtype)
    w_s = weight[:, removed]
    return float((torch.linalg.solve(hinv[removed][:, removed], w_s.T) * w_s.T).sum())


def remove_columns(weight: torch.Tensor, hinv: torch.Tensor, removed: torch.Tensor) -> float:
    """Remove columns S of `weight` with the optimal update of the rest and down-date `hinv`, both
    in place (float64); returns the cost. Removed columns end exactly zero."""
    if len(removed) == 0:
        return 0.0
    block = hinv[removed][:, removed]
    w_s = weight[:, removed]
    # [(H⁻¹)_SS]⁻¹ is symmetric: one solve serves the weight update, the down-date and the cost.
    solved = torch.linalg.solve(block, torch.cat([w_s.T, hinv[removed]], 1))  # [|S|, out + in]
    out = weight.shape[0]
    cost = float((solved[:, :out] * w_s.T).sum())
    weight.addmm_(solved[:, :out].T, hinv[removed], alpha=-1)
    hinv.addmm_(hinv[:, removed], solved[:, out:], alpha=-1)  # in place: no n x n temporary
    weight[:, removed] = 0
    hinv[removed] = 0
    hinv[:, removed] = 0
    return cost


def unit_costs(weight: torch.Tensor, hinv: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """The removal cost of each unit alone, given what has gone: `units` [n, width] holds each
    unit's columns; returns [n]."""
    if units.shape[1] == 1:
        columns = units[:, 0]
        # every column's norm, then the units': gathering the columns first copies the whole matrix
        # at every greedy step (470 MB at Llama-3-8B's down_proj)
        return weight.square().sum(0)[columns] / hinv.diagonal()[columns]
    blocks = hinv[units[:, :, None], units[:, None, :]]         # [n, width, width]
    w_units = weight[:, units].permute(1, 2, 0)                 # [n, width, out]
    return (torch.linalg.solve(blocks, w_units) * w_units).sum((1, 2))


def greedy_channels(weight: torch.Tensor, hinv: torch.Tensor, n_remove: int,
                    per_step: int = DEFAULT_CHANNELS_PER_STEP) -> tuple[list[int], float]:
    """Remove `n_remove` single columns, the `per_step` cheapest at a time, updating `weight` and
    `hinv` in place; (removed columns in order, total cost)."""
    gone = torch.zeros(weight.shape[1], dtype=torch.bool, device=weight.device)
    every = torch.arange(weight.shape[1], device=weight.device)[:, None]
    order, total = [], 0.0
    while len(order) < n_remove:
        costs = unit_costs(weight, hinv, every).masked_fill(gone, math.inf)
        step = costs.topk(min(per_step, n_remove - len(order)), largest=False).indices
        total += remove_columns(weight, hinv, step)
        gone[step] = True
        order += step.tolist()
    return order, total


def greedy_heads(weight: torch.Tensor, hinv: torch.Tensor, *, head_dim: int, heads_per_group: int,
                 keep_groups: int, keep_heads_per_group: int) -> tuple[list[int], list[int], float]:
    """GQA-respecting greedy head removal on o_proj, in place: first whole KV groups (all their query
    heads), then single heads from the kept groups until each keeps `keep_heads_per_group`;
    (kept KV groups, kept query heads, total cost)."""
    n_groups = weight.shape[1] // (head_dim * heads_per_group)
    columns = torch.arange(weight.shape[1], device=weight.device)
    group_columns = columns.view(n_groups, heads_per_group * head_dim)
    head_columns = columns.view(n_groups * heads_per_group, head_dim)
    groups, total = list(range(n_groups)), 0.0
    while len(groups) > keep_groups:
        costs = unit_costs(weight, hinv, group_columns[groups])
        cheapest = groups[int(costs.argmin())]
        total += remove_columns(weight, hinv, group_columns[cheapest])
        groups.remove(cheapest)
    heads = {g: list(range(g * heads_per_group, (g + 1) * heads_per_group)) for g in groups}
    while any(len(kept) > keep_heads_per_group for kept in heads.values()):
        candidates = [h for kept in heads.values() if len(kept) > keep_heads_per_group for h in kept]
        cheapest = candidates[int(unit_costs(weight, hinv, head_columns[candidates]).argmin())]
        total += remove_columns(weight, hinv, head_columns[cheapest])
        heads[cheapest // heads_per_group].remove(cheapest)
    return groups, sorted(h for kept in heads.values() for h in kept), total


# --------------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class SelectionFit:
    """One re-selected projection. Errors are ||W X − W' X||² / ||W X||² on its calibration inputs
    (undamped): the plan's own choice cut plainly, the plan's choice refitted (what sequential
    compensation gives), and OBS's choice with its update."""

    layer: int
    sublayer: str            # "attention" (o_proj) or "mlp" (down_proj)
    kept: int                # units kept (channels, or query heads)
    removed: int
    changed: int             # units OBS removes that the plan kept
    error_plan_cut: float
    error_plan_refit: float
    error_obs: float


@dataclass(frozen=True)
class SelectionReport:
    fits: tuple[SelectionFit, ...]
    damping: float
    channels_per_step: int

    def to_dict(self) -> dict:
        return {"method": "obs", "damping": self.damping, "channels_per_step": self.channels_per_step,
                "fits": [asdict(fit) for fit in self.fits]}


def obs_solver(structure, kept_by_source: dict[int, KeptLayer], *, damping: float = DEFAULT_DAMPING,
               channels_per_step: int = DEFAULT_CHANNELS_PER_STEP, head_dim: int,
               chosen: dict, plan_refit_errors: dict) -> ProjectionSolver:
    """A `sequential_pass` solver that re-picks the removed units by greedy structured OBS (as many
    as the plan removes) and returns OBS's updated weight; records each choice in `chosen`
    ((layer, "attention") -> (kept KV groups, kept query heads); (layer, "mlp") -> kept channels)
    and what the plan's own choice refitted would leave in `plan_refit_errors`; `kept_by_source` is
    what the plan keeps of each source layer (`resolve_plan`)."""

    def solve(layer: int, sublayer: str, dense: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor):
        weight, hinv = dense.clone(), damped_inverse(gram, damping)
        if sublayer == "attention":
            kept, shape = kept_by_source[layer], structure.layers[layer]
            groups, heads, _ = greedy_heads(
                weight, hinv, head_dim=head_dim, heads_per_group=shape.heads_per_group,
                keep_groups=len(kept.kv_groups), keep_heads_per_group=len(kept.query_heads) // len(kept.kv_groups))
            chosen[layer, sublayer] = (groups, heads)
            columns = _head_columns(tuple(heads), head_dim, weight.device)
        else:
            gone, _ = greedy_channels(weight, hinv, dense.shape[1] - len(keep), channels_per_step)
            remaining = torch.ones(dense.shape[1], dtype=torch.bool, device=weight.device)
            remaining[gone] = False
            columns = remaining.nonzero().flatten()
            chosen[layer, sublayer] = columns.tolist()
        del hinv
        refit = torch.zeros_like(dense)  # what sequential compensation makes of the plan's own choice
        refit[:, keep] = refit_kept_columns(dense, gram, keep, DEFAULT_RIDGE)
        plan_refit_errors[layer, sublayer] = reconstruction_error(dense, refit, gram)
        return weight, columns

    return solve


@torch.no_grad()
def select_and_update(model: nn.Module, plan: Plan, input_ids: torch.Tensor, *, damping: float = DEFAULT_DAMPING,
                      channels_per_step: int = DEFAULT_CHANNELS_PER_STEP, batch_size: int = 8, progress: bool = True,
                      device: torch.device | str | None = None, autocast: bool = True) -> tuple[Plan, SelectionReport]:
    """Re-pick, layer by layer, which heads and FFN channels `plan` removes (keeping its counts) by
    structured OBS on the inputs of the model pruned so far, and apply the optimal update to
    o_proj / down_proj in place, before `apply_plan`; returns (the revised plan, a report).

    The pass is sequential compensation's (`sequential_pass`: the stream on `device`, each layer
    visiting it, bf16 autocast where it pays, at most two layer passes), with OBS choosing and
    updating instead of refitting the plan's choice. Removed columns are zeroed, so the stream is
    the pruned model's and the cut changes nothing; dropped layers are skipped, dropped sublayers zeroed."""
    if not (math.isfinite(damping) and damping > 0):
        raise CompensationError(f"OBS damping must be a positive finite number, got {damping}; the default is {DEFAULT_DAMPING}")
    if channels_per_step < 1:
        raise CompensationError(f"channels_per_step must be at least 1, got {channels_per_step}")
    structure = model_structure(model)
    head_dim = head_dim_of(model.config)
    kept_by_source: dict[int, KeptLayer] = {k.source_index: k for k in resolve_plan(plan, structure)}
    chosen: dict = {}
    plan_refit_errors: dict = {}
    solve = obs_solver(structure, kept_by_source, damping=damping, channels_per_step=channels_per_step, head_dim=head_dim,
                       chosen=chosen, plan_refit_errors=plan_refit_errors)
    passes = sequential_pass(model, plan, input_ids, solve, batch_size=batch_size, progress=progress, device=device,
                             autocast=autocast, desc="OBS selection: layer passes")
    revised, fits = dict(plan.layers), []
    for layer, sublayer, _, _, error_cut, error_obs, _ in passes:
        own, kept = revised.get(layer, LayerPlan()), kept_by_source[layer]
        if sublayer == "attention":
            groups, heads = chosen[layer, sublayer]
            revised[layer] = replace(own, keep_query_heads=tuple(heads), keep_kv_groups=tuple(groups))
            units, plan_units, total = heads, kept.query_heads, structure.layers[layer].num_attention_heads
        else:
            channels = chosen[layer, sublayer]
            revised[layer] = replace(own, keep_channels=tuple(channels))
            units, plan_units, total = channels, kept.channels, structure.layers[layer].intermediate_size
        fits.append(SelectionFit(layer, sublayer, len(units), total - len(units), len(set(plan_units) - set(units)),
                                 error_cut, plan_refit_errors[layer, sublayer], error_obs))
    meta = {**plan.meta, "selection": {"method": "obs", "damping": damping, "channels_per_step": channels_per_step}}
    return replace(plan, layers=revised, meta=meta), SelectionReport(tuple(fits), damping, channels_per_step)


def _head_columns(heads: tuple[int, ...], head_dim: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long, device=device)
