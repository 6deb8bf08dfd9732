"""Criteria: how important each prunable component is. Each criterion is one registered
function from a model (and calibration tokens) to Scores; `score_model` is the entry point."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.errors import PrunekitError
from prunekit.score.criteria import (
    activation_scores,
    block_influence_scores,
    fluctuation_scores,
    magnitude_scores,
    random_scores,
)
from prunekit.score.adapt_pruner import adapt_pruner_scores
from prunekit.score.experts import DEFAULT_MIN_TOKENS, frequency_scores, reap_scores
from prunekit.score.scores import ALL_KINDS, EXPERT_CHANNEL_KIND, KINDS, SCORE_KINDS, ScoreError, Scores
from prunekit.score.sensitivity import (DEFAULT_FINE_TOKENS, DEFAULT_SENSITIVITY_KINDS, SENSITIVITY_KINDS,
                                        sensitivity_scores)
from prunekit.score.slimllm import DEFAULT_PROTECT_LOWEST, HEAD_SEARCHES, slimllm_scores
from prunekit.score.statistics import LayerStats, collect_layer_stats
from prunekit.score.taylor import DEFAULT_TAYLOR_TOKENS, TAYLOR_VARIANTS, taylor_scores


class CriterionError(PrunekitError, ValueError):
    """An unknown criterion or option, caught before any model is loaded."""


@dataclass(frozen=True)
class Criterion:
    name: str
    compute: Callable[..., Scores]     # (model, input_ids, labels, stats, batch_size, progress, **options)
    kinds: tuple[str, ...]             # the kinds it scores
    needs_data: bool
    needs_stats: bool                  # uses the statistics of one calibration pass
    comparable: bool                   # all kinds in one unit (loss), so heads and channels can compete directly
    # name -> (type, default, allowed values or None); a tuple option takes a subset of its allowed values
    options: dict[str, tuple[type, object, tuple | None]] = field(default_factory=dict)
    description: str = ""
    needs_gradients: bool = False      # a backward pass: gradient memory the size of the weights
    # Its loss runs through every later layer and the output head, so it needs the whole model on
    # the device at once: it cannot run layer by layer.
    whole_model: bool = False

    def check_options(self, options: dict) -> dict:
        unknown = set(options) - set(self.options)
        if unknown:
            raise CriterionError(
                f"criterion {self.name!r} has no options {sorted(unknown)}; its options are {sorted(self.options) or 'none'}"
            )
        checked = {name: default for name, (_, default, _) in self.options.items()}
        for name, value in options.items():
            kind, _, allowed = self.options[name]
            if kind is tuple:
                value = tuple(value.split(",")) if isinstance(value, str) else tuple(value)
            elif kind is bool and isinstance(value, str):
                value = value.lower() in ("1", "true", "yes")
            else:
                try:
                    value = kind(value)
                except (TypeError, ValueError):
                    raise CriterionError(f"option {name} of {self.name} must be {kind.__name__}, got {value!r}") from None
                if kind is int and value < 0:
                    raise CriterionError(f"option {name} of {self.name} must not be negative, got {value}")
            outside = (set(value) if kind is tuple else {value}) - set(allowed or ()) if allowed else set()
            if outside:
                raise CriterionError(f"option {name} of {self.name} does not take {sorted(outside)}; "
                                     f"choose from {list(allowed)}")
            checked[name] = value
        return checked


CRITERIA: dict[str, Criterion] = {}


def register_criterion(criterion: Criterion) -> Criterion:
    if criterion.name in CRITERIA:
        raise ValueError(f"criterion {criterion.name!r} is registered twice")
    bad = set(criterion.kinds) - set(SCORE_KINDS)
    if bad:
        raise ValueError(f"criterion {criterion.name!r} names unknown kinds {sorted(bad)}")
    CRITERIA[criterion.name] = criterion
    return criterion


def get_criterion(name: str) -> Criterion:
    try:
        return CRITERIA[name]
    except KeyError:
        raise CriterionError(f"unknown criterion {name!r}; choose one of {sorted(CRITERIA)}") from None


register_criterion(Criterion(
    "magnitude", lambda model, ids, labels, stats, batch_size, progress: magnitude_scores(model),
    ALL_KINDS + (EXPERT_CHANNEL_KIND,), needs_data=False, needs_stats=False, comparable=False,
    description="L2 norm of each component's weights (baseline); channels inside routed experts and shared experts too"))
register_criterion(Criterion(
    "random", lambda model, ids, labels, stats, batch_size, progress, seed: random_scores(model, seed),
    ALL_KINDS + (EXPERT_CHANNEL_KIND,), needs_data=False, needs_stats=False, comparable=False, options={"seed": (int, 0, None)},
    description="uniform random scores (baseline)"))
register_criterion(Criterion(
    "activation", lambda model, ids, labels, stats, batch_size, progress: activation_scores(model, stats),
    ALL_KINDS, needs_data=True, needs_stats=True, comparable=False,
    description="|W| x input norm on the consuming projection (Wanda-sp, Minitron); hidden channels by the L2 "
                "norm of what the sublayers' input norms output (Minitron)"))
register_criterion(Criterion(
    "fluctuation", lambda model, ids, labels, stats, batch_size, progress: fluctuation_scores(model, stats),
    KINDS, needs_data=True, needs_stats=True, comparable=False,
    description="input-feature variance x squared weight column norm (FLAP)"))
register_criterion(Criterion(
    "block_influence",
    lambda model, ids, labels, stats, batch_size, progress, angular: block_influence_scores(stats, angular=angular),
    ("layer", "attention", "mlp"), needs_data=True, needs_stats=True, comparable=False,
    options={"angular": (bool, False, None)},
    description="1 - cos(x_in, x_out) of layers and sublayers (ShortGPT); angular distance with angular=true"))
register_criterion(Criterion(
    "taylor",
    lambda model, ids, labels, stats, batch_size, progress, variant, tokens, autocast: taylor_scores(
        model, ids, labels, variant=variant, batch_size=batch_size, progress=progress, tokens=tokens,
        autocast=autocast),
    ALL_KINDS, needs_data=True, needs_stats=False, comparable=True,
    options={"variant": (str, "element", TAYLOR_VARIANTS), "tokens": (int, DEFAULT_TAYLOR_TOKENS, None),
             "autocast": (bool, True, None)},
    description="first-order Taylor |w * dL/dw| (LLM-Pruner), element-wise or vector-wise", needs_gradients=True,
    whole_model=True))
register_criterion(Criterion(
    "sensitivity",
    lambda model, ids, labels, stats, batch_size, progress, kinds, channel_group_size, removals_per_pass, fine_tokens:
    sensitivity_scores(model, ids, labels, kinds=kinds, channel_group_size=channel_group_size, batch_size=batch_size,
                       removals_per_pass=removals_per_pass, fine_tokens=fine_tokens, progress=progress),
    SENSITIVITY_KINDS, needs_data=True, needs_stats=False, comparable=True,
    options={"kinds": (tuple, DEFAULT_SENSITIVITY_KINDS, SENSITIVITY_KINDS), "channel_group_size": (int, 64, None),
             "removals_per_pass": (int, 4, None), "fine_tokens": (int, DEFAULT_FINE_TOKENS, None)},
    description="measured loss increase when each component is removed alone", whole_model=True))
register_criterion(Criterion(
    "slimllm",
    lambda model, ids, labels, stats, batch_size, progress, head_search, protect_lowest: slimllm_scores(
        model, ids, batch_size=batch_size, progress=progress, head_search=head_search,
        protect_lowest_fraction=protect_lowest),
    ("kv_group", "head", "channel"), needs_data=True, needs_stats=False, comparable=False,
    options={"head_search": (str, "greedy", HEAD_SEARCHES), "protect_lowest": (float, DEFAULT_PROTECT_LOWEST, None)},
    description="SlimLLM: heads by how well the kept heads reproduce the attention output (greedy elimination), "
                "channels by norms weighted with the PCA of the FFN output; records layer cos for allocation slimllm"))
register_criterion(Criterion(
    "adapt_pruner",
    lambda model, ids, labels, stats, batch_size, progress, variant, tokens, autocast: adapt_pruner_scores(
        model, ids, labels, variant=variant, batch_size=batch_size, progress=progress, tokens=tokens,
        autocast=autocast),
    KINDS, needs_data=True, needs_stats=False, comparable=True,
    options={"variant": (str, "element", TAYLOR_VARIANTS), "tokens": (int, DEFAULT_TAYLOR_TOKENS, None),
             "autocast": (bool, True, None)},
    description="Adapt-Pruner: Taylor within layers plus each layer's cos(input, output) for allocation "
                "adapt_pruner", needs_gradients=True, whole_model=True))

register_criterion(Criterion(
    "reap",
    lambda model, ids, labels, stats, batch_size, progress, min_tokens: reap_scores(
        model, ids, batch_size=batch_size, progress=progress, min_tokens=min_tokens),
    ("expert", EXPERT_CHANNEL_KIND, "channel"), needs_data=True, needs_stats=False, comparable=False,
    options={"min_tokens": (int, DEFAULT_MIN_TOKENS, None)},
    description="REAP: routed experts by the mean over their routed tokens of gate value x expert output norm "
                "(mixtures of experts), channels inside them by gate value x |activation| x down column norm, "
                "channels of a shared expert (or dense MLP) the same with its sigmoid gate (or 1); "
                "warns about experts that got fewer than min_tokens tokens", whole_model=True))
register_criterion(Criterion(
    "frequency",
    lambda model, ids, labels, stats, batch_size, progress, min_tokens: frequency_scores(
        model, ids, batch_size=batch_size, progress=progress, min_tokens=min_tokens),
    ("expert",), needs_data=True, needs_stats=False, comparable=False,
    options={"min_tokens": (int, DEFAULT_MIN_TOKENS, None)},
    description="routed experts by the fraction of calibration tokens the router sends them (mixtures of experts)",
    whole_model=True))


def check_layer_by_layer(criterion: str) -> None:
    """Refuse a criterion that needs the whole model at once for layer-by-layer mode."""
    if get_criterion(criterion).whole_model:
        works = sorted(name for name, c in CRITERIA.items() if not c.whole_model)
        raise CriterionError(
            f"criterion {criterion!r} needs the whole model on the device at once (its loss runs through every later "
            f"layer and the output head), so it cannot run layer by layer; use one of {', '.join(works)}, or drop "
            f"--layer-by-layer"
        )


def score_model(model: nn.Module, criterion: str, input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                *, stats: list[LayerStats] | None = None, batch_size: int = 8, progress: bool = True,
                layer_by_layer: bool = False, device: torch.device | str | None = None, **options) -> Scores:
    """Score every prunable component of `model` with `criterion` (see CRITERIA).

    With `layer_by_layer`, the calibration statistics are collected with the model where it is
    (CPU memory) and one layer at a time on `device`; only criteria without `whole_model` can."""
    spec = get_criterion(criterion)
    checked = spec.check_options(options)
    if layer_by_layer:
        check_layer_by_layer(criterion)
    if spec.needs_data and input_ids is None:
        raise CriterionError(f"criterion {criterion!r} needs calibration data")
    if spec.needs_stats and stats is None:
        stats = collect_layer_stats(model, input_ids, batch_size=batch_size, progress=progress,
                                    layer_by_layer=layer_by_layer, device=device)
    scores = spec.compute(model, input_ids, labels, stats, batch_size, progress, **checked)
    if stats is not None:  # what the slimllm / adapt_pruner allocations read, free with any statistics pass
        scores.meta.setdefault("layer_cos", [st.mean_cos("layer") for st in stats])
    # Criteria compute where the weights are; the planner works on CPU float64 values.
    scores.values = {kind: [v.detach().to("cpu", torch.float64) for v in per_layer]
                     for kind, per_layer in scores.values.items()}
    scores.meta.setdefault("options", {k: list(v) if isinstance(v, tuple) else v for k, v in checked.items()})
    return scores


__all__ = ["CRITERIA", "Criterion", "CriterionError", "ScoreError", "Scores", "check_layer_by_layer",
           "collect_layer_stats", "get_criterion", "register_criterion", "score_model"]
