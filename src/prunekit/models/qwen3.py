"""Qwen3: per-head RMSNorm on queries and keys (q_norm/k_norm act on head_dim, so they are
shared by all heads and survive head pruning unchanged)."""
from prunekit.models.architecture import Architecture, register

QWEN3 = register(Architecture(model_type="qwen3"))
