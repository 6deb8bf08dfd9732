"""Recovery: buy back with training what pruning cost, with the original model as teacher.

`recover` (paths in, a saved model out) and `recover_loaded` (models in memory) share one plain
training loop (train.py); the losses are plain tensor functions (losses.py); the training rows
come from the calibration sources, prompt/response pairs, or text the teacher writes (data.py).
"""
from prunekit.recover.data import PAIR_SOURCES, RecoveryData, pack_pairs, recovery_rows
from prunekit.recover.run import check_teacher_fits, recover, teacher_layer_map
from prunekit.recover.train import (
    METHODS,
    Method,
    RecoveryError,
    RecoverySettings,
    held_out_perplexity,
    latest_checkpoint,
    learning_rate_at,
    recover_loaded,
)

__all__ = [
    "METHODS", "Method", "PAIR_SOURCES", "RecoveryData", "RecoveryError", "RecoverySettings", "check_teacher_fits",
    "held_out_perplexity", "latest_checkpoint", "learning_rate_at", "pack_pairs", "recover", "recover_loaded",
    "recovery_rows", "teacher_layer_map",
]
