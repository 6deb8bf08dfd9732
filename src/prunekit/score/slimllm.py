"""SlimLLM (Guo et al., ICML 2025; reference code guojialong1/Slimllm) as a criterion.

Heads are scored as a whole: a set of kept heads is good when the sum of their o_proj outputs
reproduces the full attention output, measured as SlimLLM does, the Pearson correlation over
the calibration tokens in each hidden dimension, |corr| averaged over the dimensions. Every
such correlation follows from the covariance of the o_proj input, so one calibration pass and a
[heads, heads, hidden] table of head-output covariances answer it for any subset of heads.

SlimLLM scores each head by the correlation left when it alone is removed, then refines the set
for the layer's removal count with a greedy swap search. The count is not known when prunekit
scores (the plan decides it afterwards), so the refinement here is a greedy backward
elimination: remove, one at a time, the head whose removal keeps the correlation highest, with
the heads already removed taken into account (what the swap search captures). Its order is the
ranking, so the kept set is the greedy optimum for every count the plan may choose.

Units under GQA: a query head's output x_h W_o,h is exactly the paper's unit, so `head` scores
rank query heads; the elimination removes one head of every KV group per round, as prunekit's
head moves do (GQA stays balanced). `kv_group` scores run the same elimination with a group's
heads summed into one unit, the choice that also shrinks the KV cache. With full multi-head
attention (one head per group) the `kv_group` ranking is SlimLLM's head ranking.

FFN channels: ||W_gate[c] * ||x|| || + ||W_up[c] * ||x|| || + ||a_c|| * || |W_down[:, c] V| * s ||,
x the MLP input, a_c channel c's activation, V the principal directions of the down_proj output
and s = sigmoid(eigenvalue / mean eigenvalue): a channel that writes along the directions the
FFN output varies in matters more. The reference keeps the 1% lowest-scored channels (it prunes
the ranks after them); `protect_lowest` reproduces that (0 turns it off).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.models.layerwise import embed_calibration, first_output, run_layer
from prunekit.models.modeling_prunekit import RemovedAttention, RemovedMLP, decoder_layers
from prunekit.score.parts import attention_weights, layers_of, mlp_weights
from prunekit.score.scores import Scores
from prunekit.score.statistics import FeatureStats

_f64 = torch.float64
HEAD_SEARCHES = ("greedy", "single")
DEFAULT_PROTECT_LOWEST = 0.01


# ----------------------------------------------------------------------------- head math
def covariance(stats: FeatureStats) -> torch.Tensor:
    """Covariance of the features over the calibration tokens (population, as torch.std(correction=0))."""
    mean = stats.mean
    return stats.gram / stats.tokens - torch.outer(mean, mean)


def head_output_covariances(input_covariance: torch.Tensor, o_weight: torch.Tensor, heads: int) -> torch.Tensor:
    """[heads, heads, hidden]: entry (i, j, d) is Cov(y_i[d], y_j[d]), y_h = x_h W_o,h^T the output
    of head h alone. From the covariance of o_proj's input [heads * head_dim]^2 and o_proj's weight
    [hidden, heads * head_dim]."""
    hidden, width = o_weight.shape
    head_dim = width // heads
    w = o_weight.detach().to(_f64).reshape(hidden, heads, head_dim)
    c = input_covariance.to(_f64)
    table = torch.empty(heads, heads, hidden, dtype=_f64, device=c.device)
    for i in range(heads):  # one head at a time: the whole product would be hidden x width^2
        wc = (w[:, i] @ c[i * head_dim:(i + 1) * head_dim]).reshape(hidden, heads, head_dim)
        table[i] = (wc * w).sum(-1).T
    return table


def merge_units(table: torch.Tensor, group_size: int) -> torch.Tensor:
    """The covariance table of units made of `group_size` consecutive heads (KV groups)."""
    h, _, hidden = table.shape
    return table.reshape(h // group_size, group_size, h // group_size, group_size, hidden).sum((1, 3))


def kept_output_correlation(table: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean over hidden dimensions of |Pearson correlation| between the summed output of the kept
    units (`keep`, a bool mask) and the summed output of all of them; 0 when nothing is kept."""
    k = keep.to(table.dtype)
    cross = torch.einsum("i,ijd->d", k, table)           # Cov(kept, all)
    own = torch.einsum("i,j,ijd->d", k, k, table)        # Var(kept)
    full = table.sum((0, 1))                              # Var(all)
    denominator = (own.clamp_min(0) * full.clamp_min(0)).sqrt()
    correlation = torch.where(denominator > 0, cross / denominator.clamp_min(1e-300), torch.zeros_like(cross))
    return float(correlation.abs().mean())


def head_removal_losses(table: torch.Tensor, blocks: list[list[int]], search: str = "greedy") -> torch.Tensor:
    """One value per unit, higher = keep: the loss of output correlation (1 - kept correlation)
    at the point the unit is removed.

    `greedy`: backward elimination, each round removing from every block (KV group) the unit
    whose removal keeps the correlation highest; values grow along the removal order, so ranking
    by them reproduces it. `single`: SlimLLM's first ranking, each unit removed alone."""
    n = table.shape[0]
    everything = torch.ones(n, dtype=torch.bool)
    if search == "single":
        losses = []
        for u in range(n):
            keep = everything.clone()
            keep[u] = False
            losses.append(1.0 - kept_output_correlation(table, keep))
        return torch.tensor(losses, dtype=_f64)
    keep, losses, step, worst = everything.clone(), torch.zeros(n, dtype=_f64), 0, 0.0
    remaining = [list(block) for block in blocks]
    while any(remaining):
        largest = max(len(b) for b in remaining)
        this_round = [b for b in remaining if len(b) == largest]
        while this_round:  # the cheapest removal of the round first, then the cheapest in the other groups
            best, best_block, best_correlation = None, None, -1.0
            for block in this_round:
                for u in block:
                    keep[u] = False
                    correlation = kept_output_correlation(table, keep)
                    keep[u] = True
                    if correlation > best_correlation:
                        best, best_block, best_correlation = u, block, correlation
            keep[best] = False
            best_block.remove(best)
            this_round = [b for b in this_round if b is not best_block]
            # Monotone along the order (a later removal never looks cheaper than an earlier one);
            # the step term breaks ties the way the elimination did.
            worst = max(worst, 1.0 - best_correlation)
            losses[best] = worst + 1e-9 * step
            step += 1
    return losses


# ----------------------------------------------------------------------------- channel math
def channel_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, input_norm: torch.Tensor,
                   channel_norm: torch.Tensor, output_covariance: torch.Tensor) -> torch.Tensor:
    """SlimLLM's FFN channel score. gate, up, down: [channels, hidden] (down = down_proj's columns);
    input_norm [hidden]: L2 norm of each MLP input feature over the tokens; channel_norm
    [channels]: of each channel's activation; output_covariance [hidden, hidden] of down_proj's output."""
    eigenvalues, directions = torch.linalg.eigh(output_covariance.to(_f64))
    eigenvalues = eigenvalues.abs()
    weights = (eigenvalues / eigenvalues.mean().clamp_min(1e-300)).sigmoid()
    projected = (down.to(_f64) @ directions).abs() * weights
    x = input_norm.to(_f64)
    return ((gate.to(_f64) * x).norm(dim=1) + (up.to(_f64) * x).norm(dim=1)
            + channel_norm.to(_f64) * projected.norm(dim=1))


def protect_lowest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """The reference skips the round(fraction * n) lowest-scored channels and prunes the next
    ones: those channels move above every other, in their order."""
    count = round(fraction * len(scores))
    if count == 0:
        return scores
    lowest = torch.argsort(scores, stable=True)[:count]
    lifted = scores.clone()
    lifted[lowest] = scores.max() + 1 + scores[lowest]
    return lifted


# ----------------------------------------------------------------------------- calibration
@dataclass
class SlimLLMLayerStats:
    head_input: FeatureStats | None       # o_proj input, with its Gram matrix
    mlp_input: FeatureStats | None        # the MLP's input (what gate/up read)
    channels: FeatureStats | None         # down_proj input: channel activations
    mlp_output: FeatureStats | None       # down_proj output, with its Gram matrix
    cos_sum: torch.Tensor                 # sum over tokens of cos(layer input, layer output)
    tokens: int = 0

    @property
    def mean_cos(self) -> float:
        return float(self.cos_sum) / max(self.tokens, 1)


def _layer_stats(layer: nn.Module, arch, device) -> SlimLLMLayerStats:
    attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
    has_attention, has_mlp = not isinstance(attention, RemovedAttention), not isinstance(mlp, RemovedMLP)
    hidden = None
    if has_mlp:
        down = getattr(mlp, arch.down_proj)
        hidden = down.out_features
    return SlimLLMLayerStats(
        head_input=FeatureStats.empty(getattr(attention, arch.o_proj).in_features, True, device) if has_attention else None,
        mlp_input=FeatureStats.empty(hidden, False, device) if has_mlp else None,
        channels=FeatureStats.empty(down.in_features, False, device) if has_mlp else None,
        mlp_output=FeatureStats.empty(hidden, True, device) if has_mlp else None,
        cos_sum=torch.zeros((), dtype=_f64, device=device),
    )


def _hooks(layer: nn.Module, arch, stats: SlimLLMLayerStats) -> list:
    handles, seen = [], {}

    def layer_input(module, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    def layer_output(module, args, kwargs, output):
        h_in, h_out = seen.pop("in"), first_output(output)
        stats.cos_sum += torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1).sum(dtype=_f64)
        stats.tokens += h_in.shape[0] * h_in.shape[1]

    handles.append(layer.register_forward_pre_hook(layer_input, with_kwargs=True))
    handles.append(layer.register_forward_hook(layer_output, with_kwargs=True))
    attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
    if stats.head_input is not None:
        handles.append(getattr(attention, arch.o_proj).register_forward_pre_hook(
            lambda m, args: stats.head_input.add(args[0])))
    if stats.mlp_input is not None:
        down = getattr(mlp, arch.down_proj)
        handles.append(mlp.register_forward_pre_hook(lambda m, args: stats.mlp_input.add(args[0])))
        handles.append(down.register_forward_pre_hook(lambda m, args: stats.channels.add(args[0])))
        handles.append(down.register_forward_hook(lambda m, args, out: stats.mlp_output.add(out)))
    return handles


@torch.no_grad()
def collect_slimllm_stats(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8,
                          progress: bool = True) -> list[SlimLLMLayerStats]:
    """One pass over the calibration rows, a layer at a time over cached hidden states on the
    model's device (only one layer's statistics are being filled at once)."""
    arch, layers, _ = layers_of(model)
    device = next(model.parameters()).device
    states, kwargs_of = embed_calibration(model, decoder_layers(model, arch.to_dict()), input_ids, batch_size=batch_size, device=device)
    all_stats = []
    for i, layer in enumerate(tqdm(layers, desc="slimllm: calibration", unit="layer", disable=not progress)):
        stats = _layer_stats(layer, arch, device)
        handles = _hooks(layer, arch, stats)
        try:
            run_layer(layer, states, kwargs_of[i], batch_size=batch_size)
        finally:
            for handle in handles:
                handle.remove()
        all_stats.append(stats)
    return all_stats


# ----------------------------------------------------------------------------- criterion
def slimllm_scores(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, progress: bool = True,
                   head_search: str = "greedy", protect_lowest_fraction: float = DEFAULT_PROTECT_LOWEST,
                   stats: list[SlimLLMLayerStats] | None = None) -> Scores:
    """SlimLLM's head (and KV-group) and channel scores, and each layer's cos(input, output) in
    meta["layer_cos"] for the `slimllm` / `adapt_pruner` allocations."""
    arch, layers, head_dim = layers_of(model)
    stats = stats if stats is not None else collect_slimllm_stats(model, input_ids, batch_size=batch_size,
                                                                  progress=progress)
    values: dict[str, list] = {"head": [], "kv_group": [], "channel": []}
    empty = torch.zeros(0, dtype=_f64)
    for layer, st in zip(layers, stats):
        a, m = attention_weights(layer, arch, head_dim), mlp_weights(layer, arch)
        if a is not None:
            heads = a.q.shape[0]
            per_group = a.heads_per_group
            o_proj = getattr(getattr(layer, arch.attention), arch.o_proj)
            table = head_output_covariances(covariance(st.head_input), o_proj.weight, heads).cpu()
            groups = heads // per_group
            values["head"].append(head_removal_losses(
                table, [list(range(g * per_group, (g + 1) * per_group)) for g in range(groups)], head_search))
            values["kv_group"].append(head_removal_losses(merge_units(table, per_group), [[g] for g in range(groups)]
                                                          if head_search == "single" else [list(range(groups))],
                                                          head_search))
        else:
            values["head"].append(empty)
            values["kv_group"].append(empty)
        if m is not None:
            scores = channel_scores(m.gate, m.up, m.down, st.mlp_input.norm, st.channels.norm,
                                    covariance(st.mlp_output)).cpu()
            values["channel"].append(protect_lowest(scores, protect_lowest_fraction))
        else:
            values["channel"].append(empty)
    meta = {"unit": "heads: loss of output correlation when removed; channels: SlimLLM PCA-weighted norms",
            "layer_cos": [st.mean_cos for st in stats]}
    return Scores("slimllm", values, meta)
