"""prunekit: structured pruning of transformer language models into smaller dense models.

    import prunekit
    model, tokenizer = prunekit.load("smollm2-135m")
    print(prunekit.model_structure(model).to_dict()["params"])
    plan = prunekit.Plan.load("plan.json")
    prunekit.apply_plan(model, plan)                       # physical surgery, in place
    prunekit.save_model(model, tokenizer, "out/pruned", plan=plan)
"""
from prunekit.export import OutputExistsError, SavedModel, save_model
from prunekit.models import ARCHITECTURES, Architecture, UnsupportedModelError, architecture_for, register
from prunekit.models.loading import DEFAULT_MODEL, ModelLoadError, load
from prunekit.models.structure import LayerShape, ModelStructure, model_structure
from prunekit.plan import LayerPlan, Plan, PlanError, predicted_structure
from prunekit.prune import apply_plan

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES", "Architecture", "DEFAULT_MODEL", "LayerPlan", "LayerShape", "ModelLoadError", "ModelStructure",
    "OutputExistsError", "Plan", "PlanError", "SavedModel", "UnsupportedModelError", "apply_plan",
    "architecture_for", "load", "model_structure", "predicted_structure", "register", "save_model",
]
