"""First-order Taylor importance (LLM-Pruner): the loss change predicted by removing a group
of weights, from one backward pass over the calibration data.

element-wise: sum over the group's weights of |w * dL/dw|
vector-wise:  |sum over the group's weights of w * dL/dw|
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.score.parts import attention_weights, group_sum, layers_of, mlp_weights
from prunekit.score.scores import Scores

TAYLOR_VARIANTS = ("element", "vector")


def _saliency(weight: torch.Tensor, grad: torch.Tensor, dims, variant: str) -> torch.Tensor:
    product = weight.to(torch.float64) * grad.to(torch.float64)
    return product.abs().sum(dims) if variant == "element" else product.sum(dims)


def accumulate_gradients(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None, *, batch_size: int,
                         progress: bool) -> None:
    """Gradient of the mean calibration loss w.r.t. every decoder-layer weight (in .grad)."""
    _, layers, _ = layers_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for layer in layers:
        for p in layer.parameters():
            p.requires_grad_(True)
    device = next(model.parameters()).device
    labels = input_ids if labels is None else labels
    counted = (labels[:, 1:] != -100).sum().item()
    model.eval()  # no dropout: importance of the model as it will run
    for start in tqdm(range(0, len(input_ids), batch_size), desc="taylor: gradients", unit="batch", disable=not progress):
        ids = input_ids[start:start + batch_size].to(device)
        lab = labels[start:start + batch_size].to(device)
        logits = model(ids, use_cache=False).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                           ignore_index=-100, reduction="sum") / counted
        loss.backward()
        del logits, loss


def taylor_scores(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                  variant: str = "element", batch_size: int = 4, progress: bool = True) -> Scores:
    if variant not in TAYLOR_VARIANTS:
        raise ValueError(f"unknown taylor variant {variant!r}; choose one of {list(TAYLOR_VARIANTS)}")
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    accumulate_gradients(model, input_ids, labels, batch_size=batch_size, progress=progress)
    arch, layers, head_dim = layers_of(model)
    finish = (lambda t: t.abs()) if variant == "vector" else (lambda t: t)
    values: dict[str, list] = {k: [] for k in ("layer", "attention", "mlp", "kv_group", "head", "channel")}
    zero = torch.zeros(0, dtype=torch.float64)
    for layer in layers:
        a_w, a_g = attention_weights(layer, arch, head_dim), attention_weights(layer, arch, head_dim, grad=True)
        m_w, m_g = mlp_weights(layer, arch), mlp_weights(layer, arch, grad=True)
        if a_w is not None:
            heads = _saliency(a_w.q, a_g.q, (1, 2), variant) + _saliency(a_w.o, a_g.o, (1, 2), variant)
            kv = _saliency(a_w.k, a_g.k, (1, 2), variant) + _saliency(a_w.v, a_g.v, (1, 2), variant)
            groups = group_sum(heads, a_w.heads_per_group) + kv
            attention = groups.sum()
        else:
            heads = groups = zero
            attention = torch.tensor(0.0, dtype=torch.float64)
        if m_w is not None:
            channels = sum(_saliency(getattr(m_w, n), getattr(m_g, n), 1, variant) for n in ("gate", "up", "down"))
            mlp = channels.sum()
        else:
            channels, mlp = zero, torch.tensor(0.0, dtype=torch.float64)
        values["head"].append(finish(heads))
        values["kv_group"].append(finish(groups))
        values["channel"].append(finish(channels))
        values["attention"].append(finish(attention))
        values["mlp"].append(finish(mlp))
        values["layer"].append(finish(attention + mlp))
    for name, p in model.named_parameters():
        p.grad = None
        p.requires_grad_(trainable[name])
    return Scores("taylor", values, {"variant": variant, "unit": "first-order loss change (nats/token)"})
