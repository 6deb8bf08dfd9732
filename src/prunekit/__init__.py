"""prunekit: structured pruning of transformer language models into smaller dense models.

    import prunekit
    model, tokenizer = prunekit.load("smollm2-135m")
    print(prunekit.model_structure(model).to_dict()["params"])
    plan = prunekit.Plan.load("plan.json")
    prunekit.apply_plan(model, plan)                       # physical surgery, in place
    prunekit.save_model(model, tokenizer, "out/pruned", plan=plan)

    # or the whole job: score, plan, compensate, cut, save (what `prunekit prune` runs)
    prunekit.prune("smollm2-135m", "out/pruned", prunekit.PruneSettings(target=0.3))
    prunekit.recover("out/pruned", "out/recovered", prunekit.RecoverySettings(), teacher="smollm2-135m")

    # or a recipe: every stage, resumable
    prunekit.run("recipes/demo.yaml", "runs/demo")
"""
from prunekit.errors import PrunekitError
from prunekit.export import OutputExistsError, SavedModel, save_model
from prunekit.export.gguf import GGUFExport, GGUFExportError, export_gguf
from prunekit.models import ARCHITECTURES, Architecture, UnsupportedModelError, architecture_for, register
from prunekit.models.loading import DEFAULT_MODEL, ModelLoadError, load
from prunekit.models.structure import LayerShape, ModelStructure, model_structure
from prunekit.plan import LayerPlan, Plan, PlanError, predicted_structure
from prunekit.prune import apply_plan
from prunekit.pipeline import (CalibrationSettings, PruneSettings, analyze, prune, prune_loaded, prune_to_plan,
                               prune_to_target)
from prunekit.preflight import Machine, Preflight
from prunekit.plan.planner import PlannerSettings, make_plan
from prunekit.score import CRITERIA, Scores, score_model
from prunekit.compensate import compensate, compensate_sequential
from prunekit.recover import RecoverySettings, recover, recover_loaded
from prunekit.runner import Recipe, load_recipe, preflight, run

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "CRITERIA", "Architecture", "CalibrationSettings", "DEFAULT_MODEL", "LayerPlan", "LayerShape",
    "Machine", "ModelLoadError", "ModelStructure", "OutputExistsError", "Preflight", "PrunekitError", "Plan", "PlanError", "PlannerSettings", "PruneSettings",
    "SavedModel", "Scores", "UnsupportedModelError", "analyze", "apply_plan", "architecture_for", "compensate",
    "compensate_sequential", "load", "make_plan", "model_structure", "predicted_structure", "preflight", "prune", "prune_loaded",
    "prune_to_plan", "prune_to_target", "Recipe", "RecoverySettings", "load_recipe", "recover", "recover_loaded",
    "register", "run", "save_model", "score_model",
    "GGUFExport", "GGUFExportError", "export_gguf",
]
