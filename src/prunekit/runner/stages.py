"""`prunekit run RECIPE.yaml`: the stages of a recipe, in order, each leaving its artifact and a
record in the run directory.

    run_dir/
      recipe.yaml              the recipe as resolved (overrides applied, `auto` sources chosen)
      records/<stage>.json     settings, seconds, versions and key figures of each finished stage
      analysis/  plan.json  model/  recovered/  eval.json  eval_dense.json  bench.json  export/  report.md

Each stage is one `Stage`: a preflight and a run. The run calls the same function as the
single-stage command (`prunekit analyze`, `prune`, `recover`, `eval`, `bench`, `export`,
`report`), with paths in the run directory. Before the first stage runs, every stage is
preflighted (settings, data, reachability of the target, memory on its device for the shapes it
will see, disk for what it writes), so a recipe whose last stage cannot run is refused in
seconds; `--dry-run` prints the preflights and stops. Between stages, whatever a stage put on a
device is released, so the next stage sees the device's real free memory.

A stage whose record exists with the same settings is skipped, so running the recipe again
continues a killed run at the first unfinished stage (recovery also resumes inside the stage, from
its checkpoints). A finished stage whose settings changed is an error: results in one directory
never mix settings. Every artifact appears under its final name only when complete.
"""
from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from prunekit.data.sources import SELF_SOURCE
from prunekit.errors import PrunekitError
from prunekit.evaluate import self_text
from prunekit.export.files import atomic_directory, atomic_write_text, remove_stale_temporaries
from prunekit.export.huggingface import versions
from prunekit.models.loading import load, load_skeleton, resolve_model_source
from prunekit.models.structure import ModelStructure, format_count, model_structure
from prunekit.pipeline import LOAD_SECONDS, analyze_settings, canonical_dtype, rate
from prunekit.plan.plan import Plan
from prunekit.preflight import Machine, Preflight, check_all, format_preflights
from prunekit.runner.recipe import STAGE_ORDER, Recipe, RecipeError, has_local_data, load_recipe, resolve_auto

RECORDS_DIR = "records"
ANALYSIS_DIR = "analysis"


def final_model(run_dir: Path) -> Path:
    """The model a run ends with: the recovered one when there is one, else the pruned one."""
    return run_dir / "recovered" if (run_dir / "recovered").is_dir() else run_dir / "model"


def release_devices() -> None:
    """Free what the last stage left: unreachable models and their cached device blocks, so that
    the next stage's preflight and memory checks see the device's real free memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Context:
    """What the preflight of a stage knows: the recipe's model, its shape and the shape each earlier
    stage will leave (`leaves`), where the run goes and the machine it is checked against."""

    recipe: Recipe
    run_dir: Path
    machine: Machine
    structure: ModelStructure
    leaves: ModelStructure

    @property
    def gpu(self) -> bool:
        return self.machine.has_gpu


@dataclass(frozen=True)
class Stage:
    name: str
    inputs: tuple[str, ...]                          # the recipe sections it depends on: it re-runs (or refuses) when one changes
    preflight: Callable[[Context], Preflight]
    run: Callable[[Recipe, Path], dict]              # returns the figures its record keeps
    label: str = ""                                  # shown after its name in the progress lines


# ----------------------------------------------------------------------------- analyze


def _analyze_settings(recipe: Recipe):
    a = recipe.analyze
    return analyze_settings(a.criterion, a.criterion_options, a.calibration, a.batch_size, a.device, a.layer_by_layer)


def _preflight_analyze(context: Context) -> Preflight:
    from prunekit.pipeline import preflight_analyze

    source = resolve_model_source(context.recipe.model)
    return preflight_analyze(source, _analyze_settings(context.recipe), context.recipe.dtype,
                             structure=context.structure)


def _run_analyze(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.pipeline import analyze

    a = recipe.analyze
    report = analyze(recipe.model, run_dir / ANALYSIS_DIR, criterion=a.criterion, criterion_options=a.criterion_options,
                     calibration=a.calibration, batch_size=a.batch_size, dtype=recipe.dtype, force=True,
                     device=a.device, layer_by_layer=a.layer_by_layer)
    return {"report": str(report.relative_to(run_dir))}


# ----------------------------------------------------------------------------- plan and prune


def _scores_from_analysis(recipe: Recipe) -> bool:
    """The analyze stage computes exactly what prune would score first (same criterion, options,
    calibration and batch): prune then plans from its scores.json instead of scoring again."""
    a, p = recipe.analyze, recipe.prune
    return ("analyze" in recipe.stages and p.scores is None and p.steps == 1 and a.criterion == p.criterion
            and _analyze_settings(recipe).criterion_options == p.criterion_options and a.calibration == p.calibration
            and a.batch_size == p.batch_size)


def prune_settings(recipe: Recipe, run_dir: Path):
    if _scores_from_analysis(recipe):
        return dataclasses.replace(recipe.prune, scores=str(run_dir / ANALYSIS_DIR / "scores.json"))
    return recipe.prune


def _preflight_plan(context: Context) -> Preflight:
    from prunekit.pipeline import preflight_prune

    recipe = context.recipe
    if recipe.prune.steps != 1:
        raise RecipeError(f"the plan stage plans one step, but prune.steps={recipe.prune.steps}; drop the plan "
                          "stage (prune then plans each step itself) or set prune.steps to 1")
    settings = dataclasses.replace(recipe.prune, compensation="none", scores=None)
    preflight = preflight_prune(resolve_model_source(recipe.model), settings, recipe.dtype, structure=context.structure,
                                stage="plan")
    return dataclasses.replace(preflight, what=f"{settings.criterion} scores, a plan to {settings.target:.0%} of "
                                               f"{settings.basis}")


def _run_plan(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.pipeline import load_device, plan_loaded

    model, tokenizer = load(recipe.model, dtype=recipe.dtype,
                            device=load_device(recipe.prune.device, recipe.prune.layer_by_layer))
    plan, _ = plan_loaded(model, tokenizer, recipe.prune)
    plan.save(run_dir / "plan.json")
    return {"plan": "plan.json", "drop_layers": list(plan.drop_layers)}


def _preflight_prune(context: Context) -> Preflight:
    from prunekit.pipeline import preflight_prune

    recipe = context.recipe
    settings = recipe.prune
    if _scores_from_analysis(recipe):  # its file is written by the analyze stage; check the rest now
        settings = dataclasses.replace(settings, scores=None)
    preflight = preflight_prune(resolve_model_source(recipe.model), settings, recipe.dtype,
                                structure=context.structure)
    if "plan" in recipe.stages or _scores_from_analysis(recipe):
        from prunekit.pipeline import memory_needs

        source = "the plan stage's plan.json" if "plan" in recipe.stages else "the analyze stage's scores.json"
        preflight = dataclasses.replace(preflight, needs=memory_needs(context.structure, recipe.dtype, settings,
                                                                     scoring=False),
                                        what=f"from {source}: {settings.compensation} compensation, cut, save")
    return preflight


def _run_prune(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.pipeline import prune

    plan = Plan.load(run_dir / "plan.json") if "plan" in recipe.stages else None
    saved = prune(recipe.model, run_dir / "model", prune_settings(recipe, run_dir), plan=plan, force=True,
                  dtype=recipe.dtype)
    pruning = json.loads((saved.path / "prunekit.json").read_text())["pruning"]
    return {"removed": pruning["removed"], "params": pruning["params"]}


# ----------------------------------------------------------------------------- recover


def _preflight_recover(context: Context) -> Preflight:
    from prunekit.recover.run import preflight_recover

    recipe = context.recipe
    teacher = context.structure if recipe.teacher is None else model_structure(
        load_skeleton(resolve_model_source(recipe.teacher)))
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.recover.shard and processes < 2:
        from prunekit.recover.train import SHARD_NEEDS_LAUNCHER, RecoveryError

        raise RecoveryError(SHARD_NEEDS_LAUNCHER)
    return preflight_recover(context.leaves, teacher if recipe.recover.needs_teacher else None, recipe.recover,
                             canonical_dtype(recipe.dtype), gpu=context.gpu, processes=processes)


def _run_recover(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.recover import recover

    saved = recover(run_dir / "model", run_dir / "recovered", recipe.recover, teacher=recipe.teacher or recipe.model,
                    resume=True, force=True, dtype=recipe.dtype)
    record = json.loads((saved.path / "prunekit.json").read_text())["recovery"]
    return {"held_out_perplexity": record["eval"], "tokens": record["tokens"],
            "tokens_per_second": record["tokens_per_second"]}


# ----------------------------------------------------------------------------- evaluate


def _texts(recipe: Recipe) -> list[str]:
    return [p for p in recipe.evaluate.ppl if p != SELF_SOURCE]


def _preflight_evaluate(context: Context) -> Preflight:
    from prunekit.evaluate.run import preflight_evaluate

    recipe, e = context.recipe, context.recipe.evaluate
    if e.device == "cuda" and not context.gpu:
        raise RecipeError("evaluate.device is cuda, but torch finds no CUDA GPU here; set evaluate.device=cpu")
    structures = [context.leaves] + ([context.structure] if e.dense else [])
    uses_self = SELF_SOURCE in e.ppl
    written = self_text.TOKENS if uses_self else 0  # sampled once, for both models
    extra = context.structure.flops_per_token(512) * written / rate(e.device, "sample")
    if not _texts(recipe) and not e.tasks:  # only the model's own text
        return Preflight("evaluate", "perplexity on self", LOAD_SECONDS * len(structures) + extra)
    return preflight_evaluate(recipe.model, structures, ppl=_texts(recipe) or (), seq_len=e.seq_len,
                              window_every=e.window_every, tasks=e.tasks, limit=e.limit, dtype=e.dtype,
                              data_dir=recipe.data_dir, device=e.device, extra_seconds=extra)


def _self_perplexities(model_specs: list[str | Path], recipe: Recipe) -> list[float]:
    """Perplexity of each model on one held-out sample of the original model's own text (sampled
    once for all of them: sampling costs more than scoring here)."""
    device = recipe.evaluate.device
    original, tokenizer = load(recipe.model, dtype=recipe.dtype, device=device)
    held_out = self_text.held_out_self_tokens(original, tokenizer)
    values = []
    for spec in model_specs:
        model = original if str(spec) == recipe.model else load(spec, dtype=recipe.dtype, device=device)[0]
        values.append(self_text.self_perplexity(model, tokenizer, held_out))
        del model
    return values


def _run_evaluate(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.evaluate.run import evaluate_model

    e = recipe.evaluate
    figures: dict[str, Any] = {}
    texts = _texts(recipe)
    targets = [("final", final_model(run_dir), "eval.json")] + ([("original", recipe.model, "eval_dense.json")]
                                                                 if e.dense else [])
    for name, model, file in targets:
        if texts or e.tasks:
            report = evaluate_model(model, ppl=texts, seq_len=e.seq_len, window_every=e.window_every, tasks=e.tasks,
                                    limit=e.limit, dtype=e.dtype, data_dir=recipe.data_dir, json_out=run_dir / file,
                                    device=e.device)
            figures[name] = {**{f"ppl_{k}": round(v["perplexity"], 3) for k, v in report["perplexity"].items()},
                             **{f"task_{k}": v for k, v in report.get("tasks", {}).items()}}
    if SELF_SOURCE in e.ppl:
        for (name, _, _), value in zip(targets, _self_perplexities([model for _, model, _ in targets], recipe)):
            figures.setdefault(name, {})["ppl_self_held_out"] = round(value, 3)
    return figures


# ----------------------------------------------------------------------------- bench


def _bench_options(recipe: Recipe) -> dict:
    b = recipe.bench
    return dict(device=b.device, dtype=b.dtype, prefill_batch=b.prefill_batch, prefill_len=b.prefill_len,
                decode_batches=b.decode_batches, decode_tokens=b.decode_tokens, repeats=b.repeats, decode=b.decode)


def _preflight_bench(context: Context) -> Preflight:
    from prunekit.evaluate.run import preflight_bench

    recipe = context.recipe
    if recipe.bench.device == "cuda" and not context.gpu:
        raise RecipeError("bench.device is cuda, but torch finds no CUDA GPU here; set bench.device=cpu")
    structures = [context.leaves] + ([context.structure] if recipe.bench.baseline else [])
    return preflight_bench(recipe.model, structures, **_bench_options(recipe))


def _run_bench(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.evaluate.run import bench_models

    report = bench_models(final_model(run_dir), baseline=recipe.model if recipe.bench.baseline else None,
                          json_out=run_dir / "bench.json", **_bench_options(recipe))
    speed = report["speed"]
    return {"ideal_speedup": speed.get("ideal_speedup"), "decode": speed["settings"]["decode"],
            "speedup": {k: v["median"] for k, v in (speed.get("speedup") or {}).items()}}


# ----------------------------------------------------------------------------- export and report


def _preflight_export(context: Context) -> Preflight:
    x = context.recipe.export
    if x.format == "gguf":  # the checks export_gguf makes, on the original (the pruned model keeps its family)
        from prunekit.export.gguf import check_config, check_quant, tokenizer_metadata
        from prunekit.models.loading import load_config, load_tokenizer

        check_quant(x.quant)
        source = resolve_model_source(context.recipe.model)
        config = load_config(source)
        check_config(config)
        tokenizer_metadata(load_tokenizer(source), config.vocab_size)
        size = context.leaves.total_params * {"f16": 2, "q8_0": 1.07, "q4_k_m": 0.7}.get(x.quant, 2)
        return Preflight("export", f"llama.cpp GGUF ({x.quant}) to {x.name}.gguf", 5.0 + context.leaves.total_params
                         / 5e7, disk_bytes=int(size))
    return Preflight("export", f"final model to {x.name}/ (hard links: no second copy)", 1.0)


def link_tree(source: Path, destination: Path) -> None:
    """`destination` as a tree of hard links to the files of `source` (no second copy on disk);
    where the two lie on different disks, a copy."""
    import shutil

    for path in sorted(source.rglob("*")):
        target = destination / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise
            shutil.copy2(path, target)


def _run_export(recipe: Recipe, run_dir: Path) -> dict:
    final, x = final_model(run_dir), recipe.export
    if x.format == "gguf":
        from prunekit.export.gguf import export_gguf

        written = export_gguf(final, run_dir / f"{x.name}.gguf", quant=x.quant, force=True)
        return {"from": final.name, "to": f"{x.name}.gguf", "bytes": Path(written.path).stat().st_size}
    from prunekit.export.model_card import refresh_run_card

    refresh_run_card(run_dir)  # the card with the figures of the stages before (evaluate, bench)
    with atomic_directory(run_dir / x.name, force=True) as tmp:
        link_tree(final, tmp)
    return {"from": final.name, "to": x.name}


def _preflight_report(context: Context) -> Preflight:
    return Preflight("report", "report.md with tables and figures", 5.0)


def _run_report(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.report.run_report import write_run_report

    return {"report": write_run_report(run_dir).name}


STAGES: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("analyze", ("model", "dtype", "analyze"), _preflight_analyze, _run_analyze),
    Stage("plan", ("model", "dtype", "prune"), _preflight_plan, _run_plan),
    Stage("prune", ("model", "dtype", "prune"), _preflight_prune, _run_prune),
    Stage("recover", ("model", "dtype", "prune", "recover", "teacher"), _preflight_recover, _run_recover),
    Stage("evaluate", ("model", "dtype", "prune", "recover", "evaluate"), _preflight_evaluate, _run_evaluate),
    Stage("bench", ("model", "dtype", "prune", "recover", "bench"), _preflight_bench, _run_bench),
    Stage("export", ("model", "prune", "recover", "export"), _preflight_export, _run_export),
    Stage("report", (), _preflight_report, _run_report),
)}
assert tuple(STAGES) == STAGE_ORDER


# ----------------------------------------------------------------------------- validation and preflight


def validate_settings(recipe: Recipe) -> None:
    """Every check that needs neither the model nor the data files: the settings of each stage."""
    stages = set(recipe.stages)
    if {"plan", "prune"} & stages:
        recipe.prune.validate()
        if "plan" in stages and recipe.prune.steps != 1:
            raise RecipeError(f"the plan stage plans one step, but prune.steps={recipe.prune.steps}; drop the plan "
                              "stage (prune then plans each step itself) or set prune.steps to 1")
    if "analyze" in stages:
        _analyze_settings(recipe)
    if "recover" in stages:
        recipe.recover.validate()
    if "evaluate" in stages:
        from prunekit.evaluate.run import check_eval_options

        e = recipe.evaluate
        if not e.ppl and not e.tasks:
            raise RecipeError("evaluate names no text (evaluate.ppl) and no task (evaluate.tasks); name one, or drop "
                              "the evaluate stage")
        if _texts(recipe):  # names and ranges here; the tasks' data, the device and the texts in the preflight
            check_eval_options(ppl=_texts(recipe), seq_len=e.seq_len, stride=None, window_every=e.window_every,
                               tasks=(), limit=None, dtype=e.dtype, batch_size=8, device="cpu", data_dir=None)
    for stage in ("evaluate", "bench"):
        device = getattr(recipe, stage).device
        if stage in stages and device not in ("cpu", "cuda"):
            raise RecipeError(f"{stage}.device must be cpu or cuda, got {device!r}")
    if "export" in stages and recipe.export.format not in ("huggingface", "gguf"):
        raise RecipeError(f"export.format must be huggingface (hard links to the final model) or gguf, got "
                          f"{recipe.export.format!r}")


def recipe_stages(recipe: Recipe) -> list[Stage]:
    """The stages a recipe runs, in order; with a schedule, prune and recover become its rounds."""
    if recipe.schedule is None:
        return [STAGES[name] for name in recipe.stages]
    from prunekit.runner.schedule import round_stages

    place = {name: STAGE_ORDER.index(name) for name in recipe.stages}
    before = [STAGES[name] for name in recipe.stages if place[name] < STAGE_ORDER.index("prune")]
    after = [STAGES[name] for name in recipe.stages if place[name] > STAGE_ORDER.index("recover")]
    return before + round_stages(recipe) + after


def preflight(recipe: Recipe, run_dir: Path, machine: Machine | None = None) -> list[Preflight]:
    """Validate the recipe and preflight every stage, in order, before any runs: each stage sees the
    shape the earlier ones leave. Raises the first problem; checks memory and disk on `machine`
    (this one by default)."""
    validate_settings(recipe)
    machine = machine or Machine.here(run_dir)
    structure = model_structure(load_skeleton(resolve_model_source(recipe.model)))
    context = Context(recipe, run_dir, machine, structure, structure)
    preflights = []
    for stage in recipe_stages(recipe):
        try:
            result = stage.preflight(context)
        except PrunekitError as error:  # say which stage of the recipe it is about
            where = f"the {stage.name} stage{stage.label}"
            error.args = (f"{where}: {error.args[0]}", *error.args[1:]) if error.args else error.args
            raise
        preflights.append(result)
        if stage.name.partition("@")[0] == "prune" and result.leaves is not None:
            context = dataclasses.replace(context, leaves=result.leaves)
    check_all(preflights, machine, recipe.model, run_dir)
    return preflights


# ----------------------------------------------------------------------------- the runner


def run(recipe: str | Path | dict | Recipe, run_dir: str | Path, *, overrides: tuple[str, ...] = (),
        dry_run: bool = False, progress_print: Callable[[str], None] = print, machine: Machine | None = None) -> dict:
    """Run (or with dry_run, only preflight) a recipe into `run_dir`; returns the records."""
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    loaded = resolve_auto(loaded, has_local_data(loaded.data_dir))
    run_dir = Path(run_dir)
    source_paths = resolve_model_source(loaded.model).local_paths
    if any(run_dir.resolve() == p.resolve() or p.resolve() in run_dir.resolve().parents for p in source_paths):
        raise RecipeError(f"the run directory {run_dir} lies inside the model {loaded.model}; choose another")
    stages = recipe_stages(loaded)
    pending = [s.name for s in stages if not _finished(run_dir, s, loaded)]
    preflights = preflight(loaded, run_dir, machine)
    shown = [p for p in preflights if p.stage in pending] or preflights
    progress_print(format_preflights(shown))
    if dry_run:
        return {"dry_run": True, "recipe": loaded.to_dict(), "preflight": [_plain(p) for p in preflights]}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECORDS_DIR).mkdir(exist_ok=True)
    for folder in (run_dir, run_dir / RECORDS_DIR):  # what a killed run was writing: it starts again
        remove_stale_temporaries(folder)
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(loaded.to_dict(), sort_keys=False))
    records = {}
    for stage in stages:
        inputs = _inputs(loaded, stage)
        path = run_dir / RECORDS_DIR / f"{stage.name}.json"
        previous = _finished(run_dir, stage, loaded)
        if previous:
            progress_print(f"[{stage.name}] done before ({previous['seconds']:.0f} s): skipped")
            records[stage.name] = previous
            continue
        progress_print(f"[{stage.name}] running{stage.label}")
        started = time.perf_counter()
        figures = stage.run(loaded, run_dir)
        release_devices()
        record = {"stage": stage.name, "inputs": inputs, "seconds": round(time.perf_counter() - started, 1),
                  "versions": versions(), "figures": figures}
        atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")  # last: the stage is done
        records[stage.name] = record
        progress_print(f"[{stage.name}] done in {record['seconds']:.0f} s{stage.label}")
    if final_model(run_dir).is_dir() and "export" not in records:  # the card carries the figures the run measured
        from prunekit.export.model_card import refresh_run_card

        refresh_run_card(run_dir)
    summary = format_summary(_last_round_as_stages(records, loaded))
    if summary:
        progress_print(summary)
    if "report" in records:
        progress_print(f"report: {run_dir / records['report']['figures']['report']}")
    return records


def _inputs(recipe: Recipe, stage: Stage) -> dict:
    settings = recipe.to_dict()
    keys = stage.inputs
    if recipe.schedule is not None and {"prune", "recover"} & set(keys) and "schedule" not in keys:
        keys += ("schedule",)  # what comes after the rounds depends on them (absent without one: old records match)
    return {key: settings[key] for key in keys}


def _finished(run_dir: Path, stage: Stage, recipe: Recipe) -> dict | None:
    """The record of `stage` when it finished with these settings; None when it has not run.
    A record with other settings is an error: results in one directory never mix settings."""
    path = run_dir / RECORDS_DIR / f"{stage.name}.json"
    if not path.is_file():
        return None
    previous, inputs = json.loads(path.read_text()), _inputs(recipe, stage)
    if previous["inputs"] == inputs:
        return previous
    changed = sorted(k for k in inputs if previous["inputs"].get(k) != inputs[k])
    raise RecipeError(f"stage {stage.name} finished in {run_dir} with other settings ({', '.join(changed)}); use a "
                      f"new run directory, or delete {path} to run it again")


def _last_round_as_stages(records: dict, recipe: Recipe) -> dict:
    """With a schedule, the last round's records as those of prune and recover: its prune record
    counts against the original model, so the summary compares the original with the final model."""
    if recipe.schedule is None:
        return records
    last = recipe.schedule.rounds
    return {**records, **{name: records[f"{name}@{last}"] for name in ("prune", "recover") if f"{name}@{last}" in records}}


def _plain(preflight: Preflight) -> dict:
    return {"stage": preflight.stage, "what": preflight.what, "seconds": round(preflight.seconds, 1),
            "memory": {need.device: need.estimate.total for need in preflight.needs}, "disk": preflight.disk_bytes}


def format_summary(records: dict) -> str:
    """The before/after table of a finished run, from its stage records (empty when no stage measured anything)."""
    rows = []
    prune = records.get("prune", {}).get("figures", {})
    if prune.get("params"):
        params = prune["params"]
        rows.append(("parameters", format_count(params["before"]), format_count(params["after"])))
        rows.append(("non-embedding parameters", format_count(params["non_embedding_before"]),
                     format_count(params["non_embedding_after"])))
    evaluate = records.get("evaluate", {}).get("figures", {})
    final, original = evaluate.get("final", {}), evaluate.get("original", {})
    for key in sorted(set(final) | set(original)):
        if key.startswith("ppl_"):
            cell = lambda figures: f"{figures[key]:.2f}" if key in figures else "–"  # noqa: E731
            rows.append((f"perplexity, {key[4:].replace('_', ' ')}", cell(original), cell(final)))
    held_out = records.get("recover", {}).get("figures", {}).get("held_out_perplexity") or []
    if held_out:
        rows.append(("recovery: held-out perplexity", f"{held_out[0][1]:.2f} (pruned)", f"{held_out[-1][1]:.2f}"))
    bench = records.get("bench", {}).get("figures", {})
    for metric, value in (bench.get("speedup") or {}).items():
        rows.append((f"speed: {metric.replace('_', ' ')}", "1.00x", f"{value:.2f}x"))
    if bench.get("ideal_speedup"):
        rows.append(("speed: ideal (FLOPs per token)", "1.00x", f"{bench['ideal_speedup']:.2f}x"))
    if not rows:
        return ""
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':<{width}}  {'original':>16}  {'final':>20}"]
    lines += [f"{name:<{width}}  {before:>16}  {after:>20}" for name, before, after in rows]
    return "\n".join(lines)


__all__ = ["STAGES", "Context", "Stage", "final_model", "format_summary", "link_tree", "preflight", "recipe_stages",
           "release_devices", "run", "validate_settings"]
