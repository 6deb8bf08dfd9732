"""The pruning pipeline as plain functions: calibrate -> score -> plan -> compensate -> cut.

`prune_to_target` is what `prunekit prune --target` runs; `analyze` is `prunekit analyze`.
Every setting is validated before a model is loaded.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from prunekit.compensate import compensate, compensate_sequential
from prunekit.data import NAMED_SOURCES, SELF_SOURCE, DataError, calibration_tokens, load_pairs, task_tokens
from prunekit.export.files import check_output_dir
from prunekit.export.huggingface import SavedModel, save_model
from prunekit.models.loading import check_device, check_finite_weights, load, load_skeleton, resolve_model_source
from prunekit.models.memory import BYTES, check_fits, layer_by_layer_estimate, pruning_estimate, weights_estimate
from prunekit.models.structure import ModelStructure, model_structure
from prunekit.plan.plan import Plan, PlanError, predicted_structure
from prunekit.plan.planner import PlannerSettings, basis_value, check_reachable, make_plan, removed_fraction
from prunekit.prune.surgery import apply_plan
from prunekit.score import Scores, check_layer_by_layer, collect_layer_stats, get_criterion, score_model

log = logging.getLogger(__name__)

# none: cut only; one-shot: refit each layer on the original model's inputs (one calibration pass);
# sequential: refit layer by layer on the pruned model's own inputs, toward the original outputs.
COMPENSATIONS = ("none", "one-shot", "sequential")


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


@dataclass(frozen=True)
class PruneSettings:
    target: float = 0.3
    basis: str = "non-embedding"
    criterion: str = "taylor"
    criterion_options: dict = field(default_factory=dict)
    allocation: str = "global"
    prune: tuple[str, ...] = ("channel", "head", "kv_group")
    limits: dict[str, float] = field(default_factory=dict)
    ffn_multiple: int = 64
    protect_layers: tuple[int, ...] = ()
    compensation: str = "sequential"   # one of COMPENSATIONS
    bias_compensation: bool = False
    ridge: float = 1e-3
    steps: int = 1                # iterative pruning: reach the target in this many steps, scoring again in between
    batch_size: int = 8
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    device: str | None = None     # where scoring and compensation run (cpu, cuda, cuda:N); None: where the model is
    # Keep the model in CPU memory and run one decoder layer at a time on `device`, over calibration
    # states that stay there: a model larger than the device can be scored and pruned.
    layer_by_layer: bool = False

    def planner_settings(self, target: float | None = None) -> PlannerSettings:
        return PlannerSettings(
            target=self.target if target is None else target, basis=self.basis, allocation=self.allocation,
            prune=tuple(self.prune), limits=dict(self.limits), ffn_multiple=self.ffn_multiple,
            protect_layers=tuple(self.protect_layers),
        )

    def validate(self) -> None:
        """Everything that can be checked without a model."""
        self.planner_settings().validate()
        criterion = get_criterion(self.criterion)
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
        if criterion.needs_data or self.compensation != "none":
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


def _score(model, ids, labels, settings: PruneSettings, progress: bool) -> tuple[Scores, list | None]:
    criterion = get_criterion(settings.criterion)
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
                 calibration: tuple[torch.Tensor, torch.Tensor | None] | None = None, plan: Plan | None = None) -> dict:
    """Score, plan, compensate and cut `model` in place; returns a record of what was done.

    With `plan` (one made beforehand, e.g. by `plan_loaded`), scoring and planning are skipped:
    the plan is compensated for and cut in one step."""
    settings.validate()
    if plan is not None and settings.steps != 1:
        raise PlanError(f"a given plan is one step, but steps={settings.steps}; drop the plan or set steps to 1")
    original = model_structure(model)
    if plan is not None:
        predicted_structure(plan, original)  # a plan made for another model fails here, before any work
    _check_and_place(model, settings)
    ids, labels = calibration if calibration is not None else (None, None)
    needs_scores = plan is None and get_criterion(settings.criterion).needs_data
    if ids is None and (needs_scores or settings.compensation != "none"):
        ids, labels = calibration_batch(model, tokenizer, settings.calibration)
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
            scores, stats = _score(model, ids, labels, settings, progress)
            plan = make_plan(current, scores, settings.planner_settings(step_target),
                             comparable=get_criterion(settings.criterion).comparable)
        else:
            scores = None
            stats = (_stats(model, ids, settings, with_gram=True, progress=progress)
                     if settings.compensation == "one-shot" else None)
        compensation = None
        if settings.compensation == "one-shot":
            compensation = compensate(model, plan, stats, ridge=settings.ridge, bias=settings.bias_compensation)
        elif settings.compensation == "sequential":
            compensation = compensate_sequential(model, plan, ids, ridge=settings.ridge, batch_size=settings.batch_size,
                                                 progress=progress, device=settings.device)
        after = apply_plan(model, plan)
        record["steps"].append({
            "step": step, "plan": plan.to_dict(), "seconds": round(time.perf_counter() - started, 1),
            "removed": removed_fraction(original, after, settings.basis),
            "compensation": compensation.to_dict() if compensation is not None else None,
        })
        record["scores"] = scores
        plan = None  # the next step scores and plans again
    final = model_structure(model)
    record["removed"] = {b: round(removed_fraction(original, final, b), 6) for b in ("non-embedding", "total", "flops", "kv-cache")}
    record["params"] = {"before": original.total_params, "after": final.total_params,
                        "non_embedding_before": original.non_embedding_params, "non_embedding_after": final.non_embedding_params}
    return record


def plan_loaded(model: nn.Module, tokenizer, settings: PruneSettings, *, progress: bool = True) -> tuple[Plan, Scores]:
    """Score `model` and plan one step to the target, without cutting: what `prune_loaded` would do first."""
    settings.validate()
    if settings.steps != 1:
        raise PlanError(f"iterative pruning (steps={settings.steps}) scores again after each cut, so it cannot be "
                        "planned ahead; plan with steps=1, or prune without a separate plan")
    needs_data = get_criterion(settings.criterion).needs_data
    _check_and_place(model, settings)
    ids, labels = calibration_batch(model, tokenizer, settings.calibration) if needs_data else (None, None)
    scores, _ = _score(model, ids, labels, replace(settings, compensation="none"), progress)
    plan = make_plan(model_structure(model), scores, settings.planner_settings(),
                     comparable=get_criterion(settings.criterion).comparable)
    return plan, scores


def prune_to_plan(model: str | Path, plan: Plan | str | Path, out: str | Path, *, force: bool = False,
                  dtype: str = "float32") -> SavedModel:
    """Load `model`, apply `plan`, save to `out`. The plan is checked against the model's shapes
    (built on the meta device) before any weight is read."""
    source = resolve_model_source(model)
    plan = plan if isinstance(plan, Plan) else Plan.load(plan)
    check_output_dir(Path(out), force=force, protected=source.local_paths)
    predicted = predicted_structure(plan, model_structure(load_skeleton(source)))
    loaded, tokenizer = load(model, dtype=dtype)
    after = apply_plan(loaded, plan)
    if after.total_params != predicted.total_params:
        raise AssertionError("surgery and plan disagree on the parameter count")  # a bug, never the user's input
    return save_model(loaded, tokenizer, out, plan=plan, source=str(model), protected=source.local_paths, force=force)


def prune_to_target(model: str | Path, out: str | Path, settings: PruneSettings, *, force: bool = False,
                    dtype: str = "float32", progress: bool = True) -> SavedModel:
    """Load, score, plan, compensate, cut and save. Settings, output path and the reachability of
    the target are checked before the weights are loaded."""
    settings.validate()
    source = resolve_model_source(model)
    check_output_dir(Path(out), force=force, protected=source.local_paths)
    structure = model_structure(load_skeleton(source))
    check_reachable(structure, settings.planner_settings())
    check_memory(f"pruning {model}", structure, dtype, settings)
    loaded, tokenizer = load(model, dtype=dtype, device=load_device(settings.device, settings.layer_by_layer))
    record = prune_loaded(loaded, tokenizer, settings, progress=progress)
    loaded.to("cpu")  # saved from CPU memory
    plans = [s["plan"] for s in record["steps"]]
    return save_model(
        loaded, tokenizer, out, plan=Plan.from_dict(plans[-1]) if len(plans) == 1 else None, source=str(model),
        protected=source.local_paths, force=force,
        extra_provenance={"pruning": {k: v for k, v in record.items() if k != "scores"}},
    )


def check_memory(what: str, structure: ModelStructure, dtype: str, settings: PruneSettings) -> None:
    """Refuse, before loading, a job whose memory estimate clearly exceeds what the device has
    free, naming the options that lower it. In layer-by-layer mode the device needs one layer and
    the calibration states, and CPU memory the whole model."""
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    if dtype not in BYTES:  # "auto": the checkpoint's own dtype, unknown before loading
        return
    criterion = get_criterion(settings.criterion)
    device = settings.device or "cpu"
    if settings.layer_by_layer:
        needs = layer_by_layer_estimate(structure, dtype, n_samples=settings.calibration.n_samples,
                                        seq_len=settings.calibration.seq_len, batch_size=settings.batch_size,
                                        compensation=settings.compensation)
        check_fits(f"{what} layer by layer", needs, device,
                   hints="the calibration states stay on the device, so lower --calib-samples or --calib-seq-len, "
                   "load it in bfloat16 (--dtype bfloat16), or lower --batch-size")
        if device != "cpu":
            check_fits(f"{what} layer by layer", weights_estimate(structure, dtype), "cpu",
                       hints="the model is held in CPU memory in this mode; load it in bfloat16 (--dtype bfloat16)")
        return
    # sensitivity and sequential compensation each keep one layer's states for every row
    cached_layers = int(settings.compensation == "sequential" or criterion.name == "sensitivity")
    needs = pruning_estimate(structure, dtype, gradients=criterion.needs_gradients, batch_size=settings.batch_size,
                             seq_len=settings.calibration.seq_len, with_gram=settings.compensation == "one-shot",
                             n_samples=settings.calibration.n_samples, cached_layers=cached_layers)
    layer_by_layer_hint = ("" if criterion.whole_model else
                           "add --layer-by-layer (one layer at a time on the device, the model in CPU memory), ")
    check_fits(what, needs, device, hints=f"load it in bfloat16 (--dtype bfloat16), {layer_by_layer_hint}lower "
               "--batch-size or --calib-seq-len, or use a criterion without gradients (activation, fluctuation)")


def analyze(model: str | Path, out_dir: str | Path, *, criterion: str = "sensitivity", criterion_options: dict | None = None,
            calibration: CalibrationSettings = CalibrationSettings(), batch_size: int = 8, dtype: str = "float32",
            force: bool = False, progress: bool = True, device: str | None = None,
            layer_by_layer: bool = False) -> Path:
    """Score every component and write scores.json, plots and analysis.md into `out_dir`."""
    settings = PruneSettings(criterion=criterion, criterion_options=criterion_options or {}, calibration=calibration,
                             compensation="none", batch_size=batch_size, device=device, layer_by_layer=layer_by_layer)
    get_criterion(criterion).check_options(settings.criterion_options)
    if get_criterion(criterion).needs_data:
        calibration.validate()
    check_run_options(criterion, device, layer_by_layer)
    source = resolve_model_source(model)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force=force, protected=source.local_paths)
    check_memory(f"analyzing {model}", model_structure(load_skeleton(source)), dtype, settings)
    loaded, tokenizer = load(model, dtype=dtype, device=load_device(device, layer_by_layer))
    check_finite_weights(loaded, str(model))
    ids, labels = calibration_batch(loaded, tokenizer, calibration) if get_criterion(criterion).needs_data else (None, None)
    started = time.perf_counter()
    scores, _ = _score(loaded, ids, labels, settings, progress)
    scores.meta.setdefault("cost", {})["seconds_total"] = round(time.perf_counter() - started, 1)
    from prunekit.export.files import atomic_directory
    from prunekit.report.analysis import write_analysis_report

    with atomic_directory(out_dir, force=force, protected=source.local_paths) as tmp:
        scores.save(tmp / "scores.json")
        write_analysis_report(scores, model_structure(loaded), tmp, title=f"{criterion} analysis of {model}",
                              calibration={**asdict(calibration), "tokens": int(ids.numel()) if ids is not None else 0})
    return out_dir / "analysis.md"
