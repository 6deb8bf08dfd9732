"""Criteria for the routed experts of mixture-of-experts layers: router-weighted expert activation
(REAP) and routing frequency, from one calibration pass that records, per expert, the tokens the
router sends it, their gate values and the norm of what the expert outputs for them.

REAP (Lasby et al., 2025) scores expert e by the mean over the tokens routed to it of
g_e(x) * ||E_e(x)||: an expert whose output the router weights little, or whose output is small,
adds little when it is gone. An expert that no calibration token reached scores 0, and the pass
says which experts received fewer than `min_tokens` tokens: their scores rest on too few samples.

Channels inside experts (`expert_channel`): REAP's channel analogue scores channel c of expert e
by the sum over the tokens routed to e of g_e(x) |h_c(x)|, divided by all the layer's tokens, times
the norm of down's column c (h = act(gate) * up, the input of down): Wanda-sp's |W| x activation
weighted by how often and how strongly the router uses the expert. Magnitude scores them by the
norm of the channel's weights (its gate and up rows, its down column).

Channels of the dense FFNs (`channel`), from the same pass: a shared expert's channel c (Qwen2-MoE)
scores the mean over all tokens of sigmoid(shared gate(x)) |h_c(x)| times the norm of down's column
c, the same measure with the shared expert's gate in the router's place; a dense layer's MLP (Qwen-MoE
mixes them in) the same with gate 1. A MoE layer without a shared expert has no `channel` scores.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.models.architecture import architecture_for
from prunekit.models.modeling_prunekit import RemovedMLP, decoder_layers, moe_parts, shared_expert_of
from prunekit.score.scores import ScoreError, Scores

_f64 = torch.float64
DEFAULT_MIN_TOKENS = 16   # fewer routed calibration tokens than this: the expert's score is called unreliable


def expert_inner_activations(hidden: torch.Tensor, gate_up: torch.Tensor, act) -> torch.Tensor:
    """act(gate) * up per row of `hidden` [tokens, d] for one gated expert (gate_up [2w, d], the
    layout of transformers' fused experts: gate rows, then up rows): what its down projection reads."""
    gate, up = nn.functional.linear(hidden, gate_up).chunk(2, dim=-1)
    return act(gate) * up


def expert_output_norms(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, act) -> torch.Tensor:
    """||E(x)|| per row of `hidden` [tokens, d] for one gated expert (down [d, w])."""
    return nn.functional.linear(expert_inner_activations(hidden, gate_up, act), down).float().norm(dim=-1)


def expert_channel_magnitudes(model: nn.Module) -> list[torch.Tensor]:
    """Per layer, [experts, width]: the L2 norm of each expert channel's weights (its gate and up
    rows, its down column); empty for a dense layer."""
    arch = architecture_for(model.config.model_type)
    out = []
    for layer in decoder_layers(model, arch.to_dict()):
        parts = moe_parts(getattr(layer, arch.mlp), arch.to_dict())
        if parts is None:
            out.append(torch.zeros(0, dtype=_f64))
            continue
        experts = parts[1]
        gate_up, down = experts.gate_up_proj.detach().to(_f64), experts.down_proj.detach().to(_f64)
        gate, up = gate_up.chunk(2, dim=1)
        out.append((gate.pow(2).sum(2) + up.pow(2).sum(2) + down.pow(2).sum(1)).sqrt().cpu())
    return out


def routed_sums(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per expert, how many tokens the router sent it and the sum of their gate values."""
    index, weights = top_k_index.reshape(-1), top_k_weights.reshape(-1).to(_f64)
    counts = torch.bincount(index, minlength=num_experts)[:num_experts].to(_f64)
    gates = torch.zeros(num_experts, dtype=_f64, device=weights.device).index_add_(0, index, weights)
    return counts, gates


@dataclass
class ExpertRouting:
    """One MoE layer's routing over the calibration tokens."""

    tokens: int                    # tokens that reached the layer
    counts: torch.Tensor           # [experts] tokens routed to each expert
    gate_sums: torch.Tensor        # [experts] sum of their gate values
    weighted_norm_sums: torch.Tensor  # [experts] sum of gate value x ||expert output||
    channel_sums: torch.Tensor     # [experts, width] sum of gate value x |input of down| per channel

    @classmethod
    def empty(cls, num_experts: int, width: int, device) -> ExpertRouting:
        zeros = lambda: torch.zeros(num_experts, dtype=_f64, device=device)  # noqa: E731
        return cls(0, zeros(), zeros(), zeros(), torch.zeros(num_experts, width, dtype=_f64, device=device))

    def add(self, experts: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        num_experts = self.counts.numel()
        counts, gates = routed_sums(top_k_index, top_k_weights, num_experts)
        self.tokens += hidden.shape[0]
        self.counts += counts
        self.gate_sums += gates
        for e in torch.nonzero(counts).flatten().tolist():
            token, slot = torch.where(top_k_index == e)
            gates = top_k_weights[token, slot].to(_f64)
            inner = expert_inner_activations(hidden[token], experts.gate_up_proj[e], experts.act_fn)
            norms = nn.functional.linear(inner, experts.down_proj[e]).float().norm(dim=-1)
            self.weighted_norm_sums[e] += (gates * norms.to(_f64)).sum()
            self.channel_sums[e] += (gates[:, None] * inner.abs().to(_f64)).sum(0)

    def reap(self) -> torch.Tensor:
        return (self.weighted_norm_sums / self.counts.clamp_min(1)).cpu()

    def frequency(self) -> torch.Tensor:
        return (self.counts / max(self.tokens, 1)).cpu()

    def channel_activation(self, down: torch.Tensor) -> torch.Tensor:
        """[experts, width]: mean over the layer's tokens of gate value x |h_c|, times ||down[:, c]||."""
        column_norms = down.to(_f64).norm(dim=1)  # [experts, width]
        return (self.channel_sums / max(self.tokens, 1) * column_norms.to(self.channel_sums.device)).cpu()


@dataclass
class FFNChannelActivity:
    """One dense gated FFN (a dense layer's MLP or a MoE layer's shared expert) over the calibration
    tokens: per channel, the sum of gate value x |input of down| (gate 1 for a dense MLP)."""

    tokens: int
    sums: torch.Tensor             # [width]
    gate: torch.Tensor | None = None  # [tokens, 1] sigmoid(shared gate) of the block's current input

    def add(self, inner: torch.Tensor) -> None:
        inner = inner.reshape(-1, inner.shape[-1]).abs().to(_f64)
        weighted = inner if self.gate is None else self.gate.to(_f64) * inner
        self.tokens += inner.shape[0]
        self.sums += weighted.sum(0)

    def channel_activation(self, down: torch.Tensor) -> torch.Tensor:
        """[width]: mean over tokens of gate value x |h_c|, times ||down[:, c]|| (down [d, width])."""
        return (self.sums / max(self.tokens, 1) * down.to(_f64).norm(dim=0).to(self.sums.device)).cpu()


def _dense_ffn(layer: nn.Module, arch) -> nn.Module | None:
    """`layer`'s dense gated FFN: its MoE block's shared expert, or its dense MLP; None for a MoE
    block without a shared expert, or a removed MLP."""
    shared = shared_expert_of(layer, arch.to_dict())
    if shared is not None:
        return shared
    mlp = getattr(layer, arch.mlp)
    return mlp if moe_parts(mlp, arch.to_dict()) is None and not isinstance(mlp, RemovedMLP) else None


def _ffn_channel_hooks(layer: nn.Module, arch, activity: list) -> list:
    """Hooks that record the channels of `layer`'s dense FFN (its MLP, or its MoE block's shared expert)
    into a new FFNChannelActivity appended to `activity` (None when it has neither)."""
    mlp, ffn = getattr(layer, arch.mlp), _dense_ffn(layer, arch)
    if ffn is None:
        activity.append(None)
        return []
    down = getattr(ffn, arch.down_proj)
    record = FFNChannelActivity(0, torch.zeros(down.in_features, dtype=_f64, device=down.weight.device))
    activity.append(record)
    handles = [down.register_forward_pre_hook(lambda module, args: record.add(args[0]))]
    if ffn is not mlp:  # a shared expert: its gate reads the block's input, before the expert runs
        gate = getattr(mlp, arch.shared_expert_gate)
        handles.append(mlp.register_forward_pre_hook(lambda module, args: setattr(
            record, "gate", torch.sigmoid(gate(args[0].reshape(-1, args[0].shape[-1]))))))
    return handles


@torch.no_grad()
def collect_expert_routing(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8,
                           progress: bool = True, ffn_activity: list | None = None) -> list[ExpertRouting | None]:
    """Run the calibration rows through `model` and record every MoE layer's routing (None for a
    dense layer). Only the experts module's inputs are read; the model computes as it always does.
    Given a list, `ffn_activity` receives per layer the FFNChannelActivity of its dense FFN (a
    dense MLP or a shared expert), from the same pass, or None."""
    arch = architecture_for(model.config.model_type)
    layers = decoder_layers(model, arch.to_dict())
    device = next(model.parameters()).device
    routing: list[ExpertRouting | None] = []
    handles = []
    for layer in layers:
        if ffn_activity is not None:
            handles += _ffn_channel_hooks(layer, arch, ffn_activity)
        parts = moe_parts(getattr(layer, arch.mlp), arch.to_dict())
        if parts is None:
            routing.append(None)
            continue
        _, experts = parts
        record = ExpertRouting.empty(*experts.down_proj.shape[::2], experts.down_proj.device)
        routing.append(record)
        handles.append(experts.register_forward_hook(
            lambda module, args, output, record=record: record.add(module, *args[:3])))
    if all(r is None for r in routing):
        for handle in handles:
            handle.remove()
        raise ScoreError(f"this {arch.model_type} model has no mixture-of-experts layers, so there are no experts to "
                         f"score; use a criterion for dense structures (activation, taylor, ...)")
    try:
        for batch in tqdm(input_ids.split(batch_size), desc="expert routing", disable=not progress):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return routing


def under_routed(routing: list[ExpertRouting | None], min_tokens: int) -> dict[int, list[int]]:
    """Per MoE layer, the experts that received fewer than `min_tokens` calibration tokens."""
    return {i: [e for e, n in enumerate(r.counts.tolist()) if n < min_tokens]
            for i, r in enumerate(routing) if r is not None and (r.counts < min_tokens).any()}


def _expert_scores(name: str, routing: list[ExpertRouting | None], value, min_tokens: int, unit: str,
                   channel_values: list[torch.Tensor] | None = None, ffn_values: list[torch.Tensor] | None = None) -> Scores:
    few = under_routed(routing, min_tokens)
    if few:
        listed = "; ".join(f"layer {i}: experts {experts}" for i, experts in sorted(few.items()))
        warnings.warn(f"{sum(map(len, few.values()))} experts received fewer than {min_tokens} calibration tokens "
                      f"({listed}), so their {name} scores rest on too few tokens; calibrate on more samples "
                      f"(--calib-samples or --calib-seq-len)", stacklevel=2)
    values = {"expert": [value(r) if r is not None else torch.zeros(0, dtype=_f64) for r in routing]}
    if channel_values is not None:
        values["expert_channel"] = channel_values
    if ffn_values is not None:
        values["channel"] = ffn_values
    meta = {"unit": unit, "min_tokens": min_tokens,
            "expert_tokens": [r.counts.tolist() if r is not None else [] for r in routing],
            "under_routed": {str(i): experts for i, experts in few.items()}}
    return Scores(name, values, meta)


def reap_scores(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, progress: bool = True,
                min_tokens: int = DEFAULT_MIN_TOKENS) -> Scores:
    """REAP: per routed expert, the mean over its routed calibration tokens of gate value x ||output||;
    per channel of every expert, the mean over all tokens of gate value x |input of down| x ||down column||;
    per channel of a shared expert or dense MLP (`channel`), the same with its sigmoid gate (or 1)."""
    activity: list[FFNChannelActivity | None] = []
    routing = collect_expert_routing(model, input_ids, batch_size=batch_size, progress=progress, ffn_activity=activity)
    arch = architecture_for(model.config.model_type)
    layers = decoder_layers(model, arch.to_dict())
    channels = [r.channel_activation(moe_parts(getattr(layer, arch.mlp), arch.to_dict())[1].down_proj.detach())
                if r is not None else torch.zeros(0, dtype=_f64)
                for r, layer in zip(routing, layers)]
    ffn = [a.channel_activation(getattr(_dense_ffn(layer, arch), arch.down_proj).weight.detach()) if a is not None
           else torch.zeros(0, dtype=_f64) for a, layer in zip(activity, layers)]
    return _expert_scores("reap", routing, ExpertRouting.reap, min_tokens,
                          "mean gate x expert output norm; channels: mean gate x |h| x down column norm", channels, ffn)



def frequency_scores(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, progress: bool = True,
                     min_tokens: int = DEFAULT_MIN_TOKENS) -> Scores:
    """Routing frequency: per routed expert, the fraction of calibration tokens the router sends it."""
    routing = collect_expert_routing(model, input_ids, batch_size=batch_size, progress=progress)
    return _expert_scores("frequency", routing, ExpertRouting.frequency, min_tokens, "fraction of tokens routed")
