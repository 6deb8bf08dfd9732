"""Random weights for the GPU benchmarks' Llama-shaped models: speed and memory do not depend
on the values, so a model is built on the meta device and filled in place."""
from __future__ import annotations

import torch
from torch import nn

# Llama-3-8B's shape (LlamaConfig keys): what the GPU benchmarks prune and time.
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128)


def random_weights(model: nn.Module, home: torch.device | str, fill_device: torch.device | str | None = None,
                   seed: int = 0) -> nn.Module:
    """Allocate a meta-device `model` in `home` memory and fill it: norm weights 1, matrices
    N(0, 0.02^2), drawn on `fill_device` (default `home`; a CPU fill of 8B values takes minutes)."""
    fill_device = fill_device or home
    model.to_empty(device=home)
    generator = torch.Generator(device=fill_device).manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.fill_(1.0)
            else:
                parameter.copy_(torch.randn(parameter.shape, device=fill_device, dtype=parameter.dtype,
                                            generator=generator) * 0.02)
    # to_empty leaves computed buffers uninitialised: rebuild the rotary inverse frequencies.
    for name, module in list(model.named_modules()):
        if hasattr(module, "inv_freq") and hasattr(module, "config"):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], type(module)(module.config).to(home))
    return model
