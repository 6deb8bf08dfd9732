"""Planning: from scores to a plan (plain JSON) of what to keep."""
from prunekit.plan.plan import (
    PLAN_FORMAT,
    KeptLayer,
    LayerPlan,
    Plan,
    PlanError,
    predicted_structure,
    resolve_plan,
    structure_signature,
)

__all__ = ["PLAN_FORMAT", "KeptLayer", "LayerPlan", "Plan", "PlanError", "predicted_structure", "resolve_plan",
           "structure_signature"]
