"""Export: Hugging Face directories (stock or with prunekit's modeling code)."""
from prunekit.export.files import OutputExistsError, atomic_directory, atomic_write_text
from prunekit.export.huggingface import SavedModel, save_model

__all__ = ["OutputExistsError", "SavedModel", "atomic_directory", "atomic_write_text", "save_model"]
