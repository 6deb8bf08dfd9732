"""The losses of recovery training, as plain tensor functions.

The `weighted_*` functions take the logits of a chunk of positions [n, vocab] and a weight per
position [n] (1 / the number of counted positions, 0 where a label is IGNORE_INDEX) and return
the weighted sum: the chunk's share of the mean, what prunekit.models.loss.chunked_head_loss adds
up without ever holding the logits of the whole batch. The others take [batch, seq, ...] tensors
and a boolean `mask` [batch, seq] of the positions that count, and return the mean over them.
Logits are promoted to fp32 before any softmax.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def per_position_weights(mask: torch.Tensor) -> torch.Tensor:
    """1 / the number of counted positions where `mask` is set, 0 elsewhere: the weights that make
    the `weighted_*` sums the mean over the counted positions."""
    return mask.float() / mask.sum().clamp(min=1)


def weighted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum of weights x next-token cross-entropy; `labels` are already shifted (position t predicts labels[t])."""
    per_token = F.cross_entropy(logits.float(), labels.clamp(min=0), reduction="none")
    return (per_token * weights).sum()


def weighted_kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor,
                           temperature: float = 1.0) -> torch.Tensor:
    """sum of weights x KL(teacher || student) of the softened distributions, times T² (Hinton et
    al.), so that gradients keep their scale as T changes."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return (per_token * weights).sum() * temperature**2


def weighted_kl_divergence_top_k(student_logits: torch.Tensor, teacher_values: torch.Tensor,
                                 teacher_indices: torch.Tensor, weights: torch.Tensor,
                                 temperature: float = 1.0) -> torch.Tensor:
    """`kl_divergence_top_k` of a chunk, as a weighted sum (see the module docstring)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices.long())
    teacher = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return (per_token * weights).sum() * temperature**2


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; `labels` and `mask` are already shifted (position t predicts labels[t])."""
    return weighted_cross_entropy(logits.flatten(0, 1), labels.flatten(), per_position_weights(mask).flatten())


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, times T² (Hinton et al.), so that
    gradients keep their scale as T changes."""
    return weighted_kl_divergence(student_logits.flatten(0, 1), teacher_logits.flatten(0, 1),
                                  per_position_weights(mask).flatten(), temperature)


def top_k_logits(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest teacher logits per position and their vocabulary indices: what a cache keeps."""
    values, indices = teacher_logits.float().topk(k, dim=-1)
    return values, indices.to(torch.int32)


def kl_divergence_top_k(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                        mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL from a cached top-k teacher: the teacher distribution renormalised over its k best
    tokens, against the student's full-vocabulary log-probabilities at those tokens. Equals
    `kl_divergence` when k is the whole vocabulary."""
    return weighted_kl_divergence_top_k(student_logits.flatten(0, 1), teacher_values.flatten(0, 1),
                                        teacher_indices.flatten(0, 1), per_position_weights(mask).flatten(),
                                        temperature)


def hidden_state_distance(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Squared error between hidden states, relative to the teacher's mean squared norm, so that
    layers whose residual stream grows large do not dominate."""
    error = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    scale = _masked_mean(teacher_hidden.float().pow(2).mean(-1), mask).clamp(min=1e-12)
    return _masked_mean(error, mask) / scale
