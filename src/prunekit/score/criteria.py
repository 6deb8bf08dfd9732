"""The cheap criteria: weight magnitude, random, activation (Wanda-sp / Minitron), fluctuation
(FLAP) and block influence (ShortGPT). Each is a plain function from weights and calibration
statistics to scores; higher means more important."""
from __future__ import annotations

import torch
from torch import nn

from prunekit.score.parts import attention_weights, group_sum, layers_of, mlp_weights, shared_expert_weights
from prunekit.score.scores import Scores
from prunekit.score.statistics import LayerStats

_f64 = torch.float64


def _sq(t: torch.Tensor, dims) -> torch.Tensor:
    return t.to(_f64).pow(2).sum(dims)


def magnitude_scores(model: nn.Module) -> Scores:
    """L2 norm of all the weights that go with a component (rows in, columns out). On a MoE layer
    `channel` scores its shared expert's channels (Qwen2-MoE) and `expert_channel` its routed experts'."""
    arch, layers, head_dim = layers_of(model)
    values: dict[str, list] = {k: [] for k in ("layer", "attention", "mlp", "kv_group", "head", "channel", "hidden")}
    for layer in layers:
        a, m = attention_weights(layer, arch, head_dim), mlp_weights(layer, arch)
        values["hidden"].append(per_hidden_channel(a, m, model.get_input_embeddings().weight.shape[1], _sq).sqrt())
        head_sq = _sq(a.q, (1, 2)) + _sq(a.o, (1, 2)) if a else torch.zeros(0, dtype=_f64)
        group_sq = group_sum(head_sq, a.heads_per_group) + _sq(a.k, (1, 2)) + _sq(a.v, (1, 2)) if a else torch.zeros(0, dtype=_f64)
        channel_sq = _sq(m.gate, 1) + _sq(m.up, 1) + _sq(m.down, 1) if m else torch.zeros(0, dtype=_f64)
        values["head"].append(head_sq.sqrt())
        values["kv_group"].append(group_sq.sqrt())
        values["channel"].append(channel_sq.sqrt() if m else _shared_expert_magnitudes(layer, arch))
        values["attention"].append(group_sq.sum().sqrt())
        values["mlp"].append(channel_sq.sum().sqrt())
        values["layer"].append((group_sq.sum() + channel_sq.sum()).sqrt())
    if arch.is_moe:  # channels inside routed experts (mixtures of experts)
        from prunekit.score.experts import expert_channel_magnitudes

        values["expert_channel"] = expert_channel_magnitudes(model)
    return Scores("magnitude", values, {"unit": "weight L2 norm"})


def _shared_expert_magnitudes(layer: nn.Module, arch) -> torch.Tensor:
    """A MoE layer's `channel` scores: the L2 norms of its shared expert's channels (empty without one).
    They stay out of the layer's `mlp` and `layer` magnitudes, which leave MoE blocks at 0 as before."""
    shared = shared_expert_weights(layer, arch)
    return (_sq(shared.gate, 1) + _sq(shared.up, 1) + _sq(shared.down, 1)).sqrt() if shared else torch.zeros(0, dtype=_f64)


def per_hidden_channel(a, m, hidden: int, reduce) -> torch.Tensor:
    """Per residual channel, the sum of `reduce(tensor, dims)` (which reduces every dim but the
    hidden one) over the layer's weights that read the channel (columns of q/k/v/gate/up) or
    write it (rows of o/down)."""
    total = torch.zeros(hidden, dtype=_f64)
    if a is not None:
        total = total + (reduce(a.q, (0, 1)) + reduce(a.k, (0, 1)) + reduce(a.v, (0, 1)) + reduce(a.o, (0, 2))).cpu()
    if m is not None:
        total = total + (reduce(m.gate, 0) + reduce(m.up, 0) + reduce(m.down, 0)).cpu()
    return total


def hidden_activation(hidden_sq: torch.Tensor | None, hidden: int) -> torch.Tensor:
    """Minitron's hidden-size importance, one layer's share: the L2 norm over calibration tokens
    of each channel of what its sublayers read through their input norms."""
    return hidden_sq.sqrt().cpu() if hidden_sq is not None else torch.zeros(hidden, dtype=_f64)


def random_scores(model: nn.Module, seed: int = 0) -> Scores:
    """Uniform random scores: the baseline every criterion must beat."""
    _, layers, _ = layers_of(model)
    template = magnitude_scores(model)  # only for the shapes
    generator = torch.Generator().manual_seed(seed)
    values = {kind: [torch.rand(v.shape, generator=generator, dtype=_f64) for v in per_layer]
              for kind, per_layer in template.values.items()}
    return Scores("random", values, {"seed": seed, "unit": "random"})


def _per_input_feature(stat: torch.Tensor, weight_columns: torch.Tensor) -> torch.Tensor:
    """stat [features] x weight columns [features, out] -> one value per input feature."""
    return stat * weight_columns.to(_f64)


def activation_scores(model: nn.Module, stats: list[LayerStats]) -> Scores:
    """Wanda-sp: |W| times input norm, on the projection that consumes the unit.

    Channel c scores ||x_c|| * sum_i |W_down[i, c]|; a head sums that over its head_dim inputs of
    o_proj; a KV group sums its heads. Sublayers score by what they add to the residual stream
    (mean ||added|| / ||residual||), layers by the sum of both.
    """
    arch, layers, head_dim = layers_of(model)
    values: dict[str, list] = {k: [] for k in ("layer", "attention", "mlp", "kv_group", "head", "channel", "hidden")}
    hidden = model.get_input_embeddings().weight.shape[1]
    for layer, st in zip(layers, stats):
        a, m = attention_weights(layer, arch, head_dim), mlp_weights(layer, arch)
        values["hidden"].append(hidden_activation(st.hidden_sq, hidden))
        if a is not None:
            o_abs = a.o.abs().sum(1, dtype=_f64)  # [heads, head_dim]: column sums of |W_o|
            heads = (st.attention_input.norm.to(o_abs.device).reshape(o_abs.shape) * o_abs).sum(-1).cpu()
        else:
            heads = torch.zeros(0, dtype=_f64)
        if m is not None:
            down_abs = m.down.abs().sum(1, dtype=_f64)
            channels = (st.mlp_input.norm.to(down_abs.device) * down_abs).cpu()
        else:
            channels = torch.zeros(0, dtype=_f64)
        values["head"].append(heads)
        values["kv_group"].append(group_sum(heads, a.heads_per_group) if a else torch.zeros(0, dtype=_f64))
        values["channel"].append(channels)
        attention = st.contribution_norm_sum["attention"] / max(st.tokens, 1)
        mlp = st.contribution_norm_sum["mlp"] / max(st.tokens, 1)
        values["attention"].append(torch.tensor(attention, dtype=_f64))
        values["mlp"].append(torch.tensor(mlp, dtype=_f64))
        values["layer"].append(torch.tensor(attention + mlp, dtype=_f64))
    return Scores("activation", values, {"unit": "|W| x input norm; hidden: norm-output L2 norm"})


def fluctuation_scores(model: nn.Module, stats: list[LayerStats]) -> Scores:
    """FLAP: the variance of an input feature of o_proj / down_proj over the calibration tokens,
    times the squared norm of the weight column that reads it. A feature that barely fluctuates
    can be replaced by its mean (the bias compensation) at little cost."""
    arch, layers, head_dim = layers_of(model)
    values: dict[str, list] = {k: [] for k in ("layer", "attention", "mlp", "kv_group", "head", "channel")}
    for layer, st in zip(layers, stats):
        a, m = attention_weights(layer, arch, head_dim), mlp_weights(layer, arch)
        if a is not None:
            o_sq = a.o.to(_f64).pow(2).sum(1)  # [heads, head_dim]
            heads = (st.attention_input.variance.to(o_sq.device).reshape(o_sq.shape) * o_sq).sum(-1).cpu()
        else:
            heads = torch.zeros(0, dtype=_f64)
        if m is not None:
            down_sq = m.down.to(_f64).pow(2).sum(1)
            channels = (st.mlp_input.variance.to(down_sq.device) * down_sq).cpu()
        else:
            channels = torch.zeros(0, dtype=_f64)
        values["head"].append(heads)
        values["kv_group"].append(group_sum(heads, a.heads_per_group) if a else torch.zeros(0, dtype=_f64))
        values["channel"].append(channels)
        values["attention"].append(heads.sum())
        values["mlp"].append(channels.sum())
        values["layer"].append(heads.sum() + channels.sum())
    return Scores("fluctuation", values, {"unit": "input variance x |W|^2"})


def block_influence_scores(stats: list[LayerStats], *, angular: bool = False) -> Scores:
    """ShortGPT's block influence, 1 - E[cos(x_in, x_out)], or the angular distance
    E[arccos(cos) / pi], for layers and each sublayer. A block that barely turns the residual
    stream can go."""
    def influence(st: LayerStats, kind: str) -> torch.Tensor:
        value = st.mean_angle(kind) if angular else 1.0 - st.mean_cos(kind)
        return torch.tensor(value, dtype=_f64)

    values = {kind: [influence(st, kind) for st in stats] for kind in ("layer", "attention", "mlp")}
    return Scores("block_influence", values, {"angular": angular, "unit": "angular distance" if angular else "1 - cos(in, out)"})
