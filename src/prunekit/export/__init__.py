"""Export: Hugging Face directories (stock or with prunekit's modeling code) and llama.cpp GGUF files."""
from prunekit.export.files import OutputExistsError, atomic_directory, atomic_write_text
from prunekit.export.gguf import GGUFExport, GGUFExportError, export_gguf, write_gguf
from prunekit.export.huggingface import SavedModel, save_model

__all__ = ["GGUFExport", "GGUFExportError", "OutputExistsError", "SavedModel", "atomic_directory", "atomic_write_text",
           "export_gguf", "save_model", "write_gguf"]
