"""First-order Taylor importance (LLM-Pruner): the loss change predicted by removing a group
of weights, from one backward pass over the calibration data.

element-wise: sum over the group's weights of |w * dL/dw|
vector-wise:  |sum over the group's weights of w * dL/dw|
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.models.loss import OutputHead, next_token_loss
from prunekit.models.precision import bfloat16_autocast
from prunekit.score.criteria import per_hidden_channel
from prunekit.score.parts import attention_weights, group_sum, layers_of, mlp_weights
from prunekit.score.scores import Scores

TAYLOR_VARIANTS = ("element", "vector")
# Calibration tokens the gradient is taken on (0: every row). Every row by default: on SmolLM2-135M
# the first 16,384 tokens (a quarter of the cost) were as good at 20% but far worse at 35% and 50%
# (WikiText-2 101.5 and 226.7 against 81.1 and 140.5: BENCHMARKS.md, "The default prune on a
# 2-core CPU"), so the saving is an option (`tokens=16384`), not the default.
DEFAULT_TAYLOR_TOKENS = 0


def _saliency(weight: torch.Tensor, grad: torch.Tensor, dims, variant: str) -> torch.Tensor:
    product = weight.to(torch.float64) * grad.to(torch.float64)
    return product.abs().sum(dims) if variant == "element" else product.sum(dims)


def _products(weights, grads, variant: str):
    """w * dL/dw (|w * dL/dw| element-wise) in the layout of `weights` (AttentionWeights or MLPWeights)."""
    if weights is None:
        return None
    fields = [f for f in ("q", "k", "v", "o", "gate", "up", "down") if hasattr(weights, f)]
    products = {f: getattr(weights, f).to(torch.float64) * getattr(grads, f).to(torch.float64) for f in fields}
    return replace(weights, **{f: p.abs() if variant == "element" else p for f, p in products.items()})


def accumulate_gradients(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None, *, batch_size: int,
                         progress: bool, autocast: bool = True) -> None:
    """Gradient of the mean calibration loss w.r.t. every decoder-layer weight (in .grad, float32
    for float32 weights).

    The decoder layers run under bfloat16 autocast when `autocast` and the device has fast bf16
    products (`fast_bfloat16`) and the weights are float32; the vocabulary-wide loss always runs
    in float32, a chunk of positions at a time (prunekit.models.loss), whatever the weights' dtype:
    the full logits of a large vocabulary do not fit, and in bf16 on a CPU they are both
    inaccurate and many times slower."""
    _, layers, _ = layers_of(model)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for layer in layers:
        for p in layer.parameters():
            p.requires_grad_(True)
    weights = next(model.parameters())
    device = weights.device
    labels = input_ids if labels is None else labels
    counted = max((labels[:, 1:] != -100).sum().item(), 1)
    head = OutputHead.of(model)
    precision = bfloat16_autocast(device, weights.dtype, autocast)
    model.eval()  # no dropout: importance of the model as it will run
    for start in tqdm(range(0, len(input_ids), batch_size), desc="taylor: gradients", unit="batch", disable=not progress):
        ids = input_ids[start:start + batch_size].to(device)
        lab = labels[start:start + batch_size].to(device)
        with precision:
            hidden = model.base_model(ids, use_cache=False).last_hidden_state
        loss = next_token_loss(head, hidden, lab, divide_by=counted)
        loss.backward()
        del hidden, loss


def taylor_rows(input_ids: torch.Tensor, tokens: int) -> int:
    """Rows of `input_ids` that hold `tokens` calibration tokens (at least one; 0: every row)."""
    return len(input_ids) if tokens == 0 else min(len(input_ids), max(1, tokens // input_ids.shape[1]))


def taylor_scores(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None = None, *,
                  variant: str = "element", batch_size: int = 4, progress: bool = True,
                  tokens: int = DEFAULT_TAYLOR_TOKENS, autocast: bool = True) -> Scores:
    """Taylor importance from the gradient of the loss on the first rows of `input_ids` that hold
    `tokens` tokens (0: every row); `autocast` as in `accumulate_gradients`."""
    if variant not in TAYLOR_VARIANTS:
        raise ValueError(f"unknown taylor variant {variant!r}; choose one of {list(TAYLOR_VARIANTS)}")
    if tokens < 0:
        raise ValueError(f"tokens must be 0 (every row) or a positive token count, got {tokens}")
    rows = taylor_rows(input_ids, tokens)
    input_ids, labels = input_ids[:rows], None if labels is None else labels[:rows]
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    accumulate_gradients(model, input_ids, labels, batch_size=batch_size, progress=progress, autocast=autocast)
    arch, layers, head_dim = layers_of(model)
    finish = (lambda t: t.abs()) if variant == "vector" else (lambda t: t)
    values: dict[str, list] = {k: [] for k in ("layer", "attention", "mlp", "kv_group", "head", "channel", "hidden")}
    zero = torch.zeros(0, dtype=torch.float64)
    hidden = model.get_input_embeddings().weight.shape[1]
    for layer in layers:
        a_w, a_g = attention_weights(layer, arch, head_dim), attention_weights(layer, arch, head_dim, grad=True)
        m_w, m_g = mlp_weights(layer, arch), mlp_weights(layer, arch, grad=True)
        # a residual channel: the saliency of every weight of this layer that reads or writes it
        values["hidden"].append(finish(per_hidden_channel(
            _products(a_w, a_g, variant), _products(m_w, m_g, variant), hidden, lambda t, dims: t.sum(dims))))
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
    return Scores("taylor", values, {"variant": variant, "unit": "first-order loss change (nats/token)",
                                     "rows": rows, "tokens": int(input_ids.numel())})
