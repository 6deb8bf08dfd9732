"""FLAP-style bias compensation: a removed feature is replaced by its calibration mean, which a
bias on the output projection can carry exactly. Only families whose stock config can switch
such a bias on are supported, so that the compensated model still saves as a stock checkpoint."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.models.architecture import Architecture
from prunekit.models.modeling_prunekit import RemovedAttention, RemovedMLP, decoder_layers


class CompensationError(PrunekitError, ValueError):
    """Compensation cannot run as asked; raised before any weight is touched."""


@dataclass(frozen=True)
class BiasFlags:
    """The config flags that give a family's projections biases. A stock config has no flag for
    o_proj or down_proj alone: each flag gives biases to every projection of its sublayer."""

    attention: str
    mlp: str


# Mistral, Qwen 2/3, Gemma 2/3 and Phi-3 configs cannot express an o_proj or down_proj bias
# (Qwen 2's attention bias covers q/k/v only), so a bias would not survive a stock save.
BIAS_FLAGS: dict[str, BiasFlags] = {
    "llama": BiasFlags(attention="attention_bias", mlp="mlp_bias"),
}


def mean_replacement_bias(weight: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W_R · mean(X_R): what the removed input features added on average, as a bias [out].

    weight [out, in]; mean [in], the calibration mean of each input feature; keep, the kept
    input features (LongTensor). Everything not in `keep` is removed.
    """
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[keep] = False
    return weight[:, removed].to(mean.dtype) @ mean[removed]


def bias_flags(arch: Architecture) -> BiasFlags:
    try:
        return BIAS_FLAGS[arch.model_type]
    except KeyError:
        raise CompensationError(
            f"bias compensation needs a family whose stock config can give o_proj/down_proj a bias "
            f"(supported: {', '.join(sorted(BIAS_FLAGS))}), and {arch.model_type!r} is not one; "
            f"compensate with bias=False"
        ) from None


def _add_zero_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device))


def enable_output_biases(model: nn.Module, arch: Architecture, *, attention: bool, mlp: bool) -> None:
    """Switch on the family's attention and/or MLP bias flag and give every projection the flag
    covers a (zero) bias, in every layer, so the model still loads as its stock class."""
    flags = bias_flags(arch)
    for layer in decoder_layers(model, arch.to_dict()):
        sublayers = (
            (attention, getattr(layer, arch.attention), RemovedAttention,
             (arch.q_proj, arch.k_proj, arch.v_proj, arch.qkv_proj, arch.o_proj)),
            (mlp, getattr(layer, arch.mlp), RemovedMLP,
             (arch.gate_proj, arch.up_proj, arch.gate_up_proj, arch.down_proj)),
        )
        for wanted, module, removed_type, names in sublayers:
            if wanted and not isinstance(module, removed_type):
                for name in filter(None, names):
                    _add_zero_bias(getattr(module, name))
    if attention:
        setattr(model.config, flags.attention, True)
    if mlp:
        setattr(model.config, flags.mlp, True)
