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
from prunekit.models.layerwise import embed_calibration, layer_on, run_layer
from prunekit.models.modeling_prunekit import RemovedAttention, RemovedMLP, decoder_layers

_CHUNK_ELEMENTS = 2**24  # activation elements converted to float32 at once: 64 MiB


@dataclass
class FeatureStats:
    """Running moments of the input features of one projection (float64 sums), kept on the
    device the projection runs on: a batch never makes a round trip to the CPU."""

    sum: torch.Tensor
    sum_sq: torch.Tensor
    gram: torch.Tensor | None
    tokens: int = 0

    @classmethod
    def empty(cls, width: int, with_gram: bool, device: torch.device | str = "cpu") -> FeatureStats:
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        return cls(zeros(width), zeros(width), zeros(width, width) if with_gram else None)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device)
        # On a CPU, products in float32 and sums across chunks in float64: a chunk's float32 Gram
        # block carries a relative rounding error near 1e-6 (tested against float64), far below
        # the ridge's 1e-3, at half the cost of a float64 product. On a GPU float32 products may
        # run as TF32 (10-bit mantissas), so they stay float64 there. The chunks also bound the
        # converted copy of a batch of FFN activations, gigabytes at 8B scale.
        product_dtype = torch.float64 if x.is_cuda else torch.float32
        # The hooks that call this run inside the layer's autocast, which would make the product bf16.
        with torch.autocast(x.device.type, enabled=False):
            for chunk in x.split(max(1, _CHUNK_ELEMENTS // x.shape[1])):
                chunk = chunk.to(product_dtype)
                # Sums in the product dtype, then float64 across chunks: sum(dtype=float64) of a
                # float32 chunk runs many times slower. The squares are the Gram matrix's diagonal.
                self.sum += chunk.sum(0).double()
                if self.gram is not None:
                    block = chunk.T @ chunk
                    self.gram += block.double()
                    self.sum_sq += block.diagonal().double()
                else:
                    self.sum_sq += chunk.square().sum(0).double()
        self.tokens += x.shape[0]

    def to(self, device: torch.device | str) -> FeatureStats:
        return FeatureStats(self.sum.to(device), self.sum_sq.to(device),
                            self.gram.to(device) if self.gram is not None else None, self.tokens)

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
    # (while the pass runs, the three sums are float64 tensors on the device)
    tokens: int = 0
    # per residual channel: sum over tokens of the squared outputs of the sublayers' input norms
    # (what the layer's projections read of the residual stream): hidden-size importance
    hidden_sq: torch.Tensor | None = None

    def mean_cos(self, kind: str) -> float:
        return self.cos_sum[kind] / max(self.tokens, 1)

    def mean_angle(self, kind: str) -> float:
        return self.angle_sum[kind] / max(self.tokens, 1)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def _hook_layer(layer: nn.Module, arch: Architecture, stats: LayerStats, handles: list) -> None:
    """Hooks that feed `stats` while `layer` runs. The per-token sums stay tensors on the layer's
    device while the pass runs (a Python float per batch would stop the GPU at every layer);
    `_finish` turns them into floats."""
    seen: dict[str, torch.Tensor] = {}
    attention = getattr(layer, arch.attention)
    mlp = getattr(layer, arch.mlp)

    def layer_input(module, args, kwargs):
        seen["in"] = args[0] if args else kwargs["hidden_states"]

    def attention_added(module, args, output):
        seen["attention"] = _first(output)

    def layer_output(module, args, kwargs, output):
        h_in, h_out = seen.pop("in"), _first(output)
        added_attention = seen.pop("attention", torch.zeros_like(h_in))
        h_mid = h_in + added_attention
        for kind, (a, b) in {"layer": (h_in, h_out), "attention": (h_in, h_mid), "mlp": (h_mid, h_out)}.items():
            cos = _cos(a, b)
            stats.cos_sum[kind] = stats.cos_sum[kind] + cos.sum(dtype=torch.float64)
            stats.angle_sum[kind] = stats.angle_sum[kind] + (cos.clamp(-1, 1).acos() / torch.pi).sum(dtype=torch.float64)
        residual_norm = h_in.float().norm(dim=-1).clamp_min(1e-6)
        stats.contribution_norm_sum["attention"] = stats.contribution_norm_sum["attention"] + (
            added_attention.float().norm(dim=-1) / residual_norm).sum(dtype=torch.float64)
        stats.contribution_norm_sum["mlp"] = stats.contribution_norm_sum["mlp"] + (
            (h_out - h_mid).float().norm(dim=-1) / residual_norm).sum(dtype=torch.float64)
        stats.tokens += h_in.shape[0] * h_in.shape[1]

    handles.append(layer.register_forward_pre_hook(layer_input, with_kwargs=True))
    handles.append(layer.register_forward_hook(layer_output, with_kwargs=True))
    if not isinstance(attention, RemovedAttention):
        source = getattr(layer, arch.attention_output_norm) if arch.attention_output_norm else attention
        handles.append(source.register_forward_hook(attention_added))
        o_proj = getattr(attention, arch.o_proj)
        handles.append(o_proj.register_forward_pre_hook(lambda m, args: stats.attention_input.add(args[0])))
    if not isinstance(mlp, RemovedMLP) and hasattr(mlp, arch.down_proj):  # (a MoE block has no one down_proj)
        down = getattr(mlp, arch.down_proj)
        handles.append(down.register_forward_pre_hook(lambda m, args: stats.mlp_input.add(args[0])))

    def norm_output(module, args, output):
        squares = output.detach().float().pow(2).reshape(-1, output.shape[-1]).sum(0, dtype=torch.float64)
        stats.hidden_sq = squares if stats.hidden_sq is None else stats.hidden_sq + squares

    for norm in input_norms(layer, arch):
        handles.append(norm.register_forward_hook(norm_output))


def input_norms(layer: nn.Module, arch: Architecture) -> list[nn.Module]:
    """The norms through which the layer's sublayers read the residual stream (not Gemma's
    output norms, nor the stand-ins of removed sublayers)."""
    outputs = {arch.attention_output_norm, arch.mlp_output_norm}
    names = [next((n for n in norms if n not in outputs), None) for norms in (arch.attention_norms, arch.mlp_norms)]
    return [getattr(layer, n) for n in names if n and not isinstance(getattr(layer, n), nn.Identity)]


def _empty_stats(layer: nn.Module, arch: Architecture, with_gram: bool, device: torch.device | str) -> LayerStats:
    attention, mlp = getattr(layer, arch.attention), getattr(layer, arch.mlp)
    return LayerStats(
        attention_input=None if isinstance(attention, RemovedAttention)
        else FeatureStats.empty(getattr(attention, arch.o_proj).in_features, with_gram, device),
        mlp_input=None if isinstance(mlp, RemovedMLP) or not hasattr(mlp, arch.down_proj)
        else FeatureStats.empty(getattr(mlp, arch.down_proj).in_features, with_gram, device),
        cos_sum={"layer": 0.0, "attention": 0.0, "mlp": 0.0},
        angle_sum={"layer": 0.0, "attention": 0.0, "mlp": 0.0},
        contribution_norm_sum={"attention": 0.0, "mlp": 0.0},
    )


def _finish(stats: LayerStats, device: torch.device | str | None = None) -> LayerStats:
    """The per-token sums as floats, and the feature statistics moved to `device` (if given)."""
    def floats(sums: dict) -> dict[str, float]:
        return {kind: float(value) for kind, value in sums.items()}

    move = (lambda f: f.to(device) if f is not None else None) if device is not None else (lambda f: f)  # noqa: E731
    hidden_sq = stats.hidden_sq.to(device) if stats.hidden_sq is not None and device is not None else stats.hidden_sq
    return LayerStats(move(stats.attention_input), move(stats.mlp_input), floats(stats.cos_sum),
                      floats(stats.angle_sum), floats(stats.contribution_norm_sum), stats.tokens, hidden_sq)


@torch.no_grad()
def collect_layer_stats(model: nn.Module, input_ids: torch.Tensor, *, batch_size: int = 8, with_gram: bool = False,
                        progress: bool = True, layer_by_layer: bool = False,
                        device: torch.device | str | None = None) -> list[LayerStats]:
    """Run `input_ids` [n, seq_len] through `model` once and return per-layer statistics.

    By default the whole model runs where it is, batch by batch, and the statistics stay on its
    device. With `layer_by_layer`, the model stays where it is (CPU memory) and only the
    embedding output of all rows plus one layer at a time visit `device`: each layer runs over
    the cached states, which its outputs then replace, and its statistics move back to the CPU.
    """
    arch = architecture_for(model.config.model_type)
    layers = decoder_layers(model, arch.to_dict())
    if layer_by_layer:
        return _collect_layer_by_layer(model, layers, arch, input_ids, batch_size=batch_size, with_gram=with_gram,
                                       progress=progress, device=device or "cpu")
    model_device = next(model.parameters()).device
    all_stats, handles = [], []
    for layer in layers:
        stats = _empty_stats(layer, arch, with_gram, model_device)
        _hook_layer(layer, arch, stats, handles)
        all_stats.append(stats)
    try:
        for start in tqdm(range(0, len(input_ids), batch_size), desc="calibration pass", unit="batch", disable=not progress):
            model.base_model(input_ids[start:start + batch_size].to(model_device), use_cache=False)  # no output head needed
    finally:
        for handle in handles:
            handle.remove()
    return [_finish(stats) for stats in all_stats]


def _collect_layer_by_layer(model: nn.Module, layers: nn.ModuleList, arch: Architecture, input_ids: torch.Tensor, *,
                            batch_size: int, with_gram: bool, progress: bool,
                            device: torch.device | str) -> list[LayerStats]:
    states, kwargs_of = embed_calibration(model, layers, input_ids, batch_size=batch_size, device=device)
    all_stats = []
    for i in tqdm(range(len(layers)), desc="calibration pass, layer by layer", unit="layer", disable=not progress):
        layer = layers[i]
        with layer_on(layer, device):
            stats, handles = _empty_stats(layer, arch, with_gram, device), []
            _hook_layer(layer, arch, stats, handles)
            try:
                run_layer(layer, states, kwargs_of[i], batch_size=batch_size)
            finally:
                for handle in handles:
                    handle.remove()
        # A Gram matrix per layer would not fit on the device for every layer at once.
        all_stats.append(_finish(stats, device="cpu"))
    return all_stats
