"""Prune and recover in rounds (Adapt-Pruner's interleaved schedule): a recipe's `schedule`.

    stages: [prune, recover, evaluate, report]
    prune: {target: 0.2, criterion: adapt_pruner, allocation: adapt_pruner}
    recover: {method: distill, tokens: 64000}
    schedule: {rounds: 4}

The runner expands prune and recover into prune@1, recover@1, ..., prune@4, recover@4. Round k
prunes the model that round k-1 recovered (round 1: the recipe's model) until it has lost its
cumulative target of the ORIGINAL model's basis (`schedule.targets`, by default k/rounds of
prune.target), then recovers it on recover.tokens / rounds tokens (recover.tokens is the budget
of all the rounds together, as in a one-shot recipe), distilled from the original (or the
recipe's teacher) on rows drawn with data seed + k - 1, so that every round sees other rows.

    run_dir/rounds/<k>/model       round k's pruned model
    run_dir/rounds/<k>/recovered   round k's recovered model (the next round's input)
    run_dir/recovered              hard links to the last round's recovered model: the final model
    run_dir/records/prune@<k>.json, recover@<k>.json

Each round's plan is relative to the round's input (the planner counts against the model it is
given), so its target is converted: `round_target`. Every saved model's prunekit.json carries the
cumulative record: `pruning.steps` lists every step of every round in order (each plan relative to
the model before it, as for `prune --steps`), `pruning.removed` and `params` count against the
original, and `pruning.rounds` lists each round's target, input, own removal and recovery.
"""
from __future__ import annotations

import dataclasses
import json
from functools import partial
from pathlib import Path

from prunekit.export.files import atomic_directory, atomic_write_text
from prunekit.export.huggingface import PROVENANCE_FILE
from prunekit.models.loading import load_skeleton, resolve_model_source
from prunekit.models.structure import ModelStructure, model_structure
from prunekit.pipeline import PruneSettings, preflight_prune, prune, unit_counts
from prunekit.plan.plan import surviving_layers
from prunekit.plan.planner import BASES, basis_value, removed_fraction, unit_totals
from prunekit.preflight import Preflight
from prunekit.recover.train import RecoverySettings
from prunekit.runner.recipe import Recipe, RecipeError, ScheduleSettings
from prunekit.runner.stages import Context, Stage, _preflight_recover, link_tree

ROUNDS_DIR = "rounds"


# ----------------------------------------------------------------------------- each round's settings


def round_target(cumulative: float, original_basis: float, input_basis: float) -> float:
    """The fraction of its input a round removes so that the model ends with `cumulative` of the
    ORIGINAL basis removed: the planner counts a target against the model it is given."""
    return 1 - (1 - cumulative) * original_basis / input_basis


def round_limits(limits: dict[str, float], original: ModelStructure, current: ModelStructure) -> dict[str, float]:
    """Limits on the original's units (at most this fraction of its heads, ...) as fractions of the
    units the round's input still has."""
    before, now = unit_totals(original), unit_totals(current)
    return {kind: min(1.0, max(0.0, 1 - (1 - limit) * before[kind] / now[kind])) if now[kind] else 0.0
            for kind, limit in limits.items()}


def round_protected_layers(protect: tuple[int, ...], survivors: list[int] | None) -> tuple[int, ...]:
    """The original's layer indices as indices of the round's input (earlier rounds may have dropped layers)."""
    if survivors is None:
        return tuple(protect)
    return tuple(survivors.index(i) for i in protect if i in survivors)


def round_prune_settings(prune: PruneSettings, schedule: ScheduleSettings, k: int, original: ModelStructure,
                         current: ModelStructure, survivors: list[int] | None = None) -> PruneSettings:
    """Round k's prune settings for its input `current`: the target, limits and protected layers of
    the recipe, which count against the original, converted to count against the input."""
    cumulative = schedule.cumulative_targets(prune.target)[k - 1]
    target = round_target(cumulative, basis_value(original, prune.basis), basis_value(current, prune.basis))
    if target <= 0:
        done = removed_fraction(original, current, prune.basis)
        raise RecipeError(f"round {k} would remove nothing: the rounds before it already removed {done:.1%} of the "
                          f"original's {prune.basis}, past round {k}'s cumulative target of {cumulative:.1%}; use fewer "
                          "rounds, or a smaller ffn_multiple so that each round can cut closer to its target")
    return dataclasses.replace(prune, target=target, limits=round_limits(prune.limits, original, current),
                               protect_layers=round_protected_layers(prune.protect_layers, survivors))


def round_recover_settings(recover: RecoverySettings, schedule: ScheduleSettings, k: int) -> RecoverySettings:
    """Round k trains on its share of the tokens, on rows drawn with its own seed."""
    return dataclasses.replace(recover, tokens=schedule.round_tokens(recover.tokens),
                               data=dataclasses.replace(recover.data, seed=recover.data.seed + k - 1))


# ----------------------------------------------------------------------------- provenance


def cumulative_pruning(earlier: dict | None, this_round: dict, *, k: int, cumulative_target: float,
                       settings: PruneSettings, source: str, original: ModelStructure,
                       final: ModelStructure) -> dict:
    """The pruning record of the model after round k: every step of every round so far, and the
    removal against the original. `earlier` is the record of round k-1's model (None in round 1),
    `this_round` what the prune of round k recorded against its own input."""
    steps = list((earlier or {}).get("steps") or []) + [{**step, "round": k} for step in this_round["steps"]]
    rounds = list((earlier or {}).get("rounds") or []) + [{
        "round": k, "input": source, "cumulative_target": cumulative_target, "target": this_round["settings"]["target"],
        "removed": this_round["removed"], "seconds": round(sum(s["seconds"] for s in this_round["steps"]), 1),
        "memory": this_round.get("memory"),
    }]
    return {
        "settings": {**settings.to_dict(), "target": cumulative_target},
        "steps": steps, "rounds": rounds,
        "removed": {b: round(removed_fraction(original, final, b), 6) for b in BASES},
        "params": {"before": original.total_params, "after": final.total_params,
                   "non_embedding_before": original.non_embedding_params,
                   "non_embedding_after": final.non_embedding_params},
        "units": {"before": unit_counts(original), "after": unit_counts(final)},
    }


def read_provenance(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / PROVENANCE_FILE).read_text(encoding="utf-8"))


def rewrite_provenance(model_dir: Path, provenance: dict) -> None:
    """Replace a saved model's prunekit.json (and the card made from it)."""
    from prunekit.export.model_card import skeleton_structure, write_model_card

    atomic_write_text(Path(model_dir) / PROVENANCE_FILE, json.dumps(provenance, indent=1) + "\n")
    write_model_card(Path(model_dir), provenance, skeleton_structure(model_dir), name=Path(model_dir).name)


# ----------------------------------------------------------------------------- the round stages


def round_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / ROUNDS_DIR / str(k)


def round_input(recipe: Recipe, run_dir: Path, k: int) -> str:
    return recipe.model if k == 1 else str(round_dir(run_dir, k - 1) / "recovered")


def _structure(spec: str | Path) -> ModelStructure:
    return model_structure(load_skeleton(resolve_model_source(spec)))


def _preflight_prune_round(k: int, context: Context) -> Preflight:
    """Round k's prune, on the shape the rounds before it leave (context.leaves)."""
    recipe = context.recipe
    cumulative = recipe.schedule.cumulative_targets(recipe.prune.target)[k - 1]
    settings = round_prune_settings(recipe.prune, recipe.schedule, k, context.structure, context.leaves)
    preflight = preflight_prune(resolve_model_source(recipe.model), settings, recipe.dtype, structure=context.leaves)
    return dataclasses.replace(preflight, stage=f"prune@{k}",
                               what=f"round {k} ({cumulative:.1%} of the original's {settings.basis} in all): "
                                    f"{preflight.what} of its input")


def _run_prune_round(k: int, recipe: Recipe, run_dir: Path) -> dict:
    source = round_input(recipe, run_dir, k)
    original, current = _structure(recipe.model), _structure(source)
    before = read_provenance(Path(source)) if k > 1 else {}
    earlier = before.get("pruning")
    survivors = surviving_layers([s["plan"] for s in (earlier or {}).get("steps") or []], original.num_layers)
    settings = round_prune_settings(recipe.prune, recipe.schedule, k, original, current, survivors)
    out = round_dir(run_dir, k) / "model"
    prune(source, out, settings, force=True, dtype=recipe.dtype)
    provenance = read_provenance(out)
    cumulative = recipe.schedule.cumulative_targets(recipe.prune.target)[k - 1]
    pruning = cumulative_pruning(earlier, provenance["pruning"], k=k, cumulative_target=cumulative,
                                 settings=recipe.prune, source=source, original=original, final=_structure(out))
    provenance.update(pruning=pruning, plan=provenance["plan"] if len(pruning["steps"]) == 1 else None,
                      source_model=before.get("source_model") or provenance["source_model"],
                      base_model=before.get("base_model", provenance.get("base_model")))
    rewrite_provenance(out, provenance)
    return {"round": k, "target": round(settings.target, 6), "cumulative_target": cumulative,
            "removed": pruning["removed"], "params": pruning["params"]}


def _preflight_recover_round(k: int, context: Context) -> Preflight:
    recipe = context.recipe
    settings = round_recover_settings(recipe.recover, recipe.schedule, k)
    preflight = _preflight_recover(dataclasses.replace(context, recipe=dataclasses.replace(recipe, recover=settings)))
    return dataclasses.replace(preflight, stage=f"recover@{k}", what=f"round {k}: {preflight.what}")


def _run_recover_round(k: int, recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.recover import recover

    folder = round_dir(run_dir, k)
    settings = round_recover_settings(recipe.recover, recipe.schedule, k)
    saved = recover(folder / "model", folder / "recovered", settings, teacher=recipe.teacher or recipe.model,
                    resume=True, force=True, dtype=recipe.dtype)
    provenance = read_provenance(saved.path)
    record = provenance["recovery"]
    provenance["pruning"]["rounds"][-1]["recovery"] = {
        "tokens": record["tokens"], "data_seed": settings.data.seed, "held_out_perplexity": record["eval"],
        "tokens_per_second": record["tokens_per_second"]}
    rewrite_provenance(saved.path, provenance)
    if k == recipe.schedule.rounds:  # the run's final model, where evaluate, bench, export and report look
        with atomic_directory(Path(run_dir) / "recovered", force=True) as tmp:
            link_tree(saved.path, tmp)
    return {"round": k, "held_out_perplexity": record["eval"], "tokens": record["tokens"],
            "tokens_per_second": record["tokens_per_second"]}


def round_stages(recipe: Recipe) -> list[Stage]:
    """prune@1, recover@1, ..., prune@N, recover@N: the stages a schedule puts where prune and recover were."""
    rounds = recipe.schedule.rounds
    stages = []
    for k in range(1, rounds + 1):
        label = f" (round {k} of {rounds})"
        stages.append(Stage(f"prune@{k}", ("model", "dtype", "prune", "schedule"),
                            partial(_preflight_prune_round, k), partial(_run_prune_round, k), label=label))
        stages.append(Stage(f"recover@{k}", ("model", "dtype", "prune", "recover", "teacher", "schedule"),
                            partial(_preflight_recover_round, k), partial(_run_recover_round, k), label=label))
    return stages


__all__ = ["ROUNDS_DIR", "cumulative_pruning", "round_dir", "round_limits", "round_protected_layers",
           "round_prune_settings", "round_recover_settings", "round_stages", "round_target"]
