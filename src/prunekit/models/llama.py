"""Llama 1/2/3 (and SmolLM, TinyLlama, ...): GQA, SwiGLU, pre-norm."""
from prunekit.models.architecture import Architecture, register

LLAMA = register(Architecture(model_type="llama", config_requires_heads_divide_hidden=True))
