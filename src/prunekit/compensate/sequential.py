"""Sequential compensation: refit layer by layer on the inputs the PRUNED model actually sees.

One-shot compensation (least_squares.py) fits every layer on the original model's inputs; once
many layers are pruned, later layers receive other inputs. Here the calibration data flows
through the model as it is being pruned: for projection W of layer l, with X' its inputs in the
model pruned up to l and G' = X' X'ᵀ, the kept columns become the one-shot refit on G':

    W_K' = argmin ||W_K' X'_K − W X'||² + λ ||W_K' − W_K||²

(SparseGPT's sequential mode). The target is the dense layer on the same inputs. Fitting the
original model's outputs instead (computed from its own inputs) regresses onto a target that
the pruned inputs only partly predict, shrinks the outputs, and measured far worse on SmolLM2
(held-out loss 13.4 against 6.3 for this and 6.2 for one-shot, magnitude plan at 20%).
Removed columns are zeroed as the pass goes (what surgery does to the output), so the stream is
the pruned model's; `apply_plan` then cuts them.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from prunekit.compensate.least_squares import (
    DEFAULT_RIDGE,
    CompensationReport,
    ProjectionFit,
    reconstruction_error,
    refit_kept_columns,
)
from prunekit.models.architecture import architecture_for
from prunekit.models.layerwise import embed_calibration, first_output, layer_on, run_layer
from prunekit.models.modeling_prunekit import RemovedAttention, RemovedMLP, decoder_layers, head_dim_of
from prunekit.models.precision import bfloat16_autocast
from prunekit.models.structure import model_structure
from prunekit.plan.plan import KeptLayer, Plan, resolve_plan
from prunekit.score.statistics import FeatureStats


class _Collected(Exception):
    """Stops a layer's forward pass once the projection's input has been recorded: what follows
    it in the layer does not change that input."""


def _input_gram(layer: nn.Module, projection: nn.Linear, stream: torch.Tensor, layer_kwargs: dict,
                batch_size: int, *, keep_inputs: torch.Tensor | None = None,
                outputs: torch.Tensor | None = None) -> torch.Tensor:
    """X' X'ᵀ of `projection`'s inputs when `layer` runs on `stream` (float64, on the layer's device).

    Without `outputs` each pass stops at the projection. With `outputs` (a tensor like `stream`,
    possibly `stream` itself) the layer runs whole and its outputs are written there, and
    `keep_inputs` [rows, seq, in_features] receives the projection's inputs: the pass then also
    advances the stream, and `_apply_refit` corrects it for the refit afterwards."""
    inputs = FeatureStats.empty(projection.in_features, with_gram=True, device=projection.weight.device)
    block: list[slice] = []

    def record(module, args):
        inputs.add(args[0])
        if keep_inputs is not None:
            keep_inputs[block[0]] = args[0]
        if outputs is None:
            raise _Collected

    handle = projection.register_forward_pre_hook(record)
    try:
        for start in range(0, len(stream), batch_size):
            block[:] = [slice(start, start + batch_size)]
            try:
                result = layer(stream[block[0]], **layer_kwargs)
            except _Collected:
                continue
            outputs[block[0]] = first_output(result)
    finally:
        handle.remove()
    return inputs.gram


# The MLP's pass advances the stream only where its inputs, kept meanwhile for every row, take at
# most this many times the stream's memory: SmolLM2 (FFN 2.7x hidden, bf16 inputs of a float32
# stream) keeps them, Llama-3-8B in bf16 (3.5x: 7.5 GiB for 128 x 2048 tokens beside a 2 GiB stream)
# runs the layer a third time instead, so that layer-by-layer mode stays small on the device.
MLP_INPUTS_MAX_STREAMS = 2


def keeps_mlp_inputs(stream: torch.Tensor, ffn_width: int, *, lowered: bool) -> bool:
    """Whether the MLP's pass keeps its inputs to advance the stream (MLP_INPUTS_MAX_STREAMS);
    `lowered`: the layer computes in bf16 (autocast)."""
    element = 2 if lowered else stream.element_size()
    return ffn_width * element <= MLP_INPUTS_MAX_STREAMS * stream.shape[-1] * stream.element_size()


def _apply_refit(stream: torch.Tensor, kept_inputs: torch.Tensor, change: torch.Tensor, batch_size: int) -> None:
    """Add (W' − W) x to the outputs in `stream` of a layer that ran with W: exact where the
    projection's output enters the residual stream as it is (no norm after the sublayer)."""
    change = change.to(kept_inputs.dtype)
    for start in range(0, len(stream), batch_size):
        block = slice(start, start + batch_size)
        stream[block] += F.linear(kept_inputs[block], change).to(stream.dtype)


def _kept_columns(kept: KeptLayer, sublayer: str, head_dim: int) -> torch.Tensor:
    if sublayer == "attention":
        return torch.tensor([h * head_dim + d for h in kept.query_heads for d in range(head_dim)], dtype=torch.long)
    return torch.tensor(kept.channels, dtype=torch.long)


# What a sequential pass does with one projection once it has its inputs' Gram matrix:
# (layer index, "attention" | "mlp", dense W [out, in] float64, G float64, the plan's kept columns)
# -> (the new W in float64 with its removed columns exactly zero, the kept columns).
ProjectionSolver = Callable[[int, str, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def least_squares_solver(ridge: float = DEFAULT_RIDGE) -> ProjectionSolver:
    """The plan's columns, refitted (least_squares.refit_kept_columns)."""
    def solve(layer: int, sublayer: str, dense: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor):
        weight = torch.zeros_like(dense)
        weight[:, keep] = refit_kept_columns(dense, gram, keep, ridge)
        return weight, keep
    return solve


@torch.no_grad()
def compensate_sequential(model: nn.Module, plan: Plan, input_ids: torch.Tensor, *, ridge: float = DEFAULT_RIDGE,
                          batch_size: int = 8, progress: bool = True,
                          device: torch.device | str | None = None, autocast: bool = True) -> CompensationReport:
    """Refit o_proj / down_proj of every width-pruned sublayer of `plan`, layer by layer, in place,
    before `apply_plan`. Removed sublayers are zeroed and dropped layers skipped in the stream
    (`sequential_pass`, which says how the layers run)."""
    fits = sequential_pass(model, plan, input_ids, least_squares_solver(ridge), batch_size=batch_size,
                           progress=progress, device=device, autocast=autocast)
    return CompensationReport(tuple(ProjectionFit(*fit[:6]) for fit in fits), ridge, least_squares=True, bias=False)


@torch.no_grad()
def sequential_pass(model: nn.Module, plan: Plan, input_ids: torch.Tensor, solve: ProjectionSolver, *,
                    batch_size: int = 8, progress: bool = True, device: torch.device | str | None = None,
                    autocast: bool = True, desc: str = "compensation: layer passes") -> list[tuple]:
    """Give o_proj / down_proj of every width-pruned sublayer of `plan` the weight `solve` returns
    from its inputs in the model pruned up to it, layer by layer, in place; returns one
    (layer, sublayer, kept, removed, error before, error after, kept columns) per solved projection,
    the errors those of the plan's plain cut and of the new weight (`reconstruction_error`).

    The stream of calibration states lives on `device` (default: the model's); each layer visits
    it in turn and goes back where it was, so the model may stay in CPU memory (layer-by-layer
    mode): the device then holds one layer, the stream and one projection's fit.

    A layer runs at most twice: once up to o_proj (its inputs' Gram matrix), and once whole with
    the new o_proj, recording down_proj's inputs; the stream then takes that pass's outputs,
    corrected for the new down_proj, where the MLP's output enters the residual stream as it
    is (a family with a norm after the MLP runs the layer a third time). With `autocast`, float32
    layers run under bfloat16 autocast where the device has fast bf16 products
    (`prunekit.models.precision`); the Gram matrices and the solve stay float64."""
    arch = architecture_for(model.config.model_type)
    layers = decoder_layers(model, arch.to_dict())
    kept_by_source: dict[int, KeptLayer] = {k.source_index: k for k in resolve_plan(plan, model_structure(model))}
    head_dim = head_dim_of(model.config)
    weights = next(model.parameters())
    device = torch.device(device) if device is not None else weights.device
    precision = bfloat16_autocast(device, weights.dtype, autocast)
    stream, kwargs_of = embed_calibration(model, layers, input_ids, batch_size=batch_size, device=device)
    fits = []
    lowered = isinstance(precision, torch.autocast)
    # The bar counts passes over the stream, not layers: a pruned layer costs two or three times an
    # untouched one, and the untouched ones come first in most plans, so a per-layer rate would
    # promise too early an end.
    work = [_layer_passes(layers[i], arch, kept_by_source.get(i), head_dim, stream, lowered) for i in range(len(layers))]
    bar = tqdm(total=sum(work), desc=desc, unit="pass", disable=not progress)
    for i in range(len(layers)):
        layer, kept = layers[i], kept_by_source.get(i)
        if kept is None:  # a dropped layer passes the stream through
            continue
        advanced = False
        with layer_on(layer, device), precision:
            for sublayer, module_name, projection_name in (("attention", arch.attention, arch.o_proj),
                                                           ("mlp", arch.mlp, arch.down_proj)):
                module = getattr(layer, module_name)
                if isinstance(module, (RemovedAttention, RemovedMLP)) or not hasattr(module, projection_name):
                    continue  # (a mixture-of-experts block has no one down_proj: its experts go whole)
                # The MLP comes last in the layer: its pass can advance the stream too.
                advance = sublayer == "mlp" and arch.mlp_output_norm is None and keeps_mlp_inputs(
                    stream, getattr(module, projection_name).in_features, lowered=torch.is_autocast_enabled(device.type))
                fit = _solve_projection(layer, getattr(module, projection_name), _kept_columns(kept, sublayer, head_dim),
                                        stream, kwargs_of[i], lambda dense, gram, keep: solve(i, sublayer, dense, gram, keep),
                                        batch_size=batch_size, advance=advance)
                if fit is not None:
                    fits.append((i, sublayer, *fit[:4], fit[5]))
                    advanced = fit[4]
            if not advanced:
                run_layer(layer, stream, kwargs_of[i], batch_size=batch_size)
        bar.update(work[i])
    bar.close()
    return fits


def _layer_passes(layer: nn.Module, arch, kept: KeptLayer | None, head_dim: int, stream: torch.Tensor,
                  lowered: bool) -> float:
    """Passes of `layer` over the stream that `compensate_sequential` will make (one stopped at
    o_proj counts half): what its progress bar counts."""
    if kept is None:
        return 0.0
    attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
    passes = 1.0  # the pass that advances the stream
    if not isinstance(attention, RemovedAttention) and 0 < len(kept.query_heads) * head_dim < getattr(
            attention, arch.o_proj).in_features:
        passes += 0.5
    if not isinstance(mlp, RemovedMLP) and hasattr(mlp, arch.down_proj):
        width = getattr(mlp, arch.down_proj).in_features
        if 0 < len(kept.channels) < width and not (arch.mlp_output_norm is None
                                                   and keeps_mlp_inputs(stream, width, lowered=lowered)):
            passes += 1.0
    return passes


def _solve_projection(layer: nn.Module, projection: nn.Linear, keep: torch.Tensor, stream: torch.Tensor,
                      layer_kwargs: dict, solve, *, batch_size: int,
                      advance: bool = False) -> tuple[int, int, float, float, bool, torch.Tensor] | None:
    """Give `projection` the weight `solve(dense, gram, keep)` returns from its inputs in `stream`,
    in place; (kept, removed, error of the plain cut of `keep`, error of the new weight, whether
    `stream` now holds the layer's outputs, the kept columns), or None when `keep` is every column.

    With `advance`, the pass that collects the inputs runs the whole layer and leaves its outputs
    in `stream`, corrected for the new weight: the projection's output must enter the residual
    stream as it is, and its inputs are kept meanwhile (rows x seq x in_features)."""
    weight = projection.weight
    keep = keep.to(weight.device)
    if len(keep) == projection.in_features:
        return None
    if len(keep) == 0:  # the whole sublayer goes: its output becomes zero, as after surgery
        weight.zero_()
        if projection.bias is not None:
            projection.bias.zero_()
        return None
    kept_inputs = None
    if advance:
        # The inputs come out of the layer in the dtype it computes in (bf16 under autocast).
        probe_dtype = torch.get_autocast_dtype(stream.device.type) if torch.is_autocast_enabled(stream.device.type) \
            else weight.dtype
        kept_inputs = stream.new_empty((*stream.shape[:-1], projection.in_features), dtype=probe_dtype)
    gram = _input_gram(layer, projection, stream, layer_kwargs, batch_size, keep_inputs=kept_inputs,
                       outputs=stream if advance else None)
    dense = weight.to(torch.float64)
    reference = ((dense @ gram) * dense).sum()  # ||W X||², shared by both errors
    cut = torch.zeros_like(dense)
    cut[:, keep] = dense[:, keep]
    before = reconstruction_error(dense, cut, gram, reference=reference)
    del cut  # at 8B scale each of these is half a gigabyte
    solved, kept_columns = solve(dense, gram, keep)
    after = reconstruction_error(dense, solved, gram, reference=reference)
    new_weight = solved.to(weight.dtype)
    del solved
    if advance:
        _apply_refit(stream, kept_inputs, new_weight.float() - weight.float(), batch_size)
        del kept_inputs
    weight.copy_(new_weight)
    return len(kept_columns), projection.in_features - len(kept_columns), before, after, advance, kept_columns
