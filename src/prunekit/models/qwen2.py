"""Qwen2 / Qwen2.5: Llama's layout with q/k/v biases (sliced with their rows)."""
from prunekit.models.architecture import Architecture, register

QWEN2 = register(Architecture(model_type="qwen2"))
