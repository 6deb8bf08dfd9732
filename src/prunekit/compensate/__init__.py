"""Training-free compensation: refit what a pruned sublayer keeps so that it reproduces the
original sublayer's output on calibration data. Runs on the unpruned model, before surgery:

    stats = collect_layer_stats(model, ids, with_gram=True)
    report = compensate(model, plan, stats)       # refits o_proj / down_proj columns in place
    apply_plan(model, plan)                        # then cuts the removed columns

`compensate_sequential(model, plan, ids)` refits layer by layer on the inputs that the model,
pruned up to that layer, actually sees. `select_and_update(model, plan, ids)` (structured OBS)
also re-picks which units of each layer go, keeping the plan's widths, and returns the revised
plan. After the cut, `reconstruct_blocks` trains each pruned layer toward the dense one.
"""
from prunekit.compensate.bias import BIAS_FLAGS, CompensationError, mean_replacement_bias
from prunekit.compensate.least_squares import (
    DEFAULT_RIDGE,
    CompensationReport,
    ProjectionFit,
    augment_gram,
    compensate,
    reconstruction_error,
    refit_kept_columns,
)
from prunekit.compensate.obs import select_and_update
from prunekit.compensate.reconstruct import dense_layer_copies, reconstruct_blocks
from prunekit.compensate.sequential import compensate_sequential

__all__ = ["BIAS_FLAGS", "DEFAULT_RIDGE", "CompensationError", "CompensationReport", "ProjectionFit", "augment_gram",
           "compensate", "compensate_sequential", "dense_layer_copies", "mean_replacement_bias", "reconstruct_blocks",
           "reconstruction_error", "refit_kept_columns", "select_and_update"]
