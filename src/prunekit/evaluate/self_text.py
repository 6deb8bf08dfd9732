"""Perplexity on text the original model writes itself: the evaluation that needs no data set.

One protocol everywhere (the recipe's evaluate stage, the sweep, `auto` sources without a data
directory): 16 rows of 256 tokens sampled from the ORIGINAL model with seed 1234, kept apart from
any calibration or training text (those use other seeds), each row scored as one window.
"""
from __future__ import annotations

import torch
from torch import nn

from prunekit.data import SELF_SOURCE, calibration_tokens
from prunekit.evaluate.perplexity import perplexity

ROWS, SEQ_LEN, SEED = 16, 256, 1234
TOKENS = ROWS * SEQ_LEN
DESCRIPTION = f"held-out text sampled from the original model ({ROWS} x {SEQ_LEN} tokens, seed {SEED})"


def held_out_self_tokens(original: nn.Module, tokenizer) -> torch.Tensor:
    """The held-out rows [ROWS, SEQ_LEN], written by `original`."""
    return calibration_tokens(SELF_SOURCE, tokenizer, n_samples=ROWS, seq_len=SEQ_LEN, seed=SEED, model=original)


def self_perplexity(model: nn.Module, tokenizer, held_out: torch.Tensor) -> float:
    """Perplexity of `model` on the held-out rows, one window per row."""
    return perplexity(model, tokenizer, dataset=held_out.reshape(-1), seq_len=SEQ_LEN, progress=False).perplexity


__all__ = ["DESCRIPTION", "ROWS", "SEED", "SEQ_LEN", "TOKENS", "held_out_self_tokens", "self_perplexity"]
