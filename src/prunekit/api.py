"""One function per job, shared by the Python API and the CLI."""
from __future__ import annotations

from pathlib import Path

from prunekit.export.files import check_output_dir
from prunekit.export.huggingface import SavedModel, save_model
from prunekit.models.loading import load, load_skeleton, resolve_model_source
from prunekit.models.structure import model_structure
from prunekit.plan.plan import Plan, predicted_structure
from prunekit.prune.surgery import apply_plan


def prune_to_plan(model: str | Path, plan: Plan | str | Path, out: str | Path, *, force: bool = False,
                  dtype: str = "float32") -> SavedModel:
    """Load `model`, apply `plan`, save to `out`. Every check that can fail runs before the
    weights are loaded, except those that need the loaded model, which run before surgery."""
    source = resolve_model_source(model)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    check_output_dir(Path(out), force=force, protected=source.local_paths)
    predicted = predicted_structure(plan, model_structure(load_skeleton(source)))  # checks the plan, no weights read
    loaded, tokenizer = load(model, dtype=dtype)
    after = apply_plan(loaded, plan)
    assert after.total_params == predicted.total_params, "surgery and plan disagree on the parameter count"
    return save_model(loaded, tokenizer, out, plan=plan, source=str(model), protected=source.local_paths, force=force)
