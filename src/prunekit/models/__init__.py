"""Model families (one file each), loading, and the structure of a model."""
from prunekit.models import gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3  # noqa: F401  (registration)
from prunekit.models import mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: F401  (registration: mixtures of experts)
from prunekit.models.architecture import (
    ARCHITECTURES,
    Architecture,
    UnsupportedModelError,
    architecture_for,
    register,
)

__all__ = ["ARCHITECTURES", "Architecture", "UnsupportedModelError", "architecture_for", "register"]
