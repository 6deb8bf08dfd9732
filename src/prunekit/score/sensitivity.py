"""Sensitivity: the measured increase in calibration loss when one component is removed alone.

Exact, not estimated: each removal is a real forward pass with that component's contribution
zeroed (which equals removing it; the surgery tests prove that). Made affordable by
- keeping the hidden states that enter the layer being measured, for every row, so a removal
  in layer l runs layers l..L-1 only; the states then advance through layer l to serve layer
  l+1 (one layer's states in memory, not every layer's: 2 GiB instead of 66 for an 8B model on
  128 x 2048 tokens), and
- evaluating K removals in one batched pass: the kept states are repeated K times and a
  per-replica mask removes a different component from each copy, and
- measuring the many small removals (KV groups, heads, channel groups) on the first calibration
  rows only (`fine_tokens`): there are tens of them per layer, each moves the loss little, and
  their ranking settles on far fewer tokens than the whole calibration set (GPU_BENCHMARKS.md
  measures how far). Layers and sublayers always see every row.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.models.layerwise import embed_calibration, first_output, run_layer
from prunekit.models.loss import OutputHead, token_nll
from prunekit.models.modeling_prunekit import RemovedAttention, RemovedMLP
from prunekit.score.parts import layers_of
from prunekit.score.scores import Scores

SENSITIVITY_KINDS = ("layer", "attention", "mlp", "kv_group", "head", "channel")
DEFAULT_SENSITIVITY_KINDS = ("layer", "attention", "mlp", "kv_group", "head")
FINE_KINDS = ("kv_group", "head", "channel")
DEFAULT_FINE_TOKENS = 16_384


@dataclass(frozen=True)
class Removal:
    kind: str                 # one of SENSITIVITY_KINDS
    index: int = 0            # which head / group / channel group


def _replace_first(output, value):
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _output_head(model):
    arch, _, _ = layers_of(model)
    final_norm = model.get_submodule(arch.final_norm)
    head = OutputHead.of(model)

    def nll_sums(hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Summed next-token NLL per row, in float32 with the logits made a chunk of positions at a
        time (prunekit.models.loss: vocabularies are big)."""
        normed = final_norm(hidden)[:, :-1]
        target = labels[:, 1:]
        nll = token_nll(head, normed.reshape(-1, normed.shape[-1]), target.reshape(-1))
        return nll.view(target.shape).sum(1)

    return nll_sums


def _candidates(layer, arch, head_dim: int, kinds, channel_group_size: int) -> list[Removal]:
    attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
    out = [Removal("layer")] if "layer" in kinds else []
    if not isinstance(attention, RemovedAttention):
        heads = getattr(attention, arch.o_proj).in_features // head_dim
        groups = heads // attention.num_key_value_groups
        out += [Removal("attention")] if "attention" in kinds else []
        out += [Removal("kv_group", g) for g in range(groups)] if "kv_group" in kinds and groups > 1 else []
        out += [Removal("head", h) for h in range(heads)] if "head" in kinds else []
    if not isinstance(mlp, RemovedMLP):
        out += [Removal("mlp")] if "mlp" in kinds else []
        if "channel" in kinds:
            width = getattr(mlp, arch.down_proj).in_features
            out += [Removal("channel", g) for g in range((width + channel_group_size - 1) // channel_group_size)]
    return out


def _mask_sublayer(projection: nn.Linear, output_source: nn.Module, input_mask: torch.Tensor) -> list:
    """Hooks that multiply `projection`'s input features by `input_mask` [rows, 1, features] and
    zero `output_source`'s output on rows whose mask is all zero (the projection's bias would
    otherwise survive a removed sublayer)."""
    keep_rows = (input_mask.sum(-1, keepdim=True) > 0).to(input_mask.dtype)

    def mask_input(module, args):
        return (args[0] * input_mask.to(args[0]),)

    def zero_removed(module, args, out):
        return _replace_first(out, first_output(out) * keep_rows.to(first_output(out)))

    return [projection.register_forward_pre_hook(mask_input), output_source.register_forward_hook(zero_removed)]


def _install_removals(layer, arch, head_dim, removals: list[Removal], rows_per_replica: int, channel_group_size: int):
    """Hooks on one layer that remove removals[r] from the r-th block of rows of the batch."""
    attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
    k = len(removals)
    handles = []

    def per_row(mask_per_replica: torch.Tensor) -> torch.Tensor:  # [K, ...] -> [K * rows, 1, ...]
        return mask_per_replica.repeat_interleave(rows_per_replica, dim=0).unsqueeze(1)

    if not isinstance(attention, RemovedAttention):
        o_proj = getattr(attention, arch.o_proj)
        o_mask = torch.ones(k, o_proj.in_features, device=o_proj.weight.device)  # built once per pass, not per call
        heads_per_group = attention.num_key_value_groups
        for r, rm in enumerate(removals):
            if rm.kind == "head":
                o_mask[r, rm.index * head_dim:(rm.index + 1) * head_dim] = 0
            elif rm.kind == "kv_group":
                span = heads_per_group * head_dim
                o_mask[r, rm.index * span:(rm.index + 1) * span] = 0
            elif rm.kind in ("attention", "layer"):
                o_mask[r] = 0
        if (o_mask == 0).any():
            source = getattr(layer, arch.attention_output_norm) if arch.attention_output_norm else attention
            handles += _mask_sublayer(o_proj, source, per_row(o_mask))
    if not isinstance(mlp, RemovedMLP):
        down = getattr(mlp, arch.down_proj)
        d_mask = torch.ones(k, down.in_features, device=down.weight.device)
        for r, rm in enumerate(removals):
            if rm.kind == "channel":
                d_mask[r, rm.index * channel_group_size:(rm.index + 1) * channel_group_size] = 0
            elif rm.kind in ("mlp", "layer"):
                d_mask[r] = 0
        if (d_mask == 0).any():
            source = getattr(layer, arch.mlp_output_norm) if arch.mlp_output_norm else mlp
            handles += _mask_sublayer(down, source, per_row(d_mask))
    return handles


@torch.no_grad()
def sensitivity_scores(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                       kinds: tuple[str, ...] = DEFAULT_SENSITIVITY_KINDS, channel_group_size: int = 64,
                       batch_size: int = 8, removals_per_pass: int = 4, fine_tokens: int = DEFAULT_FINE_TOKENS,
                       progress: bool = True) -> Scores:
    """Loss increase (mean next-token NLL, nats) when each component is removed alone.

    `labels` with -100 restricts the loss to the tokens a task cares about (task data).
    Channel scores are per channel group of `channel_group_size` (each channel of a group gets
    the group's value divided by the group size). KV groups, heads and channel groups are measured
    on the first rows that hold `fine_tokens` tokens (at least one row; 0: every row), against the
    baseline loss of those same rows.
    """
    unknown = set(kinds) - set(SENSITIVITY_KINDS)
    if unknown:
        raise ValueError(f"unknown sensitivity kinds {sorted(unknown)}; choose from {list(SENSITIVITY_KINDS)}")
    if fine_tokens < 0:
        raise ValueError(f"fine_tokens must be 0 (every row) or a positive token count, got {fine_tokens}")
    started = time.perf_counter()
    arch, layers, head_dim = layers_of(model)
    device = next(model.parameters()).device
    labels = (input_ids if labels is None else labels).to(device)
    n = len(input_ids)
    fine_rows = n if fine_tokens == 0 else min(n, max(1, fine_tokens // input_ids.shape[1]))

    def rows_for(kind: str) -> int:
        return fine_rows if kind in FINE_KINDS else n

    # Only the rows some kind is measured on are kept and run (fine kinds alone: their first rows).
    used = max((rows_for(kind) for kind in kinds), default=n)
    counted_in = {r: (labels[:r, 1:] != -100).sum().item() for r in {used, *map(rows_for, kinds)}}
    input_ids, labels = input_ids[:used], labels[:used]
    states, layer_kwargs = embed_calibration(model, layers, input_ids, batch_size=batch_size, device=device)
    at = 0  # states holds the input of layer `at` for every kept row
    nll_sums = _output_head(model)

    def run_from(start: int, hidden: torch.Tensor) -> torch.Tensor:
        for i in range(start, len(layers)):
            hidden = first_output(layers[i](hidden, **layer_kwargs[i]))
        return hidden

    rows = max(1, batch_size // removals_per_pass)  # sequences per pass; times K replicas
    baseline = torch.cat([nll_sums(run_from(0, states[s:s + rows]), labels[s:s + rows]) for s in range(0, used, rows)])
    baseline_loss = {r: baseline[:r].sum().item() / max(counted_in[r], 1) for r in counted_in}

    # Removals that see the same rows share passes: coarse ones first, then fine ones, per layer.
    plan = []
    for i, layer in enumerate(layers):
        candidates = _candidates(layer, arch, head_dim, kinds, channel_group_size)
        for r in sorted({rows_for(c.kind) for c in candidates}, reverse=True):
            plan.append((i, r, [c for c in candidates if rows_for(c.kind) == r]))
    total_passes = sum(((len(c) + removals_per_pass - 1) // removals_per_pass) * ((r + rows - 1) // rows)
                       for _, r, c in plan)
    layer_forwards = 0
    increases: dict[tuple[int, Removal], float] = {}
    bar = tqdm(total=total_passes, desc="sensitivity: removals", unit="pass", disable=not progress)
    for i, used_rows, candidates in plan:
        while at < i:  # the plan goes layer by layer: move the states on to layer i's input
            run_layer(layers[at], states, layer_kwargs[at], batch_size=batch_size)
            layer_forwards += used
            at += 1
        for c0 in range(0, len(candidates), removals_per_pass):
            chunk = candidates[c0:c0 + removals_per_pass]
            totals = torch.zeros(len(chunk), dtype=torch.float64, device=device)  # read once per chunk, not per pass
            for s in range(0, used_rows, rows):
                block = states[s:min(s + rows, used_rows)]
                handles = _install_removals(layers[i], arch, head_dim, chunk, len(block), channel_group_size)
                try:
                    out = run_from(i, block.repeat(len(chunk), 1, 1))
                finally:
                    for h in handles:
                        h.remove()
                layer_rows = labels[s:s + len(block)].repeat(len(chunk), 1)
                totals += nll_sums(out, layer_rows).reshape(len(chunk), -1).sum(1).double()
                layer_forwards += (len(layers) - i) * len(chunk) * len(block)
                bar.update(1)
            for rm, total in zip(chunk, totals.tolist()):
                increases[(i, rm)] = total / max(counted_in[used_rows], 1) - baseline_loss[used_rows]
    bar.close()

    values: dict[str, list] = {k: [] for k in kinds}
    for i, layer in enumerate(layers):
        candidates = [c for layer_index, _, chunk in plan if layer_index == i for c in chunk]
        for kind in kinds:
            found = [increases[(i, rm)] for rm in candidates if rm.kind == kind]
            if kind == "channel" and found:
                width = getattr(getattr(layer, arch.mlp), arch.down_proj).in_features
                per_group = torch.tensor(found, dtype=torch.float64)
                values[kind].append(per_group.repeat_interleave(channel_group_size)[:width] / channel_group_size)
            elif kind in ("layer", "attention", "mlp"):
                values[kind].append(torch.tensor(found[0] if found else 0.0, dtype=torch.float64))
            elif kind == "kv_group" and not found and not isinstance(getattr(layer, arch.attention), RemovedAttention):
                # A single KV group: removing it removes the attention.
                values[kind].append(torch.tensor([increases.get((i, Removal("attention")), float("inf"))], dtype=torch.float64)
                                    if (i, Removal("attention")) in increases else torch.zeros(1, dtype=torch.float64))
            else:
                values[kind].append(torch.tensor(found, dtype=torch.float64))
    seconds = time.perf_counter() - started
    meta = {
        "unit": "loss increase (nats/token)",
        "baseline_loss": baseline_loss[used],
        "kinds": list(kinds),
        "channel_group_size": channel_group_size,
        "rows": {kind: rows_for(kind) for kind in kinds},
        "cost": {"seconds": round(seconds, 1), "removals": len(increases), "sequences": n,
                 "seq_len": int(input_ids.shape[1]), "layer_forwards_per_sequence": layer_forwards / max(n, 1),
                 "full_forward_equivalents": round(layer_forwards / max(n, 1) / len(layers), 1)},
    }
    return Scores("sensitivity", values, meta)
