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


@torch.no_grad()
def compensate_sequential(model: nn.Module, plan: Plan, input_ids: torch.Tensor, *, ridge: float = DEFAULT_RIDGE,
                          batch_size: int = 8, progress: bool = True,
                          device: torch.device | str | None = None, autocast: bool = True) -> CompensationReport:
    """Refit o_proj / down_proj of every width-pruned sublayer of `plan`, layer by layer, in place,
    before `apply_plan`. Removed sublayers are zeroed and dropped layers skipped in the stream.

    The stream of calibration states lives on `device` (default: the model's); each layer visits
    it in turn and goes back where it was, so the model may stay in CPU memory (layer-by-layer
    mode): the device then holds one layer, the stream and one projection's fit.

    A layer runs at most twice: once up to o_proj (its inputs' Gram matrix), and once whole with
    the refitted o_proj, recording down_proj's inputs; the stream then takes that pass's outputs,
    corrected for the refitted down_proj, where the MLP's output enters the residual stream as it
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
    bar = tqdm(total=sum(work), desc="compensation: layer passes", unit="pass", disable=not progress)
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
                fit = _refit_projection(layer, getattr(module, projection_name), _kept_columns(kept, sublayer, head_dim),
                                        stream, kwargs_of[i], ridge=ridge, batch_size=batch_size, advance=advance)
                if fit is not None:
                    fits.append(ProjectionFit(i, sublayer, *fit[:4]))
                    advanced = fit[4]
            if not advanced:
                run_layer(layer, stream, kwargs_of[i], batch_size=batch_size)
        bar.update(work[i])
    bar.close()
    return CompensationReport(tuple(fits), ridge, least_squares=True, bias=False)


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


def _refit_projection(layer: nn.Module, projection: nn.Linear, keep: torch.Tensor, stream: torch.Tensor,
                      layer_kwargs: dict, *, ridge: float, batch_size: int,
                      advance: bool = False) -> tuple[int, int, float, float, bool] | None:
    """Refit `projection`'s kept columns in place on its inputs from `stream`, zeroing the rest;
    (kept, removed, error before, error after, whether `stream` now holds the layer's outputs),
    or None when nothing of it is removed.

    With `advance`, the pass that collects the inputs runs the whole layer and leaves its outputs
    in `stream`, corrected for the refit: the projection's output must enter the residual stream
    as it is, and its inputs are kept meanwhile (rows x seq x in_features)."""
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
    # One buffer for the plain cut and then the refit: at 8B scale each is half a gigabyte.
    candidate = torch.zeros_like(dense)
    candidate[:, keep] = dense[:, keep]
    reference = ((dense @ gram) * dense).sum()  # ||W X||², shared by both errors
    before = reconstruction_error(dense, candidate, gram, reference=reference)
    candidate[:, keep] = refit_kept_columns(dense, gram, keep, ridge)
    after = reconstruction_error(dense, candidate, gram, reference=reference)
    new_weight = candidate.to(weight.dtype)
    if advance:
        _apply_refit(stream, kept_inputs, new_weight.float() - weight.float(), batch_size)
        del kept_inputs
    weight.copy_(new_weight)
    return len(keep), projection.in_features - len(keep), before, after, advance
