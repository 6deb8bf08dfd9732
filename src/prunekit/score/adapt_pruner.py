"""Adapt-Pruner's scores (Pan et al., 2025; reference code research4pan/AdaptPruner): first-order
Taylor importance within each layer, as LLM-Pruner's, plus what its layer-wise sparsity rule
reads, each decoder layer's mean cos(input, output) over the calibration tokens (meta["layer_cos"],
used by the `adapt_pruner` allocation)."""
from __future__ import annotations

import torch
from torch import nn

from prunekit.score.scores import Scores
from prunekit.score.statistics import collect_layer_stats
from prunekit.score.taylor import taylor_scores


def adapt_pruner_scores(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor | None, *, variant: str,
                        batch_size: int, progress: bool, tokens: int, autocast: bool) -> Scores:
    scores = taylor_scores(model, input_ids, labels, variant=variant, batch_size=batch_size, progress=progress,
                           tokens=tokens, autocast=autocast)
    stats = collect_layer_stats(model, input_ids, batch_size=batch_size, progress=progress)
    return Scores("adapt_pruner", scores.values,
                  {**scores.meta, "layer_cos": [st.mean_cos("layer") for st in stats]})
