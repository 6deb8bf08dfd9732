"""The next-token loss over the whole vocabulary, a chunk of positions at a time, in float32.

The full logits of one batch are the largest tensor prunekit ever makes: 8 x 512 positions of a
262,144-token vocabulary are 4.3 GB in float32, and a loss with its log-softmax and gradients
holds several copies. Here the output head runs on a chunk of positions at a time (LOSS_CHUNK_ELEMENTS
logits), and with gradients the chunk's backward pass runs at once, inside the forward, so that
only the gradient of the hidden states (the size of the hidden states) outlives the chunk.

Float32 whatever the model's dtype: on a CPU, bfloat16 products and log-softmax over a
vocabulary-wide row are both inaccurate and pathologically slow (a 128k vocabulary took minutes
per batch), so the head's product is made in float32 there; on a GPU it runs in the weights' dtype,
or in the caller's autocast dtype (tensor cores), and the logits are upcast before the softmax.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100
# Logit elements of one chunk: 64 MiB in float32 on a CPU (a loss with gradients holds about four
# such buffers at once), 1 GiB on a GPU.
LOSS_CHUNK_ELEMENTS = {"cpu": 2**24, "cuda": 2**28}


@dataclass(frozen=True)
class OutputHead:
    """What turns final (normed) hidden states into logits: the head's weight [vocab, hidden], an
    optional bias, and Gemma's final logit soft-capping."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None

    @classmethod
    def of(cls, model: nn.Module) -> OutputHead:
        head = model.get_output_embeddings()
        return cls(head.weight, getattr(head, "bias", None), getattr(model.config, "final_logit_softcapping", None))

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]


# Devices where the head's product follows the caller's autocast dtype (a CPU's bf16 products over
# a vocabulary-wide row are inaccurate and slow: see the module docstring).
AUTOCAST_PRODUCT_DEVICES = {"cuda"}


def autocast_product_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype the caller's autocast would give the head's product on `device`, where it follows
    autocast (AUTOCAST_PRODUCT_DEVICES); None elsewhere or without autocast."""
    kind = torch.device(device).type
    if kind in AUTOCAST_PRODUCT_DEVICES and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def chunk_positions(vocab_size: int, device: torch.device | str) -> int:
    """Positions per chunk: LOSS_CHUNK_ELEMENTS logits of the device's kind."""
    kind = "cuda" if torch.device(device).type == "cuda" else "cpu"
    return max(1, LOSS_CHUNK_ELEMENTS[kind] // vocab_size)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None) -> torch.Tensor:
    """float32 logits of a chunk; `weight` is already in the product's dtype."""
    logits = F.linear(hidden.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _product_weight(head: OutputHead) -> torch.Tensor:
    """The head's weight in the dtype of its product: float32 on a CPU (see the module docstring)."""
    return head.weight if head.weight.is_cuda else head.weight.float()


def product_head(head: OutputHead, dtype: torch.dtype | None = None) -> OutputHead:
    """`head` with its weight in the dtype of its product (a float32 copy on a CPU when the weights
    are not float32; `dtype` on a GPU, where given: the autocast dtype its caller trains in), made
    once for a head whose logits `head_logits` makes chunk after chunk."""
    weight = head.weight.to(dtype) if dtype is not None and head.weight.is_cuda else _product_weight(head)
    bias = None if head.bias is None else head.bias.detach().to(weight.dtype)
    return OutputHead(weight.detach(), bias, head.softcap)


def head_logits(head: OutputHead, hidden: torch.Tensor) -> torch.Tensor:
    """float32 logits of `hidden` [n, hidden] under a `product_head`: a chunk at a time, never the batch."""
    with torch.autocast(hidden.device.type, enabled=False):
        return _logits(hidden, head.weight, head.bias, head.softcap)


LogitsLoss = Callable[..., torch.Tensor]  # (logits [n, vocab] float32, *per-position tensors [n, ...]) -> scalar


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over chunks of loss(logits(hidden[chunk]), *extras[chunk]), with the gradients of hidden
    (and of the head's weight and bias when they need one) made chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, softcap, loss_of_logits, rows, *extras):
        wants = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        lowered = autocast_product_dtype(hidden.device)  # read before the chunks turn autocast off
        product = weight.to(lowered) if lowered is not None else weight if weight.is_cuda else weight.float()
        product = product.detach().requires_grad_(wants[1])
        product_bias = None if bias is None else bias.detach().to(product.dtype).requires_grad_(wants[2])
        grad_hidden = torch.zeros_like(hidden) if wants[0] else None
        grad_weight = torch.zeros_like(product, dtype=torch.float32) if wants[1] else None
        grad_bias = torch.zeros_like(product_bias, dtype=torch.float32) if wants[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        device_type = hidden.device.type
        for start in range(0, hidden.shape[0], rows):
            chunk = slice(start, start + rows)
            part = hidden[chunk].detach().requires_grad_(wants[0])
            with torch.enable_grad(), torch.autocast(device_type, enabled=False):
                loss = loss_of_logits(_logits(part, product, product_bias, softcap), *(e[chunk] for e in extras))
                inputs = [t for t, want in zip((part, product, product_bias), wants) if want]
                grads = iter(torch.autograd.grad(loss, inputs)) if inputs else iter(())
            if wants[0]:
                grad_hidden[chunk] = next(grads)
            if wants[1]:
                grad_weight += next(grads)
            if wants[2]:
                grad_bias += next(grads)
            total += loss.detach()
        ctx.save_for_backward(*(t for t in (grad_hidden, grad_weight, grad_bias) if t is not None))
        ctx.wants, ctx.dtypes, ctx.extras = wants, (weight.dtype, None if bias is None else bias.dtype), len(extras)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        grad_hidden, grad_weight, grad_bias = (next(saved) if want else None for want in ctx.wants)
        # in place: a head's weight gradient is vocabulary x hidden, and a scaled copy of it would
        # add that much to the peak of every training step
        scale = lambda g, dtype: None if g is None else g.mul_(grad_output).to(dtype)  # noqa: E731
        return (scale(grad_hidden, grad_hidden.dtype if grad_hidden is not None else None),
                scale(grad_weight, ctx.dtypes[0]), scale(grad_bias, ctx.dtypes[1]), None, None, None,
                *([None] * ctx.extras))


def chunked_head_loss(head: OutputHead, hidden: torch.Tensor, loss_of_logits: LogitsLoss, *extras: torch.Tensor,
                      rows: int | None = None) -> torch.Tensor:
    """Sum over chunks of `loss_of_logits(float32 logits of hidden[chunk], *[e[chunk] for e in extras])`.

    `hidden` [n, hidden] are final (normed) hidden states; each of `extras` has n rows (targets,
    weights per position, a teacher's logits...). Differentiable in `hidden` and in the head's
    weight and bias, with one chunk's logits in memory at a time (`rows` positions, default
    `chunk_positions`). `loss_of_logits` must be a sum over positions (a chunk's share of the total).
    """
    rows = rows or chunk_positions(head.vocab_size, hidden.device)
    return _ChunkedHeadLoss.apply(hidden, head.weight, head.bias, head.softcap, loss_of_logits, rows, *extras)


def _weighted_nll(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    nll = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
    return (nll * weights).sum()


def next_token_loss(head: OutputHead, hidden: torch.Tensor, labels: torch.Tensor, *, divide_by: float | None = None,
                    rows: int | None = None) -> torch.Tensor:
    """Next-token cross-entropy of `hidden` [batch, seq, hidden] against `labels` [batch, seq]
    (position t predicts labels[t + 1]; IGNORE_INDEX does not count): the sum over counted
    positions divided by `divide_by` (default: their number). Differentiable, chunked, float32."""
    targets = labels[:, 1:].reshape(-1)
    counted = targets != IGNORE_INDEX
    divide_by = float(counted.sum().clamp(min=1)) if divide_by is None else divide_by
    weights = counted.float() / divide_by
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return chunked_head_loss(head, flat, _weighted_nll, targets, weights, rows=rows)


@torch.no_grad()
def token_nll(head: OutputHead, hidden: torch.Tensor, targets: torch.Tensor, *, rows: int | None = None) -> torch.Tensor:
    """float32 negative log-likelihood [n] of `targets` [n] under the logits of `hidden` [n, hidden],
    chunk by chunk (0 where a target is IGNORE_INDEX). No gradients: perplexity, sensitivity."""
    rows = rows or chunk_positions(head.vocab_size, hidden.device)
    weight = _product_weight(head)
    out = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, len(targets), rows):
            chunk = slice(start, start + rows)
            out[chunk] = F.cross_entropy(_logits(hidden[chunk], weight, head.bias, head.softcap), targets[chunk],
                                         ignore_index=IGNORE_INDEX, reduction="none")
    return out


def loss_working_bytes(vocab_size: int, hidden_size: int, positions: int, *, dtype_bytes: int, gradients: bool,
                       device: str = "cpu") -> int:
    """Memory the chunked loss holds beyond the model's activations: a float32 copy of the head's
    weight on a CPU when the weights are not float32, one chunk's logits with their softmax and
    gradient (about four float32 buffers), and with gradients the float32 gradient of the hidden
    states of every position."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    rows = min(positions, chunk_positions(vocab_size, kind))
    weight_copy = vocab_size * hidden_size * 4 if kind == "cpu" and dtype_bytes != 4 else 0
    chunk = 4 * rows * vocab_size * 4
    return weight_copy + chunk + (positions * hidden_size * 4 if gradients else 0)
