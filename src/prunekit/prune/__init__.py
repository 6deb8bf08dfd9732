"""Surgery: execute a plan, physically."""
from prunekit.prune.surgery import apply_plan

__all__ = ["apply_plan"]
