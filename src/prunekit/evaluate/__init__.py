"""Evaluation of pruned models."""
from prunekit.evaluate.perplexity import PerplexityResult, Window, perplexity, plan_windows

__all__ = ["PerplexityResult", "Window", "perplexity", "plan_windows"]
