"""Training-free compensation: before surgery, refit the output projections (o_proj, down_proj)
of every width-pruned sublayer so that its kept input features reproduce, on the calibration
data, what all of its features produced. The architecture stays standard: surgery then cuts the
removed columns as usual.

With X [in, tokens] the original model's calibration inputs of a projection W [out, in], K the
kept and R the removed input features, and G = X Xᵀ:

    W_K' = argmin ||W_K' X_K − W X||² + λ ||W_K' − W_K||²  =  W_K + W_R G[R,K] (G[K,K] + λI)⁻¹

Everything is computed from G (and, for a bias, the feature sums), never from X itself. Each
projection is fitted to the original model's inputs of its own layer; where a family normalises a
sublayer's output (Gemma's sandwich norms) the fit targets the projection's output before that norm.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from prunekit.compensate.bias import CompensationError, bias_flags, enable_output_biases, mean_replacement_bias
from prunekit.models.architecture import Architecture, architecture_for
from prunekit.models.modeling_prunekit import decoder_layers
from prunekit.models.structure import model_structure
from prunekit.plan.plan import Plan, resolve_plan

if TYPE_CHECKING:
    from prunekit.score.statistics import FeatureStats, LayerStats

# Relative to the mean diagonal of G[K,K]. G[K,K] is often near-singular (dead channels, heads
# that echo each other, fewer calibration tokens than kept features), and an exact solve then
# turns quirks of the calibration set into large weights. Scaling by the mean energy of a kept
# feature makes one value fit any token count and activation scale; 1e-3 damps only directions
# carrying under ~0.1% of a typical feature's energy (SparseGPT damps its Hessian with 1e-2).
DEFAULT_RIDGE = 1e-3


# --------------------------------------------------------------------------- tensor math


def _removed_mask(keep: torch.Tensor, width: int) -> torch.Tensor:
    removed = torch.ones(width, dtype=torch.bool, device=keep.device)
    removed[keep] = False
    return removed


def refit_kept_columns(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """Least-squares weights [out, len(keep)] for the kept columns of `weight` [out, in].

    `gram` [in, in] is X Xᵀ of the projection's inputs (float64); `keep` the kept input features
    (LongTensor). The ridge pulls toward the unchanged columns W_K rather than toward zero, so a
    large ridge degrades to plain pruning and the result can never reconstruct the calibration
    outputs worse than W_K does.
    """
    weight = weight.to(gram.dtype)
    removed = _removed_mask(keep, weight.shape[1])
    gram_kk = gram[keep][:, keep]
    energy = gram_kk.diagonal().mean()
    if energy == 0:  # the kept features never fire, so G[R,K] = 0 too: nothing can be moved onto them
        return weight[:, keep]
    factor, info = torch.linalg.cholesky_ex(gram_kk + ridge * energy * torch.eye(len(keep), dtype=gram.dtype, device=gram.device))
    if info:
        raise CompensationError(
            f"the Gram matrix of the kept features is singular (ridge={ridge}); pass a positive ridge such as {DEFAULT_RIDGE}"
        )
    # (G[K,K] + λI) is symmetric, so W_R G[R,K] (G[K,K] + λI)⁻¹ is the transpose of one solve.
    correction = torch.cholesky_solve(gram[keep][:, removed] @ weight[:, removed].T, factor).T
    return weight[:, keep] + correction


def augment_gram(gram: torch.Tensor, feature_sum: torch.Tensor, tokens: int) -> torch.Tensor:
    """The Gram matrix [in + 1, in + 1] of X with a constant row of ones appended: a bias is the
    weight of that constant feature."""
    column = feature_sum.to(gram.dtype).unsqueeze(1)
    corner = torch.tensor([[float(tokens)]], dtype=gram.dtype, device=gram.device)
    return torch.cat([torch.cat([gram, column], 1), torch.cat([column.T, corner], 1)], 0)


def reconstruction_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor,
                         reference: torch.Tensor | None = None) -> float:
    """||W X − W' X||² / ||W X||², from the Gram matrix alone (removed columns of W' are zero);
    `reference`, ||W X||², where the caller already has it."""
    weight, difference = weight.to(gram.dtype), (weight - new_weight).to(gram.dtype)
    error = ((difference @ gram) * difference).sum()
    if reference is None:
        reference = ((weight @ gram) * weight).sum()
    return (error / reference).item() if reference > 0 else 0.0


# --------------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class ProjectionFit:
    """What compensation did to one output projection. Errors are relative to ||W X||² on the
    calibration statistics (None when they carry no Gram matrix): `error_before` is what surgery
    alone would leave, `error_after` what remains after the refit."""

    layer: int              # source layer index
    sublayer: str           # "attention" (o_proj) or "mlp" (down_proj)
    kept: int               # input features kept
    removed: int
    error_before: float | None
    error_after: float | None


@dataclass(frozen=True)
class CompensationReport:
    fits: tuple[ProjectionFit, ...]
    ridge: float
    least_squares: bool
    bias: bool

    def to_dict(self) -> dict:
        return {"ridge": self.ridge, "least_squares": self.least_squares, "bias": self.bias,
                "fits": [asdict(fit) for fit in self.fits]}

    def table(self) -> str:
        def percent(value: float | None) -> str:
            return "-" if value is None else f"{100 * value:.2f}%"

        lines = ["layer  sublayer   kept/total  error before -> after"]
        for fit in self.fits:
            lines.append(f"{fit.layer:>5}  {fit.sublayer:<9} {fit.kept:>5}/{fit.kept + fit.removed:<5}"
                         f"  {percent(fit.error_before):>12} -> {percent(fit.error_after)}")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Job:
    layer: int
    sublayer: str
    projection: nn.Linear
    stats: FeatureStats
    keep: tuple[int, ...]


def _jobs(model: nn.Module, arch: Architecture, plan: Plan, stats: list[LayerStats]) -> list[_Job]:
    """The width-pruned sublayers of `plan`, with the columns each keeps; checks the plan."""
    structure = model_structure(model)
    kept_layers = resolve_plan(plan, structure)
    if len(stats) != structure.num_layers:
        raise CompensationError(
            f"got statistics for {len(stats)} layers, but the model has {structure.num_layers}; collect them "
            f"on this model with collect_layer_stats(model, ids, with_gram=True)"
        )
    layers = decoder_layers(model, arch.to_dict())
    head_dim = structure.head_dim
    jobs = []
    for kept in kept_layers:
        index, before = kept.source_index, structure.layers[kept.source_index]
        layer = layers[index]
        # A sublayer dropped whole keeps no columns, so there is nothing to refit.
        if kept.query_heads and len(kept.query_heads) < before.num_attention_heads:
            columns = tuple(h * head_dim + d for h in kept.query_heads for d in range(head_dim))
            o_proj = getattr(getattr(layer, arch.attention), arch.o_proj)
            jobs.append(_Job(index, "attention", o_proj, stats[index].attention_input, columns))
        if kept.channels and len(kept.channels) < before.intermediate_size:
            down_proj = getattr(getattr(layer, arch.mlp), arch.down_proj)
            jobs.append(_Job(index, "mlp", down_proj, stats[index].mlp_input, kept.channels))
    return jobs


def _check_stats(job: _Job, need_gram: bool) -> None:
    projection = "o_proj" if job.sublayer == "attention" else "down_proj"
    where = f"layer {job.layer} {projection}"
    fix = "collect them on this model, before pruning, with collect_layer_stats(model, ids, with_gram=True)"
    if job.stats is None or job.stats.tokens == 0:
        raise CompensationError(f"the statistics have no inputs of {where}; {fix}")
    if job.stats.sum.numel() != job.projection.in_features:
        raise CompensationError(
            f"the statistics of {where} have {job.stats.sum.numel()} features, the projection has "
            f"{job.projection.in_features} inputs; {fix}"
        )
    if need_gram and job.stats.gram is None:
        raise CompensationError(f"least-squares compensation needs Gram matrices, which the statistics of {where} lack; {fix}")


def _fit(job: _Job, *, ridge: float, least_squares: bool, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None, ProjectionFit]:
    """New kept columns [out, len(keep)] and bias delta [out] (or None) of one projection, in float64."""
    weight = job.projection.weight.detach()
    device = weight.device
    stats = job.stats
    keep = torch.tensor(job.keep, dtype=torch.long, device=device)
    gram = stats.gram.to(device) if stats.gram is not None else None
    weight = weight.to(torch.float64)
    if bias:
        # A bias is the weight of a constant input feature that the original projection does not
        # use (weight 0) and the pruned one keeps; refitting it with the kept columns fits both jointly.
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], 1)], 1)
        keep = torch.cat([keep, keep.new_tensor([weight.shape[1] - 1])])
        gram = augment_gram(gram, stats.sum.to(device), stats.tokens) if gram is not None else None
    if least_squares:
        new_kept = refit_kept_columns(weight, gram, keep, ridge)
    else:
        # Bias only (FLAP): the kept columns stay, the constant feature carries W_R · mean(X_R).
        new_bias = mean_replacement_bias(weight[:, :-1], stats.mean.to(device), keep[:-1])
        new_kept = torch.cat([weight[:, keep[:-1]], new_bias.unsqueeze(1)], 1)
    errors: tuple[float | None, float | None] = (None, None)
    if gram is not None:
        pruned = torch.zeros_like(weight)
        pruned[:, keep] = weight[:, keep]
        refit = torch.zeros_like(weight)
        refit[:, keep] = new_kept
        errors = (reconstruction_error(weight, pruned, gram), reconstruction_error(weight, refit, gram))
    report = ProjectionFit(job.layer, job.sublayer, len(job.keep), job.projection.in_features - len(job.keep), *errors)
    if bias:
        return new_kept[:, :-1], new_kept[:, -1], report
    return new_kept, None, report


@torch.no_grad()
def compensate(
    model: nn.Module,
    plan: Plan,
    stats: list[LayerStats],
    *,
    ridge: float = DEFAULT_RIDGE,
    least_squares: bool = True,
    bias: bool = False,
) -> CompensationReport:
    """Refit, in place, the output projections of the sublayers `plan` narrows, before `apply_plan`.

    `stats` are the unpruned model's calibration statistics from
    `collect_layer_stats(model, ids, with_gram=True)` (the Gram matrices may be left out for
    `least_squares=False`, at the price of no errors in the report). `least_squares` refits the
    kept columns of o_proj and down_proj; `bias` adds a bias that stands in for the removed
    features' mean (jointly fitted with the columns when both are on; Llama only). Every check
    runs before the first weight changes.
    """
    if not least_squares and not bias:
        raise CompensationError("least_squares=False and bias=False leave nothing to compensate; switch one of them on")
    # A positive ridge makes every solve well-posed, so no layer can fail after others were written.
    if not (math.isfinite(ridge) and ridge > 0):
        raise CompensationError(f"ridge must be a positive finite number, got {ridge}; the default is {DEFAULT_RIDGE}")
    arch = architecture_for(model.config.model_type)
    if bias:
        bias_flags(arch)
    jobs = _jobs(model, arch, plan, stats)
    for job in jobs:
        _check_stats(job, need_gram=least_squares)
    if bias and jobs:
        sublayers = {job.sublayer for job in jobs}
        enable_output_biases(model, arch, attention="attention" in sublayers, mlp="mlp" in sublayers)
    fits = []
    for job in jobs:
        new_kept, new_bias, fit = _fit(job, ridge=ridge, least_squares=least_squares, bias=bias)
        weight = job.projection.weight
        columns = torch.tensor(job.keep, dtype=torch.long, device=weight.device)
        weight[:, columns] = new_kept.to(weight.dtype)
        if new_bias is not None:
            job.projection.bias += new_bias.to(job.projection.bias.dtype)
        fits.append(fit)
    return CompensationReport(tuple(fits), ridge, least_squares, bias)
