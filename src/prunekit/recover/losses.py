"""The losses of recovery training, as plain tensor functions.

Every function takes logits or hidden states of shape [batch, seq, ...] and a boolean `mask`
[batch, seq] of the positions that count (labels that are not IGNORE_INDEX), and returns the
mean over those positions. Logits are promoted to fp32 before any softmax.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; `labels` and `mask` are already shifted (position t predicts labels[t])."""
    per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.clamp(min=0).flatten(), reduction="none")
    return _masked_mean(per_token.view(labels.shape), mask)


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, times T² (Hinton et al.), so that
    gradients keep their scale as T changes."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def top_k_logits(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest teacher logits per position and their vocabulary indices: what a cache keeps."""
    values, indices = teacher_logits.float().topk(k, dim=-1)
    return values, indices.to(torch.int32)


def kl_divergence_top_k(student_logits: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor,
                        mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL from a cached top-k teacher: the teacher distribution renormalised over its k best
    tokens, against the student's full-vocabulary log-probabilities at those tokens. Equals
    `kl_divergence` when k is the whole vocabulary."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_indices.long())
    teacher = F.log_softmax(teacher_values.float() / temperature, dim=-1)
    per_token = (teacher.exp() * (teacher - student)).sum(-1)
    return _masked_mean(per_token, mask) * temperature**2


def hidden_state_distance(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """Squared error between hidden states, relative to the teacher's mean squared norm, so that
    layers whose residual stream grows large do not dominate."""
    error = (student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1)
    scale = _masked_mean(teacher_hidden.float().pow(2).mean(-1), mask).clamp(min=1e-12)
    return _masked_mean(error, mask) / scale
