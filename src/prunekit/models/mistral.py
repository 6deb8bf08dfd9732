"""Mistral: Llama's layout; an optional sliding window that applies to every layer."""
from prunekit.models.architecture import Architecture, register

MISTRAL = register(Architecture(model_type="mistral"))
