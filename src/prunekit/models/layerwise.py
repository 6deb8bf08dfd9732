"""Running a model one decoder layer at a time: the hidden states that enter the first layer,
and the keyword arguments (masks, rotary embeddings) each layer is called with. Sensitivity
analysis and sequential compensation run layers themselves on cached states; layer-by-layer
mode does the same with the model in CPU memory and one layer at a time on the device."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

_NOT_FORWARDED = ("hidden_states", "past_key_values", "cache", "use_cache")


def first_output(output):
    """Decoder layers return a tensor in recent transformers and a tuple in older ones."""
    return output[0] if isinstance(output, tuple) else output


class _Captured(Exception):
    """Stops a forward pass once the first layer's input has been recorded."""


def _outside_layers(model: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The base model's modules that run before (and after) the decoder layers: embedding, rotary
    embedding, final norm. Small, so they visit the device whole."""
    return [child for child in model.base_model.children() if child is not layers]


@torch.no_grad()
def embed_calibration(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, *, batch_size: int,
                      device: torch.device | str) -> tuple[torch.Tensor, list[dict]]:
    """(states, kwargs): the hidden states entering the first layer for all of `input_ids`, on
    `device`, and every layer's call kwargs (batch size 1, on `device`), without running any
    decoder layer. Only the modules outside the layers visit `device`; each layer's forward is
    replaced for the duration by one that records what it is called with, so this works with the
    layers anywhere (in CPU memory when the model is larger than the device)."""
    kwargs_of: list[dict] = [{} for _ in layers]
    batch: list[torch.Tensor] = []
    recording_kwargs = [True]

    def make_forward(i):
        def forward(hidden_states, *args, **kwargs):
            if recording_kwargs[0]:
                kwargs_of[i] = {k: v for k, v in kwargs.items() if k not in _NOT_FORWARDED}
                return hidden_states  # pass through, so that every layer's kwargs are seen
            batch.append(hidden_states.detach())
            raise _Captured
        return forward

    outside = _outside_layers(model, layers)
    homes = [_device_of(module) for module in outside]
    for module in outside:
        module.to(device)
    own_forwards = [layer.__dict__.get("forward") for layer in layers]  # e.g. an accelerate hook's
    for i, layer in enumerate(layers):
        layer.forward = make_forward(i)
    try:
        model.base_model(input_ids[:1].to(device), use_cache=False)
        recording_kwargs[0] = False
        states = None
        for start in range(0, len(input_ids), batch_size):
            try:
                model.base_model(input_ids[start:start + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
            block = batch.pop()
            if states is None:  # filled in place: a list and its concatenation would need twice the memory
                states = block.new_empty((len(input_ids), *block.shape[1:]))
            states[start:start + len(block)] = block
    finally:
        for layer, own in zip(layers, own_forwards):
            if own is None:
                del layer.forward  # the class's forward again
            else:
                layer.forward = own
        for module, home in zip(outside, homes):
            if home is not None:
                module.to(home)
    return states, kwargs_of


def _device_of(module: nn.Module) -> torch.device | None:
    tensor = next(iter(module.parameters()), None)
    if tensor is None:
        tensor = next(iter(module.buffers()), None)
    return tensor.device if tensor is not None else None


@contextmanager
def layer_on(layer: nn.Module, device: torch.device | str):
    """`layer` on `device` while the block runs, then back where it was (a no-op when it is there
    already): layer-by-layer mode holds one layer at a time on the device."""
    home = _device_of(layer)
    layer.to(device)
    try:
        yield layer
    finally:
        if home is not None:
            layer.to(home)


@torch.no_grad()
def run_layer(layer: nn.Module, states: torch.Tensor, layer_kwargs: dict, *, batch_size: int) -> None:
    """Replace `states` [rows, seq, hidden] by `layer`'s output on them, `batch_size` rows at a time."""
    for start in range(0, len(states), batch_size):
        block = slice(start, start + batch_size)
        states[block] = first_output(layer(states[block], **layer_kwargs))
