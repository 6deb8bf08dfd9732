"""SlimLLM's training-free repair: after a projection (o_proj, down_proj) loses input features,
each output dimension d is refit as a * (kept output)_d + b, the least-squares line through the
calibration tokens (the reference runs np.polyfit per dimension on the token outputs). The
moments it needs follow from the input features' mean and covariance, so no token is kept.

Beside prunekit's least-squares refit (`refit_kept_columns`): the line's weights diag(a) W_K are
one point of the space that refit searches (every [out, kept] matrix), so on the calibration data
the refit (with the bias, `augment_gram`) reconstructs at least as well; and the line needs a
bias on o_proj / down_proj, which only Llama's stock config can save (`BIAS_FLAGS`), where the
refit without a bias saves as a stock model in every family. Kept here as the paper's form, for
comparison; not a compensation setting.
"""
from __future__ import annotations

import torch


def scale_and_bias(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor,
                   bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(new weight [out, len(keep)], new bias [out]) of a projection `weight` [out, in] (with its
    `bias`, if any) that keeps the input features `keep`: each output dimension's kept part scaled
    and shifted to fit the full output best over the calibration tokens, whose input features
    have `mean` [in] and population `covariance` [in, in]."""
    w = weight.to(torch.float64)
    w_kept = w[:, keep]
    c = covariance.to(torch.float64)
    cross = ((w_kept @ c[keep]) * w).sum(1)                     # Cov(kept output, full output) per dimension
    own = ((w_kept @ c[keep][:, keep]) * w_kept).sum(1)         # Var(kept output)
    scale = torch.where(own > 0, cross / own.clamp_min(1e-300), torch.ones_like(own))
    mean = mean.to(torch.float64)
    shift = w @ mean - scale * (w_kept @ mean[keep])  # mean(full) - a * mean(kept part without the bias)
    if bias is not None:  # y = Wx + b0: the full output's mean carries b0, the scaled kept part does not
        shift = shift + bias.to(torch.float64)
    return scale[:, None] * w_kept, shift
