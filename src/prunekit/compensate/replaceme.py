"""ReplaceMe: a span of dropped layers becomes a linear map folded into the layer before it.

For a kept layer p followed by dropped layers p+1..q, on the calibration rows of the unpruned model:

    A = the residual stream after p's attention (what p's MLP output is added to)
    M = p's MLP output (what it adds)                                   [tokens, hidden]
    Y = the residual stream after layer q (what layer q+1 will receive)

The pruned model goes from A straight to layer q+1 with A + M T, and T minimises
||M T − (Y − A)||² + λ ||T − I||² (λ a small share of M's energy, pulling toward the identity,
so that dropped layers which add nothing give T = I exactly and a large λ is a plain drop).
T is folded into down_proj (M = Z Wᵀ + b, so M T = Z (Tᵀ W)ᵀ + Tᵀ b): the pruned model keeps its
shapes and gains no parameter (ReplaceMe, Shopkhoev et al. 2025, fitted by least squares).

A span that starts at layer 0 has no layer before it and stays a plain drop. Families that pass
the MLP output through a norm before the residual add (Gemma's sandwich norms) cannot take T
into down_proj, and are refused before any work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.compensate.bias import CompensationError
from prunekit.compensate.least_squares import DEFAULT_RIDGE
from prunekit.models.architecture import Architecture, architecture_for
from prunekit.models.layerwise import first_output
from prunekit.models.modeling_prunekit import decoder_layers
from prunekit.plan.plan import Plan


@dataclass(frozen=True)
class SpanFit:
    """One dropped span: the kept layer that absorbs it, the layers dropped, and the relative error
    ||A + M T − Y||² / ||Y − A − M||² of its replacement (1.0 means no better than a plain drop)."""

    kept_layer: int
    dropped: tuple[int, ...]
    relative_error: float | None


@dataclass(frozen=True)
class ReplacementReport:
    fits: tuple[SpanFit, ...]
    skipped: tuple[tuple[int, ...], ...]   # spans with no layer before them (they start at layer 0)
    ridge: float

    def to_dict(self) -> dict:
        return {"fits": [asdict(f) for f in self.fits], "skipped": [list(s) for s in self.skipped], "ridge": self.ridge}


def dropped_spans(drop_layers: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Maximal runs of consecutive dropped layers, in order."""
    spans: list[list[int]] = []
    for index in sorted(drop_layers):
        if spans and spans[-1][-1] == index - 1:
            spans[-1].append(index)
        else:
            spans.append([index])
    return [tuple(span) for span in spans]


def solve_replacement(gram: torch.Tensor, cross: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> torch.Tensor:
    """T [hidden, hidden] minimising ||M T − D||² + λ||T − I||², from MᵀM (`gram`) and MᵀD (`cross`)."""
    identity = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    penalty = ridge * gram.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.solve(gram + penalty * identity, cross + penalty * identity)


def check_replaceable(arch: Architecture) -> None:
    if arch.mlp_output_norm:
        raise CompensationError(
            f"replacing dropped layers folds a linear map into down_proj, but {arch.model_type} passes the MLP output "
            f"through {arch.mlp_output_norm} before the residual add; drop the layers without --replace-dropped-layers")


@torch.no_grad()
def replace_dropped_layers(model: nn.Module, plan: Plan, input_ids: torch.Tensor, *, ridge: float = DEFAULT_RIDGE,
                           batch_size: int = 8, progress: bool = True) -> ReplacementReport:
    """Fold each dropped span of `plan` into the down_proj of the kept layer before it, in place,
    before `apply_plan` cuts the layers (see the module docstring)."""
    arch = architecture_for(model.config.model_type)
    check_replaceable(arch)
    layers = decoder_layers(model, arch.to_dict())
    spans = dropped_spans(plan.drop_layers)
    fitted = [span for span in spans if span[0] > 0]
    skipped = tuple(span for span in spans if span[0] == 0)
    if not fitted:
        return ReplacementReport((), skipped, ridge)
    for span in fitted:
        if not hasattr(getattr(layers[span[0] - 1], arch.mlp), arch.down_proj):
            raise CompensationError(f"layer {span[0] - 1} has no MLP left to absorb the dropped layers {list(span)}; "
                                    "keep its MLP or drop the layers without --replace-dropped-layers")
    device = next(model.parameters()).device
    hidden = model.config.hidden_size
    sums = {span: {name: torch.zeros(hidden, hidden, dtype=torch.float64, device=device)
                   for name in ("gram", "cross", "target")} for span in fitted}
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for span in fitted:
        kept = layers[span[0] - 1]
        mlp_norm = getattr(kept, arch.mlp_norms[0])
        handles.append(mlp_norm.register_forward_pre_hook(
            lambda module, args, span=span: captured.__setitem__(f"A{span}", args[0].detach())))
        handles.append(getattr(kept, arch.mlp).register_forward_hook(
            lambda module, args, output, span=span: captured.__setitem__(f"M{span}", first_output(output).detach())))
        handles.append(layers[span[-1]].register_forward_hook(
            lambda module, args, output, span=span: _accumulate(sums[span], captured.pop(f"A{span}"),
                                                                captured.pop(f"M{span}"), first_output(output))))
    try:
        for rows in tqdm(input_ids.split(batch_size), desc="replacing dropped layers", unit="batch", disable=not progress):
            model(input_ids=rows.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    fits = []
    for span in fitted:
        stats = sums[span]
        transform = solve_replacement(stats["gram"], stats["cross"], ridge)
        down = getattr(getattr(layers[span[0] - 1], arch.mlp), arch.down_proj)
        down.weight.copy_((transform.T @ down.weight.double()).to(down.weight.dtype))
        if down.bias is not None:
            down.bias.copy_((transform.T @ down.bias.double()).to(down.bias.dtype))
        fits.append(SpanFit(span[0] - 1, span, _relative_error(stats, transform)))
    return ReplacementReport(tuple(fits), skipped, ridge)


def _accumulate(sums: dict, residual: torch.Tensor, mlp_out: torch.Tensor, after: torch.Tensor) -> None:
    m = mlp_out.reshape(-1, mlp_out.shape[-1]).double()
    d = (after - residual).reshape(-1, after.shape[-1]).double()
    sums["gram"] += m.T @ m
    sums["cross"] += m.T @ d
    sums["target"] += d.T @ d


def _relative_error(stats: dict, transform: torch.Tensor) -> float | None:
    """||M T − D||² / ||M − D||² from the accumulated products (traces only)."""
    gram, cross, target = stats["gram"], stats["cross"], stats["target"]
    fitted = (transform.T @ gram @ transform).trace() - 2 * (transform.T @ cross).trace() + target.trace()
    plain = gram.trace() - 2 * cross.trace() + target.trace()
    return float(fitted / plain) if plain > 0 else None


__all__ = ["ReplacementReport", "SpanFit", "check_replaceable", "dropped_spans", "replace_dropped_layers",
           "solve_replacement"]
