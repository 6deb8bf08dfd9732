"""The pruning pipeline as plain functions: calibrate -> score -> plan -> compensate -> cut.

`prune_to_target` is what `prunekit prune --target` runs; `analyze` is `prunekit analyze`.
Every setting is validated before a model is loaded.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from prunekit.compensate import compensate, compensate_sequential
from prunekit.compensate.hidden import refit_hidden_readers
from prunekit.compensate.obs import select_and_update
from prunekit.compensate.reconstruct import DEFAULT_LR, check_reconstruction, dense_layer_copies, reconstruct_blocks
from prunekit.compensate.replaceme import check_replaceable, replace_dropped_layers
from prunekit.data import NAMED_SOURCES, SELF_SOURCE, DataError, calibration_tokens, load_pairs, task_tokens
from prunekit.data.sources import resolve_source
from prunekit.export.files import atomic_directory, check_output_dir
from prunekit.export.huggingface import PROVENANCE_FILE, SavedModel, save_model
from prunekit.models.architecture import architecture_for
from prunekit.models.loading import (ModelSource, check_device, check_finite_weights, load, load_config, load_skeleton,
                                     resolve_model_source)
from prunekit.models.memory import (BYTES, MemoryEstimate, PeakMemory, describe_peak, layer_by_layer_estimate,
                                    pruning_estimate, weights_estimate)
from prunekit.models.structure import ModelStructure, format_count, model_structure
from prunekit.plan.plan import Plan, PlanError, predicted_structure, surviving_layers
from prunekit.plan.planner import (PlannerSettings, basis_value, check_reachable, make_plan, removed_fraction,
                                   shape_only_plan)
from prunekit.preflight import Machine, Need, Preflight
from prunekit.plan.search import SearchSettings
from prunekit.prune.allocation_search import search_allocation, search_memory_parts
from prunekit.prune.surgery import apply_plan
from prunekit.report.analysis import write_analysis_report
from prunekit.score import (CRITERIA, Criterion, ScoreError, Scores, check_layer_by_layer, collect_layer_stats,
                            get_criterion, score_model)

log = logging.getLogger(__name__)

# none: cut only; one-shot: refit each layer on the original model's inputs (one calibration pass);
# sequential: refit layer by layer on the pruned model's own inputs, toward the original outputs.
# obs: sequential, and also re-picks which units of each layer go (structured OBS), keeping the plan's widths.
COMPENSATIONS = ("none", "one-shot", "sequential", "obs")


@dataclass(frozen=True)
class CalibrationSettings:
    source: str = "c4"            # named set, .txt / .jsonl[:field] path, or "self" (text sampled from the model)
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    task: str | None = None       # prompt/response pairs (alpaca or .jsonl): the loss is on the responses only
    data_dir: str | None = None

    def validate(self) -> None:
        for name in ("n_samples", "seq_len"):
            if getattr(self, name) < 1:
                raise DataError(f"calibration {name} must be at least 1, got {getattr(self, name)}")
        for spec in filter(None, (self.source, self.task)):
            path = Path(spec.split(":")[0]) if spec.endswith((".txt", ".jsonl")) or ".jsonl:" in spec else None
            if path is not None:
                if not path.is_file():
                    raise DataError(f"calibration file {path} does not exist; pass an existing .txt or .jsonl file")
            elif spec not in NAMED_SOURCES and spec != SELF_SOURCE:
                raise DataError(f"unknown calibration source {spec!r}; use one of {sorted(NAMED_SOURCES) + [SELF_SOURCE]} "
                                f"or a .txt / .jsonl[:field] file")


def default_criterion(compensation: str) -> str:
    """The criterion a prune uses when none is named. OBS re-picks which units go, so the scores only
    order them for the planner and the free `magnitude` does; every other compensation keeps the
    units the scores pick, and magnitude picks badly (BENCHMARKS.md's grid: ~20x Taylor's perplexity
    at 20% with sequential compensation), so those get `taylor`."""
    return "magnitude" if compensation == "obs" else "taylor"


@dataclass(frozen=True)
class PruneSettings:
    target: float = 0.3
    basis: str = "non-embedding"
    # The default is SlimGPT's procedure (structured OBS): log-increasing layer budgets, FFN channels
    # only, OBS choosing and updating layer by layer. On SmolLM2-135M it matched or beat Taylor with
    # global allocation and sequential compensation at 20 / 35 / 50% in under half the time, with no
    # backward pass (BENCHMARKS.md, "The default prune"). None: `default_criterion(compensation)`.
    criterion: str | None = None
    criterion_options: dict = field(default_factory=dict)
    allocation: str = "log_increase"
    allocation_options: dict[str, float] = field(default_factory=dict)  # e.g. alpha (slimllm), amplitude (adapt_pruner)
    prune: tuple[str, ...] = ("channel",)
    limits: dict[str, float] = field(default_factory=dict)
    ffn_multiple: int = 64
    hidden_multiple: int = 64
    protect_layers: tuple[int, ...] = ()
    compensation: str = "obs"   # one of COMPENSATIONS
    bias_compensation: bool = False
    ridge: float = 1e-3
    steps: int = 1                # iterative pruning: reach the target in this many steps, scoring again in between
    batch_size: int = 8
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    device: str | None = None     # where scoring and compensation run (cpu, cuda, cuda:N); None: where the model is
    # Keep the model in CPU memory and run one decoder layer at a time on `device`, over calibration
    # states that stay there: a model larger than the device can be scored and pruned.
    layer_by_layer: bool = False
    # Plan from this scores.json (what `analyze` wrote) instead of scoring: the first step's scores.
    scores: str | None = None
    # After compensation and cut: Adam steps per layer toward the dense layer (0: none), and their rate.
    reconstruct_steps: int = 0
    reconstruct_lr: float = DEFAULT_LR
    # allocation "search": its budget and fitness rows (prunekit.plan.search)
    search: SearchSettings = field(default_factory=SearchSettings)
    # Fold each span of dropped layers into the layer before it as a least-squares linear map (ReplaceMe).
    replace_dropped_layers: bool = False

    def __post_init__(self):
        if self.criterion is None:
            object.__setattr__(self, "criterion", default_criterion(self.compensation))

    def planner_settings(self, target: float | None = None) -> PlannerSettings:
        return PlannerSettings(
            target=self.target if target is None else target, basis=self.basis, allocation=self.allocation,
            prune=tuple(self.prune), limits=dict(self.limits), ffn_multiple=self.ffn_multiple,
            hidden_multiple=self.hidden_multiple, protect_layers=tuple(self.protect_layers),
            allocation_options=dict(self.allocation_options),
        )

    @property
    def criterion_spec(self) -> Criterion:
        """The registered criterion that `criterion` names (an unknown name fails here)."""
        return get_criterion(self.criterion)

    def validate(self) -> None:
        """Everything that can be checked without a model."""
        self.planner_settings().validate()
        criterion = self.criterion_spec
        criterion.check_options(self.criterion_options)
        missing = set(self.prune) - set(criterion.kinds)
        if self.criterion == "sensitivity":
            measured = criterion.check_options(self.criterion_options)["kinds"]
            missing = set(self.prune) - set(measured)
        if missing:
            raise PlanError(f"criterion {self.criterion!r} does not score {sorted(missing)}; choose structures it scores "
                            f"({sorted(criterion.kinds)}) or another criterion")
        if self.steps < 1:
            raise PlanError(f"steps must be at least 1, got {self.steps}")
        if self.compensation not in COMPENSATIONS:
            raise PlanError(f"unknown compensation {self.compensation!r}; choose one of {list(COMPENSATIONS)}")
        if self.bias_compensation and self.compensation != "one-shot":
            raise PlanError("bias compensation is fitted with the one-shot refit; pass --compensation one-shot with it")
        if self.scores is not None and not Path(self.scores).is_file():
            raise PlanError(f"scores file {self.scores} does not exist; pass the scores.json that `prunekit analyze` "
                            "wrote, or drop --scores to score here")
        check_reconstruction(self.reconstruct_steps, self.reconstruct_lr)
        if self.allocation in ("slimllm", "adapt_pruner") and self.scores is None and not (
                criterion.needs_stats or self.criterion in ("slimllm", "adapt_pruner") or self.compensation == "one-shot"):
            # the same refusal the planner makes after scoring, here before anything is loaded
            raise PlanError(f"allocation {self.allocation!r} spreads the target by each layer's cos(input, output), "
                            f"which criterion {self.criterion!r} does not record; use criterion slimllm, adapt_pruner, "
                            "activation, fluctuation or block_influence, or allocation adaptive")
        if self.replace_dropped_layers and self.layer_by_layer:
            raise PlanError("replacing dropped layers runs the whole model over the calibration rows and cannot run "
                            "layer by layer yet; drop --layer-by-layer or --replace-dropped-layers")
        if self.allocation == "search":
            self.search.validate()
            if self.layer_by_layer:
                raise PlanError("allocation 'search' assembles candidate models on the device and cannot run layer by "
                                "layer yet; drop --layer-by-layer or use global allocation")
        if ((criterion.needs_data and self.scores is None) or self.compensation != "none" or self.reconstruct_steps
                or self.allocation == "search" or self.replace_dropped_layers):
            self.calibration.validate()
        check_run_options(self.criterion, self.device, self.layer_by_layer)

    def to_dict(self) -> dict:
        return asdict(self)


def check_run_options(criterion: str, device: str | None, layer_by_layer: bool) -> None:
    """The device exists here, and the criterion can run layer by layer when asked to."""
    if device is not None:
        check_device(device)
    if layer_by_layer:
        check_layer_by_layer(criterion)


def load_device(device: str | None, layer_by_layer: bool) -> str:
    """Where the commands load the model: CPU memory in layer-by-layer mode, else the work device."""
    return "cpu" if layer_by_layer or device is None else device


def calibration_batch(model: nn.Module, tokenizer, calibration: CalibrationSettings) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Calibration token ids [n, seq_len], and labels when the loss is restricted to task responses."""
    if tokenizer is None:
        raise DataError("this model has no tokenizer, so calibration text cannot be tokenized; save one with the model")
    if calibration.task:
        pairs = load_pairs(calibration.task, data_dir=calibration.data_dir)[: calibration.n_samples]
        return task_tokens(pairs, tokenizer, seq_len=calibration.seq_len)
    ids = calibration_tokens(calibration.source, tokenizer, n_samples=calibration.n_samples, seq_len=calibration.seq_len,
                             seed=calibration.seed, data_dir=calibration.data_dir, model=model)
    return ids, None


def _stats(model, ids, settings: PruneSettings, *, with_gram: bool, progress: bool) -> list:
    return collect_layer_stats(model, ids, batch_size=settings.batch_size, with_gram=with_gram, progress=progress,
                               layer_by_layer=settings.layer_by_layer, device=settings.device)


def score_loaded(model, ids, labels, settings: PruneSettings, progress: bool = True) -> tuple[Scores, list | None]:
    """The scores of `settings.criterion` on a loaded model, and the layer statistics one-shot
    compensation reuses (None when neither needed them)."""
    criterion = settings.criterion_spec
    stats = None
    one_shot = settings.compensation == "one-shot"
    if criterion.needs_stats or one_shot:
        stats = _stats(model, ids, settings, with_gram=one_shot, progress=progress)
    scores = score_model(model, settings.criterion, ids, labels, stats=stats, batch_size=settings.batch_size,
                         progress=progress, layer_by_layer=settings.layer_by_layer, device=settings.device,
                         **settings.criterion_options)
    return scores, stats


def _check_and_place(model: nn.Module, settings: PruneSettings) -> None:
    """Refuse NaN/inf weights; then, in whole-model mode, move the model to the work device
    (layer-by-layer mode leaves it where it is, CPU memory, and moves one layer at a time)."""
    check_finite_weights(model, getattr(model.config, "_name_or_path", "") or "the model")
    if settings.device is not None and not settings.layer_by_layer:
        model.to(settings.device)


def prune_loaded(model: nn.Module, tokenizer, settings: PruneSettings, *, progress: bool = True,
                 calibration: tuple[torch.Tensor, torch.Tensor | None] | None = None, plan: Plan | None = None,
                 scores: Scores | None = None, work_dir: Path | None = None) -> dict:
    """Score, plan, compensate and cut `model` in place; returns a record of what was done.

    This is the prune step that `prunekit prune`, the recipe stage and the sweep all run. With
    `plan` (one made beforehand, e.g. by `plan_loaded`), scoring and planning are skipped: the plan
    is compensated for and cut in one step. With `scores` (computed once for several targets, or
    read from `settings.scores`), the first step plans from them instead of scoring. Allocation
    "search" draws `settings.search.held_out_rows` calibration rows beyond `n_samples` to judge its
    candidates (from a given `calibration`, its last rows), so scores and compensation see the same
    rows as with any other allocation and the search starts from the default plan. With `work_dir`,
    the long parts write their progress there (the search's state after every generation, each
    reconstructed layer), so that the same prune started again after a kill resumes them."""
    settings.validate()
    given_plan = plan is not None
    if plan is not None and settings.steps != 1:
        raise PlanError(f"a given plan is one step, but steps={settings.steps}; drop the plan or set steps to 1")
    original = model_structure(model)
    if plan is not None:
        predicted_structure(plan, original)  # a plan made for another model fails here, before any work
    if scores is None and settings.scores is not None and plan is None:
        scores = load_scores_for(settings.scores, original)
    _check_and_place(model, settings)
    ids, labels = calibration if calibration is not None else (None, None)
    needs_scores = plan is None and scores is None and settings.criterion_spec.needs_data
    searching = plan is None and settings.allocation == "search"
    held = settings.search.held_out_rows
    if settings.replace_dropped_layers:
        check_replaceable(architecture_for(model.config.model_type))
    if ids is None and (needs_scores or settings.compensation != "none" or settings.reconstruct_steps or searching
                        or settings.replace_dropped_layers):
        extra = held if searching else 0
        ids, labels = calibration_batch(model, tokenizer, replace(settings.calibration,
                                                                  n_samples=settings.calibration.n_samples + extra))
    elif searching and len(ids) <= held:
        raise PlanError(f"allocation 'search' judges its candidates on the last {held} calibration rows, but only "
                        f"{len(ids)} were given; pass more rows or lower search.held_out_rows")
    held_out_ids = None
    if searching:  # nothing the search builds from may have seen the rows that judge it
        ids, held_out_ids = ids[:-held], ids[-held:]
        labels = labels[:-held] if labels is not None else None
    dense_layers = dense_layer_copies(model) if settings.reconstruct_steps else None
    base = basis_value(original, settings.basis)
    record = {"settings": settings.to_dict(), "steps": [], "scores": None}
    for step in range(1, settings.steps + 1):
        started = time.perf_counter()
        current = model_structure(model)
        # Each step removes its share of the ORIGINAL basis: step s ends at s/steps of the target.
        goal_left = base * (1 - settings.target * step / settings.steps)
        step_target = 1 - goal_left / basis_value(current, settings.basis)
        if step_target <= 0:
            continue
        if plan is None:
            if scores is None:
                scores, stats = score_loaded(model, ids, labels, settings, progress)
            else:  # given: only one-shot compensation still needs this pass's statistics
                stats = (_stats(model, ids, settings, with_gram=True, progress=progress)
                         if settings.compensation == "one-shot" else None)
            if searching:
                plan, record[f"search_step_{step}" if settings.steps > 1 else "search"] = search_allocation(
                    model, scores, settings.planner_settings(step_target), settings.search, ids, held_out_ids,
                    comparable=comparable_scores(scores), refit=settings.compensation != "none", ridge=settings.ridge,
                    batch_size=settings.batch_size, device=settings.device, progress=progress,
                    state_path=work_dir / f"search-state-{step}.json" if work_dir is not None else None)
            else:
                plan = make_plan(current, scores, settings.planner_settings(step_target),
                                 comparable=comparable_scores(scores))
        else:
            scores = None
            stats = (_stats(model, ids, settings, with_gram=True, progress=progress)
                     if settings.compensation == "one-shot" else None)
        replacement = None
        if settings.replace_dropped_layers and plan.drop_layers:  # first: the width refits then see the folded map
            replacement = replace_dropped_layers(model, plan, ids, ridge=settings.ridge, batch_size=settings.batch_size,
                                                 progress=progress).to_dict()
        compensation = None
        if settings.compensation == "one-shot":
            compensation = compensate(model, plan, stats, ridge=settings.ridge, bias=settings.bias_compensation)
        elif settings.compensation == "sequential" or (settings.compensation == "obs" and given_plan):
            # a plan the user wrote says which units go: OBS would pick others, so it is refitted as it is
            compensation = compensate_sequential(model, plan, ids, ridge=settings.ridge, batch_size=settings.batch_size,
                                                 progress=progress, device=settings.device)
        elif settings.compensation == "obs":  # the plan's widths, OBS's choice of units: the revised plan is cut
            plan, compensation = select_and_update(model, plan, ids, batch_size=settings.batch_size, progress=progress,
                                                   device=settings.device)
        hidden_refit = None
        if plan.keep_hidden is not None and settings.compensation != "none":
            # the readers of the residual stream (q/k/v, gate/up, an untied head) onto the kept channels
            hidden_refit = refit_hidden_readers(model, plan, ids, ridge=settings.ridge, batch_size=settings.batch_size,
                                                progress=progress)
        after = apply_plan(model, plan)
        record["steps"].append({
            "step": step, "plan": plan.to_dict(), "seconds": round(time.perf_counter() - started, 1),
            "removed": removed_fraction(original, after, settings.basis),
            "compensation": compensation.to_dict() if compensation is not None else None,
            "replaced_dropped_layers": replacement,
            "hidden_refit": hidden_refit,
        })
        record["scores"] = scores
        plan = scores = None  # the next step scores and plans again
    if settings.reconstruct_steps:
        record["reconstruction"] = reconstruct_blocks(
            model, dense_layers, ids, steps=settings.reconstruct_steps, lr=settings.reconstruct_lr,
            sources=surviving_layers([s["plan"] for s in record["steps"]], original.num_layers),
            batch_size=settings.batch_size, seed=settings.calibration.seed, progress=progress,
            device=settings.device, checkpoint_dir=work_dir / "reconstruction" if work_dir is not None else None).to_dict()
    final = model_structure(model)
    record["removed"] = {b: round(removed_fraction(original, final, b), 6) for b in ("non-embedding", "total", "flops", "kv-cache")}
    record["params"] = {"before": original.total_params, "after": final.total_params,
                        "non_embedding_before": original.non_embedding_params, "non_embedding_after": final.non_embedding_params}
    record["units"] = {"before": unit_counts(original), "after": unit_counts(final)}
    return record


def unit_counts(structure: ModelStructure) -> dict[str, int]:
    """How many of each prunable structure a model has."""
    layers = structure.layers
    counts = {"layers": len(layers), "attention sublayers": sum(s.num_attention_heads > 0 for s in layers),
              "MLP sublayers": sum(s.intermediate_size > 0 for s in layers),
              "query heads": sum(s.num_attention_heads for s in layers),
              "KV groups": sum(s.num_key_value_heads for s in layers),
              "FFN channels": sum(s.intermediate_size for s in layers)}
    if any(s.num_experts for s in layers):  # an expert's width alone would hide the experts removed
        counts["routed experts"] = sum(s.num_experts for s in layers)
        counts["channels inside experts"] = sum(s.num_experts * s.intermediate_size for s in layers)
    return counts


def prune_summary(saved: SavedModel, *, seconds: float) -> str:
    """What a prune did, in a few lines: parameters and structures before and after, the size on
    disk, the time, and the command that evaluates the result."""
    pruning = json.loads((saved.path / PROVENANCE_FILE).read_text()).get("pruning") or {}
    params, units = pruning.get("params", {}), pruning.get("units", {})
    lines = [f"saved {saved.format} model to {saved.path} in {seconds:.0f} s"]
    if params:
        lines.append(f"  parameters: {format_count(params['before'])} -> {format_count(params['after'])} "
                     f"(non-embedding {format_count(params['non_embedding_before'])} -> "
                     f"{format_count(params['non_embedding_after'])}, -{pruning['removed']['non-embedding']:.1%})")
    changed = [f"{name} {units['before'][name]:,} -> {units['after'][name]:,}" for name in units.get("before", {})
               if units["before"][name] != units["after"][name]]
    if changed:
        lines.append("  removed: " + "; ".join(changed))
    memory = describe_peak(pruning.get("memory"))
    if memory:
        lines.append(f"  memory: {memory}")
    size = saved.bytes or sum(f.stat().st_size for f in saved.path.rglob("*") if f.is_file())
    source = f" (source: {saved.source_bytes / 2**20:,.0f} MiB)" if getattr(saved, "source_bytes", None) else ""
    lines.append(f"  on disk: {size / 2**20:,.0f} MiB{source}")
    export = saved.export_command() if hasattr(saved, "export_command") else None
    if export:
        lines.append(f"  as GGUF in the source's quantization: {export}")
    lines.append(f"  evaluate it: prunekit eval {saved.path} --ppl wikitext2 --tasks piqa,arc_easy")
    return "\n".join(lines)


def plan_loaded(model: nn.Module, tokenizer, settings: PruneSettings, *, progress: bool = True) -> tuple[Plan, Scores]:
    """Score `model` and plan one step to the target, without cutting: what `prune_loaded` would do first."""
    settings.validate()
    if settings.steps != 1:
        raise PlanError(f"iterative pruning (steps={settings.steps}) scores again after each cut, so it cannot be "
                        "planned ahead; plan with steps=1, or prune without a separate plan")
    needs_data = settings.criterion_spec.needs_data
    _check_and_place(model, settings)
    ids, labels = calibration_batch(model, tokenizer, settings.calibration) if needs_data else (None, None)
    scores, _ = score_loaded(model, ids, labels, replace(settings, compensation="none"), progress)
    plan = make_plan(model_structure(model), scores, settings.planner_settings(),
                     comparable=settings.criterion_spec.comparable)
    return plan, scores


def prune(model: str | Path, out: str | Path, settings: PruneSettings, *, plan: Plan | str | Path | None = None,
          force: bool = False, dtype: str = "float32", progress: bool = True, machine: Machine | None = None,
          dry_run: bool = False, save_dtype: str | torch.dtype | None = None) -> SavedModel | Preflight:
    """Load, score, plan, compensate, cut and save: `prunekit prune` and the recipe's prune stage.

    With `plan`, scoring and planning are skipped (the plan is compensated for as `settings` say,
    then cut); with `settings.scores`, planning starts from an `analyze` output. The settings, the
    output path, the target's reachability, the calibration data and the memory on the device are
    checked before any weight is read (`preflight_prune`); `dry_run` returns that preflight. The model
    is saved in `save_dtype` (default: the dtype its source declares, bfloat16 for a GGUF file)."""
    source = resolve_model_source(model)
    out = Path(out)
    plan = plan if plan is None or isinstance(plan, Plan) else Plan.load(plan)
    check_output_dir(out, force=force, protected=source.local_paths)
    preflight = preflight_prune(source, settings, dtype, plan=plan)
    preflight.check(machine or Machine.here(out), str(model))
    if dry_run:
        return preflight
    work_dir = out.with_name(f".{out.name}.resume")  # beside the output, until it is saved
    work_device = load_device(settings.device, False)
    with PeakMemory(work_device) as peak:
        loaded, tokenizer = load(model, dtype=dtype, device=load_device(settings.device, settings.layer_by_layer))
        record = prune_loaded(loaded, tokenizer, settings, plan=plan, progress=progress, work_dir=work_dir)
    admitted = next((need.estimate.total for need in preflight.needs if need.device == work_device), None)
    record["memory"] = peak.to_dict(admitted)
    if plan is not None and model_structure(loaded).total_params != preflight.leaves.total_params:
        raise AssertionError("surgery and plan disagree on the parameter count")  # a bug, never the user's input
    loaded.to("cpu")  # saved from CPU memory
    saved = save_pruned(loaded, tokenizer, out, record, source=str(model), protected=source.local_paths, force=force,
                        save_dtype=save_dtype)
    shutil.rmtree(work_dir, ignore_errors=True)
    return saved


def save_pruned(model: nn.Module, tokenizer, out: Path, record: dict, *, source: str, protected: tuple[Path, ...] = (),
                force: bool = False, save_dtype: str | torch.dtype | None = None) -> SavedModel:
    """Save a pruned model with its provenance: the plan (when it was one step) and what the prune did."""
    plans = [s["plan"] for s in record["steps"]]
    return save_model(model, tokenizer, out, plan=Plan.from_dict(plans[-1]) if len(plans) == 1 else None,
                      source=source, protected=protected, force=force, save_dtype=save_dtype,
                      extra_provenance={"pruning": {k: v for k, v in record.items() if k != "scores"}})


def prune_to_target(model: str | Path, out: str | Path, settings: PruneSettings, *, force: bool = False,
                    dtype: str = "float32", progress: bool = True) -> SavedModel:
    """`prune` to `settings.target`."""
    return prune(model, out, settings, force=force, dtype=dtype, progress=progress)


def prune_to_plan(model: str | Path, plan: Plan | str | Path, out: str | Path, *, force: bool = False,
                  dtype: str = "float32", settings: PruneSettings | None = None) -> SavedModel:
    """`prune` along a given plan; without `settings`, the plan is cut as it is (no compensation)."""
    settings = settings or PruneSettings(compensation="none", criterion="magnitude")  # a plan needs no scores
    return prune(model, out, settings, plan=plan, force=force, dtype=dtype)


# ----------------------------------------------------------------------------- preflight
# Rough sustained rates for the time estimates (measured on this project's machines: BENCHMARKS.md,
# GPU_BENCHMARKS.md): a 2-core CPU runs SmolLM2's bf16 prefill at ~0.4 TFLOP/s;
# it writes self text at ~170 tokens/s (0.05 TFLOP/s), an H200 at ~57,000 (16 TFLOP/s: decoding is
# bound by kernel launches and the growing KV cache, not by arithmetic).
# Taylor's gradients (bf16 autocast) run at ~0.34 TFLOP/s there and the layer passes of compensation
# at ~0.65 (BENCHMARKS.md, the default prune stage by stage).
RATES = {"cpu": {"infer": 0.3e12, "train": 0.34e12, "layers": 0.65e12, "sample": 0.05e12},
         "cuda": {"infer": 150e12, "train": 60e12, "layers": 150e12, "sample": 16e12}}
LOAD_SECONDS = 15  # each stage that loads the model (SmolLM2 from its GGUF file: 15 s)


def rate(device: str | None, kind: str) -> float:
    return RATES["cuda" if (device or "cpu").startswith("cuda") else "cpu"][kind]


def self_text_seconds(structure: ModelStructure, source: str, tokens: int, device: str | None) -> float:
    """The time the model takes to write `tokens` of its own text, when `source` asks for it."""
    return structure.flops_per_token(512) * tokens / rate(device, "sample") if source == SELF_SOURCE else 0.0


# Layer passes over every calibration row that each compensation makes (sequential: two, the o_proj
# fit and the MLP's; obs: the same passes, plus its greedy removals and float64 inverses, which
# cost about one more on SmolLM2-135M on the 2-core CPU: 87 s for 30 layers, BENCHMARKS.md).
COMPENSATION_PASSES = {"none": 0, "one-shot": 1, "sequential": 2, "obs": 3}
RECONSTRUCTION_TOKENS_PER_STEP = 5_000  # 0.33 s a step for a SmolLM2 layer on the 2-core CPU
# log-softmax, exp and the KL sum read and write each logit several times: as costly per logit
# as this many FLOPs on the CPU (a rough equivalence, from the search's 2-core timings)
SEARCH_KL_FLOPS_PER_LOGIT = 100


def prune_seconds(structure: ModelStructure, settings: PruneSettings, *, scoring: bool = True) -> float:
    """A rough time for scoring, compensating and reconstructing on the settings' device, from the
    FLOPs involved and the RATES measured (the default prune of SmolLM2-135M: 110 s on 2 cores)."""
    device, tokens = settings.device, settings.calibration.n_samples * settings.calibration.seq_len
    flops = structure.flops_per_token(512)
    seconds = 0.0
    if scoring and settings.criterion_spec.needs_data:  # magnitude and random read only the weights
        spec = settings.criterion_spec
        options = spec.check_options(settings.criterion_options)
        scored = min(tokens, options.get("tokens") or tokens)  # Taylor takes its gradient on the first rows
        passes = 3 if spec.needs_gradients else 1
        seconds += settings.steps * passes * flops * scored / rate(device, "train" if spec.needs_gradients else "infer")
    seconds += COMPENSATION_PASSES.get(settings.compensation, 2) * settings.steps * flops * tokens / rate(device, "layers")
    reconstruct = sum(3 * structure.layer_flops_per_token(i, 512) for i in range(structure.num_layers))
    seconds += settings.reconstruct_steps * reconstruct * RECONSTRUCTION_TOKENS_PER_STEP / rate(device, "train")
    if settings.allocation == "search":
        seconds += settings.steps * search_seconds(structure, settings)
    return seconds


def search_seconds(structure: ModelStructure, settings: PruneSettings) -> float:
    """The allocation search: one pass for its Gram matrices, then per generation the candidates'
    forward passes and their KL over the vocabulary (SEARCH_KL_FLOPS_PER_LOGIT per logit)."""
    search, seq_len = settings.search, settings.calibration.seq_len
    per_token = structure.flops_per_token(seq_len) + SEARCH_KL_FLOPS_PER_LOGIT * structure.vocab_size
    generations = search.generations * search.rows_per_generation() * seq_len * per_token / rate(settings.device, "infer")
    if search.minutes is not None:
        generations = min(generations, search.minutes * 60)
    gram_pass = structure.flops_per_token(seq_len) * settings.calibration.n_samples * seq_len / rate(settings.device, "layers")
    return gram_pass + generations


def canonical_dtype(dtype: str) -> str:
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)


def memory_needs(structure: ModelStructure, dtype: str, settings: PruneSettings, *, scoring: bool = True) -> tuple[Need, ...]:
    """What scoring (when `scoring`) and compensation need on the work device, and, layer by
    layer, the model in CPU memory. Empty when the dtype is `auto` (unknown before loading)."""
    dtype = canonical_dtype(dtype)
    if dtype not in BYTES:
        return ()
    criterion = settings.criterion_spec
    device = settings.device or "cpu"
    if settings.layer_by_layer:
        needs = [Need(device, layer_by_layer_estimate(structure, dtype, n_samples=settings.calibration.n_samples,
                                                      seq_len=settings.calibration.seq_len,
                                                      batch_size=settings.batch_size,
                                                      compensation=settings.compensation),
                      hints="the calibration states stay on the device, so lower --calib-samples or --calib-seq-len, "
                      "load it in bfloat16 (--dtype bfloat16), or lower --batch-size", what="one layer at a time")]
        if device != "cpu":
            needs.append(Need("cpu", weights_estimate(structure, dtype), what="the model, held there layer by layer",
                              hints="load it in bfloat16 (--dtype bfloat16)"))
        return tuple(needs)
    gradients = scoring and criterion.needs_gradients
    # sensitivity and sequential compensation each keep one layer's states for every row
    cached_layers = int(settings.compensation in ("sequential", "obs") or (scoring and criterion.name == "sensitivity"))
    cached_layers += 1 if settings.reconstruct_steps else 0  # reconstruction keeps the dense layer's targets too
    estimate = pruning_estimate(structure, dtype, gradients=gradients, batch_size=settings.batch_size,
                                seq_len=settings.calibration.seq_len, with_gram=settings.compensation == "one-shot",
                                n_samples=settings.calibration.n_samples, cached_layers=cached_layers,
                                device=device, sequential=settings.compensation in ("sequential", "obs"))
    if settings.allocation == "search":
        estimate = MemoryEstimate({**estimate.parts, **search_memory_parts(
            structure, settings.search, seq_len=settings.calibration.seq_len, weight_bytes=BYTES[dtype], device=device)})
    layer_by_layer_hint = ("" if criterion.whole_model else
                           "add --layer-by-layer (one layer at a time on the device, the model in CPU memory), ")
    return (Need(device, estimate, hints=f"load it in bfloat16 (--dtype bfloat16), {layer_by_layer_hint}lower "
                 "--batch-size or --calib-seq-len, or use a criterion without gradients (activation, fluctuation)"),)


def preflight_prune(source: ModelSource, settings: PruneSettings, dtype: str = "float32", *,
                    plan: Plan | None = None, structure: ModelStructure | None = None,
                    stage: str = "prune") -> Preflight:
    """Everything about a prune that can be known before its weights are read (see prunekit.preflight).
    `leaves` is the shape the model will have: the plan's, or for a target that of a plan with
    every unit scored alike (the counts are what matter to the stages after it)."""
    settings.validate()
    if settings.replace_dropped_layers:
        check_replaceable(architecture_for(load_config(source).model_type))
    structure = structure or model_structure(load_skeleton(source))
    if plan is not None:
        leaves = predicted_structure(plan, structure)  # a plan made for another model fails here
    else:
        if settings.scores is not None:
            load_scores_for(settings.scores, structure)
        # refuses an unreachable target (make_plan checks it first), naming the largest reachable
        leaves = predicted_structure(shape_only_plan(structure, settings.planner_settings()), structure)
    scoring = plan is None and settings.scores is None
    calibration = settings.calibration
    tokens = calibration.n_samples * calibration.seq_len
    uses_data = ((scoring and settings.criterion_spec.needs_data) or settings.compensation != "none"
                 or settings.reconstruct_steps > 0 or settings.replace_dropped_layers)
    if uses_data:
        check_calibration_source(calibration)
    flops = structure.flops_per_token(512)
    seconds = (LOAD_SECONDS + prune_seconds(structure, settings, scoring=scoring)
               + (self_text_seconds(structure, calibration.source, tokens, settings.device) if uses_data else 0))
    how = "plan given" if plan is not None else f"{settings.criterion} scores" if scoring else f"scores from {settings.scores}"
    what = (f"{how}, {settings.compensation} compensation, "
            + (f"{settings.target:.0%} of {settings.basis}" if plan is None else f"{len(plan.layers)} layers planned")
            + (f", {settings.steps} steps" if settings.steps > 1 else "")
            + (f", allocation searched for {settings.search.generations} generations"
               + (f" or {settings.search.minutes:g} min" if settings.search.minutes else "")
               if settings.allocation == "search" and plan is None else ""))
    save_bytes = leaves.total_params * BYTES.get(canonical_dtype(dtype), 4)
    return Preflight(stage, what, seconds, memory_needs(structure, dtype, settings, scoring=scoring),
                     disk_bytes=save_bytes if stage == "prune" else 0, leaves=leaves,
                     notes=(f"{format_count(structure.total_params)} -> {format_count(leaves.total_params)} parameters "
                            f"({format_count(structure.non_embedding_params)} -> "
                            f"{format_count(leaves.non_embedding_params)} non-embedding)",) if stage == "prune" else ())


def check_calibration_source(calibration: CalibrationSettings) -> None:
    """The calibration text (and task pairs) can be read: a file that exists, a named set with a
    local copy, or a Hub that answers; in seconds, before any model loads."""
    for spec in filter(None, (calibration.source, calibration.task)):
        resolve_source(spec, calibration.data_dir)


def load_scores_for(path: str | Path, structure: ModelStructure) -> Scores:
    """Scores from an `analyze` output, refused unless they were computed for a model of this shape."""
    scores = Scores.load(path)
    counts = {"head": [s.num_attention_heads for s in structure.layers],
              "kv_group": [s.num_key_value_heads for s in structure.layers],
              "channel": [s.dense_ffn_width for s in structure.layers],  # a MoE layer's shared expert
              "expert": [s.num_experts for s in structure.layers],
              "expert_channel": [s.num_experts * s.intermediate_size for s in structure.layers],
              "hidden": [structure.hidden_size] * structure.num_layers}  # each layer's share of every residual channel
    for kind, per_layer in scores.values.items():
        sizes = [int(v.numel()) for v in per_layer]
        expected = counts.get(kind, [1] * structure.num_layers)
        if sizes != expected:
            raise ScoreError(f"the {kind} scores in {path} were computed for another model ({len(sizes)} layers, "
                             f"{sum(sizes)} units; this one has {len(expected)} layers, {sum(expected)} units); score "
                             "this model with `prunekit analyze`, or drop --scores")
    return scores


def comparable_scores(scores: Scores) -> bool:
    """Whether the kinds of these scores share a unit (so heads and channels compete directly)."""
    return scores.criterion in CRITERIA and get_criterion(scores.criterion).comparable


def check_memory(model: str, structure: ModelStructure, dtype: str, settings: PruneSettings) -> None:
    """Refuse, before loading, a prune whose memory estimate clearly exceeds what this machine has free."""
    Preflight("prune", "", 0.0, memory_needs(structure, dtype, settings)).check(Machine.here(), model)


# ----------------------------------------------------------------------------- analyze


def analyze_settings(criterion: str = "sensitivity", criterion_options: dict | None = None,
                     calibration: CalibrationSettings = CalibrationSettings(), batch_size: int = 8,
                     device: str | None = None, layer_by_layer: bool = False) -> PruneSettings:
    """The settings of an analysis: scoring alone, no compensation."""
    settings = PruneSettings(criterion=criterion, criterion_options=criterion_options or {}, calibration=calibration,
                             compensation="none", batch_size=batch_size, device=device, layer_by_layer=layer_by_layer)
    get_criterion(criterion).check_options(settings.criterion_options)
    if get_criterion(criterion).needs_data:
        calibration.validate()
    check_run_options(criterion, device, layer_by_layer)
    return settings


def preflight_analyze(source: ModelSource, settings: PruneSettings, dtype: str = "float32", *,
                      structure: ModelStructure | None = None) -> Preflight:
    structure = structure or model_structure(load_skeleton(source))
    calibration = settings.calibration
    tokens = calibration.n_samples * calibration.seq_len
    if settings.criterion_spec.needs_data:
        check_calibration_source(calibration)
    passes = 232 if settings.criterion == "sensitivity" else 3  # BENCHMARKS.md: sensitivity cost
    seconds = (LOAD_SECONDS + passes * structure.flops_per_token(512) * tokens / rate(settings.device, "infer")
               + self_text_seconds(structure, calibration.source, tokens, settings.device))
    return Preflight("analyze", f"{settings.criterion} scores on {tokens:,} tokens", seconds,
                     memory_needs(structure, dtype, settings), leaves=structure)


def analyze(model: str | Path, out_dir: str | Path, *, criterion: str = "sensitivity", criterion_options: dict | None = None,
            calibration: CalibrationSettings = CalibrationSettings(), batch_size: int = 8, dtype: str = "float32",
            force: bool = False, progress: bool = True, device: str | None = None,
            layer_by_layer: bool = False, machine: Machine | None = None) -> Path:
    """Score every component and write scores.json, plots and analysis.md into `out_dir`
    (`prunekit analyze` and the recipe's analyze stage); `prunekit prune --scores` plans from it."""
    settings = analyze_settings(criterion, criterion_options, calibration, batch_size, device, layer_by_layer)
    source = resolve_model_source(model)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force=force, protected=source.local_paths)
    preflight_analyze(source, settings, dtype).check(machine or Machine.here(out_dir), str(model))
    loaded, tokenizer = load(model, dtype=dtype, device=load_device(device, layer_by_layer))
    check_finite_weights(loaded, str(model))
    ids, labels = calibration_batch(loaded, tokenizer, calibration) if get_criterion(criterion).needs_data else (None, None)
    started = time.perf_counter()
    scores, _ = score_loaded(loaded, ids, labels, settings, progress)
    scores.meta.setdefault("cost", {})["seconds_total"] = round(time.perf_counter() - started, 1)
    with atomic_directory(out_dir, force=force, protected=source.local_paths) as tmp:
        scores.save(tmp / "scores.json")
        write_analysis_report(scores, model_structure(loaded), tmp, title=f"{criterion} analysis of {model}",
                              calibration={**asdict(calibration), "tokens": int(ids.numel()) if ids is not None else 0})
    return out_dir / "analysis.md"
