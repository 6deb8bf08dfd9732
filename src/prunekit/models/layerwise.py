"""Running a model one decoder layer at a time: the hidden states that enter the first layer,
and the keyword arguments (masks, rotary embeddings) each layer is called with. Sensitivity
analysis and sequential compensation run layers themselves on cached states."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

_NOT_FORWARDED = ("hidden_states", "past_key_values", "cache", "use_cache")


def first_output(output):
    """Decoder layers return a tensor in recent transformers and a tuple in older ones."""
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, *, batch_size: int,
                         keep: set[int] | None = None, progress: bool = True, desc: str = "caching layer inputs"):
    """(inputs, kwargs): the hidden states entering each layer in `keep` (all layers by
    default), concatenated over `input_ids`, and every layer's call kwargs. The kwargs are
    captured at batch size 1 so that they broadcast to any batch."""
    keep = set(range(len(layers))) if keep is None else keep
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in keep}
    kwargs_of: list[dict] = [{} for _ in layers]
    capturing_kwargs = [True]
    device = next(model.parameters()).device

    def make_hook(i):
        def hook(module, args, kwargs):
            if capturing_kwargs[0]:
                kwargs_of[i] = {k: v for k, v in kwargs.items() if k not in _NOT_FORWARDED}
            elif i in keep:
                inputs[i].append((args[0] if args else kwargs["hidden_states"]).detach())
        return hook

    handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model.base_model(input_ids[:1].to(device), use_cache=False)
        capturing_kwargs[0] = False
        for start in tqdm(range(0, len(input_ids), batch_size), desc=desc, unit="batch", disable=not progress):
            model.base_model(input_ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {i: torch.cat(x) for i, x in inputs.items()}, kwargs_of
