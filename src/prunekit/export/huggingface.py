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

from torch import nn

from prunekit.export.files import atomic_directory
from prunekit.models.architecture import architecture_for
from prunekit.models.structure import model_structure
from prunekit.plan.plan import Plan

PROVENANCE_FILE = "prunekit.json"
MODELING_FILE = "modeling_prunekit.py"


@dataclass(frozen=True)
class SavedModel:
    path: Path
    format: str     # "stock" or "prunekit" (carries modeling code)
    params: int


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
) -> SavedModel:
    """Write `model` (safetensors), its tokenizer, generation config and a provenance record.

    The directory appears under its final name only when complete; an existing `out` is
    replaced only with `force`, and never when it overlaps a `protected` input path.
    """
    out = Path(out)
    arch = architecture_for(model.config.model_type)
    structure = model_structure(model)
    is_pruned_format = model.config.model_type.startswith("prunekit_")
    with atomic_directory(out, force=force, protected=protected) as tmp:
        if is_pruned_format:
            model.config.auto_map = {
                "AutoConfig": f"{MODELING_FILE[:-3]}.PrunekitConfig",
                "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.PrunekitForCausalLM",
            }
            (tmp / MODELING_FILE).write_text(_modeling_file_text(arch.model_type, arch.to_dict()), encoding="utf-8")
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        provenance = {
            "prunekit_format": 1,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_model": source,
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
    return SavedModel(out, provenance["format"], structure.total_params)


def provenance_plans(provenance: dict) -> list[dict]:
    """The plans that made a saved model, in order: each step's of a `--target` run, else the one plan."""
    steps = (provenance.get("pruning") or {}).get("steps") or []
    if steps:
        return [step["plan"] for step in steps]
    return [provenance["plan"]] if provenance.get("plan") else []
