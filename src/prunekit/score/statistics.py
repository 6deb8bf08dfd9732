"""One calibration pass that records, per layer, what the activation-based criteria and
compensation need: per-feature sums and squares of the inputs of o_proj and down_proj (the
projections that consume heads and FFN channels), optionally their Gram matrices, and how much
each layer and sublayer turns the residual stream (cosine of input and output)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.models.architecture import Architecture, architecture_for
from prunekit.models.modeling_prunekit import RemovedAttention, RemovedMLP, decoder_layers


@dataclass
class FeatureStats:
    """Running moments of the input features of one projection (float64 sums)."""

    sum: torch.Tensor
    sum_sq: torch.Tensor
    gram: torch.Tensor | None
    tokens: int = 0

    @classmethod
    def empty(cls, width: int, with_gram: bool) -> FeatureStats:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(zeros(width), zeros(width), zeros(width, width) if with_gram else None)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64).cpu()
        self.sum += x.sum(0)
        self.sum_sq += (x * x).sum(0)
        if self.gram is not None:
            self.gram += x.T @ x
        self.tokens += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.tokens

    @property
    def norm(self) -> torch.Tensor:
        """L2 norm of each feature over all calibration tokens."""
        return self.sum_sq.sqrt()

    @property
    def variance(self) -> torch.Tensor:
        return (self.sum_sq / self.tokens - self.mean**2).clamp_min(0)


@dataclass
class LayerStats:
    attention_input: FeatureStats | None   # input of o_proj: concatenated head outputs
    mlp_input: FeatureStats | None         # input of down_proj: FFN channel activations
    cos_sum: dict[str, float]              # "layer" | "attention" | "mlp" -> sum over tokens of cos(in, out)
    angle_sum: dict[str, float]            # the same for arccos(cos(in, out)) / pi
    contribution_norm_sum: dict[str, float]  # "attention" | "mlp" -> sum of ||what it adds|| / ||residual||
    tokens: int = 0

    def mean_cos(self, kind: str) -> float:
        return self.cos_sum[kind] / max(self.tokens, 1)

    def mean_angle(self, kind: str) -> float:
        return self.angle_sum[kind] / max(self.tokens, 1)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def _hook_layer(layer: nn.Module, arch: Architecture, stats: LayerStats, handles: list) -> None:
    seen: dict[str, torch.Tensor] = {}
    attention = getattr(layer, arch.attention)
    mlp = getattr(layer, arch.mlp)

    def layer_input(module, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    def attention_added(module, args, output):
        seen["attention"] = _first(output)

    def mlp_added(module, args, output):
        seen["mlp"] = _first(output)

    def layer_output(module, args, kwargs, output):
        h_in, h_out = seen.pop("in"), _first(output)
        added_attention = seen.pop("attention", torch.zeros_like(h_in))
        h_mid = h_in + added_attention
        seen.pop("mlp", None)
        for kind, (a, b) in {"layer": (h_in, h_out), "attention": (h_in, h_mid), "mlp": (h_mid, h_out)}.items():
            cos = _cos(a, b)
            stats.cos_sum[kind] += cos.sum().item()
            stats.angle_sum[kind] += (cos.clamp(-1, 1).acos() / torch.pi).sum().item()
        residual_norm = h_in.float().norm(dim=-1).clamp_min(1e-6)
        stats.contribution_norm_sum["attention"] += (added_attention.float().norm(dim=-1) / residual_norm).sum().item()
        stats.contribution_norm_sum["mlp"] += ((h_out - h_mid).float().norm(dim=-1) / residual_norm).sum().item()
        stats.tokens += h_in.shape[0] * h_in.shape[1]

    handles.append(layer.register_forward_pre_hook(layer_input, with_kwargs=True))
    handles.append(layer.register_forward_hook(layer_output, with_kwargs=True))
    if not isinstance(attention, RemovedAttention):
        source = getattr(layer, arch.attention_output_norm) if arch.attention_output_norm else attention
        handles.append(source.register_forward_hook(attention_added))
        o_proj = getattr(attention, arch.o_proj)
        handles.append(o_proj.register_forward_pre_hook(lambda m, args: stats.attention_input.add(args[0])))
    if not isinstance(mlp, RemovedMLP):
        down = getattr(mlp, arch.down_proj)
        handles.append(down.register_forward_pre_hook(lambda m, args: stats.mlp_input.add(args[0])))


@torch.no_grad()
def collect_layer_stats(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, with_gram: bool = False,
                        progress: bool = True) -> list[LayerStats]:
    """Run `input_ids` [n, seq_len] through `model` once and return per-layer statistics."""
    arch = architecture_for(model.config.model_type)
    all_stats, handles = [], []
    for layer in decoder_layers(model, arch.to_dict()):
        attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
        stats = LayerStats(
            attention_input=None if isinstance(attention, RemovedAttention)
            else FeatureStats.empty(getattr(attention, arch.o_proj).in_features, with_gram),
            mlp_input=None if isinstance(mlp, RemovedMLP)
            else FeatureStats.empty(getattr(mlp, arch.down_proj).in_features, with_gram),
            cos_sum={"layer": 0.0, "attention": 0.0, "mlp": 0.0},
            angle_sum={"layer": 0.0, "attention": 0.0, "mlp": 0.0},
            contribution_norm_sum={"attention": 0.0, "mlp": 0.0},
        )
        _hook_layer(layer, arch, stats, handles)
        all_stats.append(stats)
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(input_ids), batch_size), desc="calibration pass", unit="batch", disable=not progress):
            model.base_model(input_ids[start:start + batch_size].to(device), use_cache=False)  # no output head needed
    finally:
        for handle in handles:
            handle.remove()
    return all_stats
