"""Save a (pruned) model as a Hugging Face directory.

Uniform models are saved as the stock family (`AutoModelForCausalLM.from_pretrained(path)`
loads them without prunekit). Models whose layers differ carry prunekit's modeling file and
an `auto_map`, so `from_pretrained(path, trust_remote_code=True)` loads them without prunekit
and `prunekit.load(path)` loads them without running the directory's code.
"""
from __future__ import annotations

import datetime
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.export.files import atomic_directory
from prunekit.export.model_card import PROVENANCE_FILE, base_model_id, provenance_plans, write_model_card
from prunekit.models.architecture import architecture_for
from prunekit.models.loading import TORCH_DTYPES, ModelLoadError, cast_copy, gguf_file_type, source_bytes, source_dtype
from prunekit.models.structure import model_structure
from prunekit.plan.plan import Plan

MODELING_FILE = "modeling_prunekit.py"
SOURCE_DTYPE = "source"  # --save-dtype's default: the dtype the source declares
SAVE_DTYPES = (SOURCE_DTYPE, *TORCH_DTYPES)
# A GGUF source's file type -> the `prunekit export --quant` that writes the pruned model in the same
# (or the nearest smaller) form; the 4-bit types and those between 4 and 8 bits get q4_k_m.
EXPORT_QUANT_FOR_GGUF = {"F32": "f16", "F16": "f16", "BF16": "f16", "Q8_0": "q8_0"}
EXPORT_QUANT_DEFAULT = "q4_k_m"


class SaveDtypeError(PrunekitError, ValueError):
    """A save dtype that is not one of SAVE_DTYPES."""


def parse_save_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    """--save-dtype as a dtype; None for "source" (the dtype the source declares)."""
    if value is None or value == SOURCE_DTYPE:
        return None
    if isinstance(value, torch.dtype):
        if value not in TORCH_DTYPES.values():
            raise SaveDtypeError(f"save dtype {value} is not floating point; choose one of {', '.join(SAVE_DTYPES)}")
        return value
    if value not in TORCH_DTYPES:
        raise SaveDtypeError(f"unknown save dtype {value!r}; choose one of {', '.join(SAVE_DTYPES)}")
    return TORCH_DTYPES[value]


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


@dataclass(frozen=True)
class SavedModel:
    path: Path
    format: str     # "stock" or "prunekit" (carries modeling code)
    params: int
    dtype: str = "float32"
    bytes: int = 0                      # the directory's files on disk
    source_bytes: int | None = None     # the source's weight files, where they are local
    source_quant: str | None = None     # a GGUF source's file type (Q4_1, Q8_0, ...)

    def export_command(self) -> str | None:
        """The command that writes this model as GGUF in its quantized source's form; None otherwise."""
        if self.source_quant is None:
            return None
        quant = EXPORT_QUANT_FOR_GGUF.get(self.source_quant, EXPORT_QUANT_DEFAULT)
        return f"prunekit export {self.path} --format gguf --quant {quant} --out {self.path}.{quant}.gguf"

    def summary(self) -> str:
        """What was saved and its size on disk beside the source's; for a quantized GGUF source, the
        command that gives a file in the source's form."""
        text = (f"saved {self.format} model with {self.params:,} parameters ({self.dtype}) to {self.path}: "
                f"{_mib(self.bytes)} on disk")
        if self.source_bytes is not None:
            form = f", {self.source_quant} GGUF" if self.source_quant else ""
            text += f" (source: {_mib(self.source_bytes)}{form})"
        command = self.export_command()
        if command is not None and self.source_quant not in ("F32", "F16", "BF16"):
            text += (f"\nthe source is {self.source_quant}-quantized, so a {self.dtype} directory is larger than it; "
                     f"for a file in its quantized form: {command}")
        return text


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("prunekit", "torch", "transformers", "safetensors"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _modeling_file_text(base_model_type: str, architecture: dict) -> str:
    """prunekit's modeling module with the family constants filled in."""
    source = (Path(__file__).resolve().parents[1] / "models" / MODELING_FILE).read_text(encoding="utf-8")
    filled = source.replace(
        "BASE_MODEL_TYPE: str | None = None", f"BASE_MODEL_TYPE: str | None = {base_model_type!r}", 1
    ).replace("ARCHITECTURE: dict | None = None", f"ARCHITECTURE: dict | None = {architecture!r}", 1)
    assert filled != source, "modeling_prunekit.py lost its constants"
    return filled


def save_model(
    model: nn.Module,
    tokenizer,
    out: str | Path,
    *,
    plan: Plan | None = None,
    source: str | None = None,
    protected: tuple[Path, ...] = (),
    force: bool = False,
    extra_provenance: dict | None = None,
    save_dtype: str | torch.dtype | None = None,
) -> SavedModel:
    """Write `model` (safetensors), its tokenizer, generation config, a provenance record and a
    model card (README.md, see `prunekit.export.model_card`).

    The weights are written in `save_dtype` (a name of SAVE_DTYPES or a torch dtype); by default in
    the dtype that `source` declares (bfloat16 for a GGUF file), else in the model's own. A copy is
    cast for the writing, one tensor at a time; `model` is left as it is. The directory appears under
    its final name only when complete; an existing `out` is replaced only with `force`, and never
    when it overlaps a `protected` input path.
    """
    out = Path(out)
    arch = architecture_for(model.config.model_type)
    structure = model_structure(model)
    is_pruned_format = model.config.model_type.startswith("prunekit_")
    dtype = parse_save_dtype(save_dtype) or _declared_dtype(source) or _model_dtype(model)
    to_write = model if _model_dtype(model) == dtype else cast_copy(model, dtype)
    base_model = base_model_id(source)
    with atomic_directory(out, force=force, protected=protected) as tmp:
        if is_pruned_format:
            model.config.auto_map = {
                "AutoConfig": f"{MODELING_FILE[:-3]}.PrunekitConfig",
                "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.PrunekitForCausalLM",
            }
            (tmp / MODELING_FILE).write_text(_modeling_file_text(arch.model_type, arch.to_dict()), encoding="utf-8")
        # A model loaded from a checkpoint reverts the loader's renamings on save (MoE experts go back
        # to one tensor per expert); remote code skips those renamings on load, so prunekit's format
        # keeps the names the modules have.
        to_write.save_pretrained(tmp, safe_serialization=True, **({"save_original_format": False} if is_pruned_format else {}))
        if is_pruned_format:
            _declare_family_model_type(tmp / "config.json", arch.model_type)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        provenance = {
            "prunekit_format": 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_model": source,
            "base_model": base_model,
            "dtype": str(dtype).removeprefix("torch."),
            "format": "prunekit" if is_pruned_format else "stock",
            "load_with": (
                "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) or prunekit.load(path)"
                if is_pruned_format else "AutoModelForCausalLM.from_pretrained(path)"
            ),
            "params": {"total": structure.total_params, "non_embedding": structure.non_embedding_params},
            "plan": plan.to_dict() if plan is not None else None,
            "versions": versions(),
            **(extra_provenance or {}),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n", encoding="utf-8")
        write_model_card(tmp, provenance, structure, name=out.name)
    del to_write
    return SavedModel(out, provenance["format"], structure.total_params, provenance["dtype"], directory_bytes(out),
                      *_source_size_and_form(source))


def _declare_family_model_type(config_file: Path, family: str) -> None:
    """Write the family's model_type (e.g. "llama") where the in-memory config says "prunekit_llama".

    transformers knows that model_type without remote code, so a bare
    `AutoTokenizer.from_pretrained(path)` does not stop at a trust_remote_code prompt; `auto_map`
    and `layer_shapes` still mark the directory as prunekit's format for the model classes.
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["model_type"] = family
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def directory_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _declared_dtype(source: str | None) -> torch.dtype | None:
    """The dtype `source` declares; None where it declares none or cannot be read now (a Hub id offline)."""
    if not source:
        return None
    try:
        return source_dtype(source)
    except (ModelLoadError, OSError, ValueError):
        return None


def _source_size_and_form(source: str | None) -> tuple[int | None, str | None]:
    if not source:
        return None, None
    try:
        return source_bytes(source), gguf_file_type(source)
    except (ModelLoadError, OSError, ValueError):
        return None, None


__all__ = ["PROVENANCE_FILE", "SAVE_DTYPES", "SaveDtypeError", "SavedModel", "parse_save_dtype", "provenance_plans",
           "save_model", "versions"]
