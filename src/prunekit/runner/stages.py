"""`prunekit run RECIPE.yaml`: the stages of a recipe, in order, each leaving its artifact and a
record in the run directory.

    run_dir/
      recipe.yaml              the recipe as resolved (overrides applied, `auto` sources chosen)
      records/<stage>.json     settings, seconds, versions and key figures of each finished stage
      analysis/  plan.json  model/  recovered/  eval.json  eval_dense.json  bench.json  export/  report.md

A stage whose record exists with the same settings is skipped, so running the recipe again
continues a killed run at the first unfinished stage (recovery also resumes inside the stage, from
its checkpoints). A finished stage whose settings changed is an error: results in one directory
never mix settings. Every artifact appears under its final name only when complete.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from prunekit.data.sources import SELF_SOURCE
from prunekit.export.files import atomic_directory, atomic_write_text
from prunekit.export.huggingface import save_model, versions
from prunekit.models.loading import load, load_skeleton, resolve_model_source
from prunekit.models.structure import ModelStructure, format_count, model_structure
from prunekit.plan.plan import Plan
from prunekit.plan.planner import check_reachable
from prunekit.runner.recipe import STAGE_ORDER, Recipe, RecipeError, load_recipe, resolve_auto

RECORDS_DIR = "records"
SELF_HELD_OUT_TOKENS = 16 * 256  # the original's text that evaluate's `self` perplexity scores
LOAD_SECONDS = 15  # each stage that loads the model (SmolLM2 from its GGUF file: 15 s)
# Rough sustained rates for the cost estimate of --dry-run (measured on this project's machines:
# BENCHMARKS.md, GPU_BENCHMARKS.md): a 2-core CPU runs SmolLM2's bf16 prefill at ~0.4 TFLOP/s and
# trains at ~0.15; it writes self text at ~170 tokens/s (0.05 TFLOP/s), an H200 at ~57,000
# (16 TFLOP/s: decoding is bound by kernel launches and the growing KV cache, not by arithmetic).
RATES = {"cpu": {"infer": 0.3e12, "train": 0.12e12, "sample": 0.05e12},
         "cuda": {"infer": 150e12, "train": 60e12, "sample": 16e12}}


def _has_local_data(data_dir: str | None) -> bool:
    from prunekit.demo import _has_local_data as has

    return has(data_dir)


def _final_model(run_dir: Path) -> Path:
    return run_dir / "recovered" if (run_dir / "recovered").is_dir() else run_dir / "model"


# ----------------------------------------------------------------------------- validation and cost


def validate_settings(recipe: Recipe) -> None:
    """Every check that needs neither the model nor the data files: the settings of each stage."""
    stages = set(recipe.stages)
    if {"plan", "prune"} & stages:
        recipe.prune.validate()
        if "plan" in stages and recipe.prune.steps != 1:
            raise RecipeError(f"the plan stage plans one step, but prune.steps={recipe.prune.steps}; drop the plan "
                              "stage (prune then plans each step itself) or set prune.steps to 1")
    if "analyze" in stages:
        from prunekit.score import get_criterion

        from prunekit.pipeline import check_run_options

        get_criterion(recipe.analyze.criterion).check_options(recipe.analyze.criterion_options)
        recipe.analyze.calibration.validate()
        check_run_options(recipe.analyze.criterion, recipe.analyze.device, recipe.analyze.layer_by_layer)
    if "recover" in stages:
        recipe.recover.validate()
    if "evaluate" in stages:
        unknown = [p for p in recipe.evaluate.ppl if p != SELF_SOURCE and not p.endswith((".txt", ".jsonl"))
                   and p not in ("wikitext2", "c4", "ptb")]
        if unknown:
            raise RecipeError(f"evaluate.ppl: unknown source {unknown[0]!r}; use wikitext2, c4, ptb, self, auto or a "
                              ".txt / .jsonl file")
    for stage in ("evaluate", "bench"):
        device = getattr(recipe, stage).device
        if stage in stages and device not in ("cpu", "cuda"):
            raise RecipeError(f"{stage}.device must be cpu or cuda, got {device!r}")


def validate(recipe: Recipe) -> ModelStructure:
    """validate_settings, then the checks that read the model's config (no weights) and the data
    files: that the model loads, its target is reachable and the evaluation tasks have their data."""
    validate_settings(recipe)
    for stage in ("evaluate", "bench"):  # here, not in validate_settings: a GPU recipe still parses anywhere
        if stage in recipe.stages and getattr(recipe, stage).device == "cuda" and not torch.cuda.is_available():
            raise RecipeError(f"{stage}.device is cuda, but torch finds no CUDA GPU here; set {stage}.device=cpu")
    structure = model_structure(load_skeleton(resolve_model_source(recipe.model)))
    if {"plan", "prune"} & set(recipe.stages):
        check_reachable(structure, recipe.prune.planner_settings())
    if "evaluate" in recipe.stages and recipe.evaluate.tasks:
        from prunekit.evaluate.run import _check_tasks

        _check_tasks(list(recipe.evaluate.tasks), recipe.data_dir)
    return structure


def estimate(recipe: Recipe, structure: ModelStructure, *, gpu: bool) -> list[tuple[str, str, float]]:
    """(stage, what it does, rough seconds) for each stage: forward FLOPs per token times tokens over
    the RATES of the stage's device (recovery trains on the GPU when there is one, `gpu`), plus the
    writing of self text where a stage's data is the model's own."""
    flops = structure.flops_per_token(512)
    prune, recover, evaluate = recipe.prune, recipe.recover, recipe.evaluate

    def rate(device: str | None, kind: str) -> float:
        return RATES["cuda" if (device or "cpu").startswith("cuda") else "cpu"][kind]

    def sampling(source: str, tokens: int, device: str | None) -> float:
        return flops * tokens / rate(device, "sample") if source == SELF_SOURCE else 0.0

    calib = prune.calibration.n_samples * prune.calibration.seq_len
    rows = []
    for stage in recipe.stages:
        if stage == "analyze":
            a = recipe.analyze
            tokens = a.calibration.n_samples * a.calibration.seq_len
            passes = 232 if a.criterion == "sensitivity" else 3  # BENCHMARKS.md: sensitivity cost
            what = f"{a.criterion} scores on {tokens:,} tokens"
            seconds = passes * flops * tokens / rate(a.device, "infer") + sampling(a.calibration.source, tokens, a.device)
        elif stage == "plan":
            what = f"{prune.criterion} scores on {calib:,} tokens, plan to {prune.target:.0%}"
            seconds = (3 * flops * calib / rate(prune.device, "train")
                       + sampling(prune.calibration.source, calib, prune.device))
        elif stage == "prune":
            work = 3 * prune.steps + (2 if prune.compensation == "sequential" else 1)
            what = (f"{prune.steps} step(s) of {prune.criterion} + {prune.compensation} compensation, "
                    f"{prune.target:.0%} of {prune.basis}")
            seconds = (work * flops * calib / rate(prune.device, "train")
                       + sampling(prune.calibration.source, calib, prune.device))
        elif stage == "recover":
            device = "cuda" if gpu else "cpu"
            teacher = 1 / 3 if recover.needs_teacher else 0  # a teacher forward is a third of a training step
            written = recover.tokens + recover.data.held_out * recover.data.seq_len
            what = f"{recover.method}, {recover.tokens:,} tokens on {device}"
            seconds = ((1 - prune.target) * (1 + teacher) * 3 * flops * recover.tokens / rate(device, "train")
                       + sampling(recover.data.source, written, device))
        elif stage == "evaluate":
            tokens = sum(300_000 // evaluate.window_every if p != SELF_SOURCE else SELF_HELD_OUT_TOKENS
                         for p in evaluate.ppl)
            tokens += len(evaluate.tasks) * (evaluate.limit or 2000) * 4 * 100
            written = SELF_HELD_OUT_TOKENS if SELF_SOURCE in evaluate.ppl else 0  # sampled once, for both models
            what = f"perplexity on {', '.join(evaluate.ppl) or '-'}; tasks {', '.join(evaluate.tasks) or '-'}"
            seconds = ((2 if evaluate.dense else 1) * flops * tokens / rate(evaluate.device, "infer")
                       + flops * written / rate(evaluate.device, "sample"))
        elif stage == "bench":
            b = recipe.bench
            tokens = b.repeats * (b.prefill_batch * b.prefill_len + sum(b.decode_batches) * b.decode_tokens * 20)
            what = f"speed on {b.device}" + (", beside the original" if b.baseline else "")
            seconds = (2 if b.baseline else 1) * flops * tokens / rate(b.device, "infer")
        else:
            rows.append((stage, {"export": f"final model to {recipe.export.name}/",
                                 "report": "report.md with tables and figures"}[stage], 5.0))
            continue
        rows.append((stage, what, LOAD_SECONDS + seconds))
    return rows


def format_estimate(rows: list[tuple[str, str, float]]) -> str:
    def human(seconds: float) -> str:
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"

    width = max(len(what) for _, what, _ in rows)
    lines = [f"{'stage':9s} {'what':{width}s}  rough time"]
    lines += [f"{stage:9s} {what:{width}s}  ~{human(seconds)}" for stage, what, seconds in rows]
    lines.append(f"{'total':9s} {'':{width}s}  ~{human(sum(s for *_, s in rows))}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stages


def _stage_analyze(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.pipeline import analyze

    a = recipe.analyze
    report = analyze(recipe.model, run_dir / "analysis", criterion=a.criterion, criterion_options=a.criterion_options,
                     calibration=a.calibration, batch_size=a.batch_size, dtype=recipe.dtype, force=True,
                     device=a.device, layer_by_layer=a.layer_by_layer)
    return {"report": str(report.relative_to(run_dir))}


def _stage_plan(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.pipeline import load_device, plan_loaded

    model, tokenizer = load(recipe.model, dtype=recipe.dtype,
                            device=load_device(recipe.prune.device, recipe.prune.layer_by_layer))
    plan, _ = plan_loaded(model, tokenizer, recipe.prune)
    plan.save(run_dir / "plan.json")
    return {"plan": "plan.json", "drop_layers": list(plan.drop_layers)}


def _stage_prune(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.pipeline import load_device, prune_loaded

    model, tokenizer = load(recipe.model, dtype=recipe.dtype,
                            device=load_device(recipe.prune.device, recipe.prune.layer_by_layer))
    plan = Plan.load(run_dir / "plan.json") if "plan" in recipe.stages else None
    record = prune_loaded(model, tokenizer, recipe.prune, plan=plan)
    model.to("cpu")  # saved from CPU memory
    source = resolve_model_source(recipe.model)
    plans = [s["plan"] for s in record["steps"]]
    save_model(model, tokenizer, run_dir / "model", plan=Plan.from_dict(plans[-1]) if len(plans) == 1 else None,
               source=recipe.model, protected=source.local_paths, force=True,
               extra_provenance={"pruning": {k: v for k, v in record.items() if k != "scores"}})
    return {"removed": record["removed"], "params": record["params"]}


def _stage_recover(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.recover import recover

    saved = recover(run_dir / "model", run_dir / "recovered", recipe.recover, teacher=recipe.teacher or recipe.model,
                    resume=True, force=True, dtype=recipe.dtype)
    record = json.loads((saved.path / "prunekit.json").read_text())["recovery"]
    return {"held_out_perplexity": record["eval"], "tokens": record["tokens"],
            "tokens_per_second": record["tokens_per_second"]}


def _self_perplexities(model_specs: list[str | Path], recipe: Recipe) -> list[float]:
    """Perplexity of each model on one held-out sample of the original model's own text (sampled
    once for all of them: sampling costs more than scoring here)."""
    from prunekit.data import calibration_tokens
    from prunekit.evaluate.perplexity import perplexity

    device = recipe.evaluate.device
    original, tokenizer = load(recipe.model, dtype=recipe.dtype, device=device)
    held_out = calibration_tokens(SELF_SOURCE, tokenizer, n_samples=SELF_HELD_OUT_TOKENS // 256, seq_len=256,
                                  seed=1234, model=original)
    values = []
    for spec in model_specs:
        model = original if str(spec) == recipe.model else load(spec, dtype=recipe.dtype, device=device)[0]
        values.append(perplexity(model, tokenizer, dataset=held_out.reshape(-1), seq_len=256, progress=False).perplexity)
    return values


def _stage_evaluate(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.evaluate.run import evaluate_model

    e = recipe.evaluate
    figures: dict[str, Any] = {}
    texts = [p for p in e.ppl if p != SELF_SOURCE]
    targets = [("final", _final_model(run_dir), "eval.json")] + ([("original", recipe.model, "eval_dense.json")]
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


def _stage_bench(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.evaluate.run import bench_models

    b = recipe.bench
    report = bench_models(_final_model(run_dir), baseline=recipe.model if b.baseline else None, device=b.device,
                          dtype=b.dtype, prefill_batch=b.prefill_batch, prefill_len=b.prefill_len,
                          decode_batches=b.decode_batches, decode_tokens=b.decode_tokens, repeats=b.repeats,
                          json_out=run_dir / "bench.json")
    speed = report["speed"]
    return {"ideal_speedup": speed.get("ideal_speedup"),
            "speedup": {k: v["median"] for k, v in (speed.get("speedup") or {}).items()}}


def _stage_export(recipe: Recipe, run_dir: Path) -> dict:
    final = _final_model(run_dir)
    with atomic_directory(run_dir / recipe.export.name, force=True) as tmp:
        shutil.copytree(final, tmp, dirs_exist_ok=True)
    return {"from": final.name, "to": recipe.export.name}


def _stage_report(recipe: Recipe, run_dir: Path) -> dict:
    from prunekit.report.run_report import write_run_report

    return {"report": write_run_report(run_dir).name}


STAGES: dict[str, Callable[[Recipe, Path], dict]] = {
    "analyze": _stage_analyze, "plan": _stage_plan, "prune": _stage_prune, "recover": _stage_recover,
    "evaluate": _stage_evaluate, "bench": _stage_bench, "export": _stage_export, "report": _stage_report,
}
assert tuple(STAGES) == STAGE_ORDER
# The recipe sections each stage depends on: a stage re-runs (or refuses) when one of them changes.
STAGE_INPUTS = {"analyze": ("model", "dtype", "analyze"), "plan": ("model", "dtype", "prune"),
                "prune": ("model", "dtype", "prune"), "recover": ("model", "dtype", "prune", "recover", "teacher"),
                "evaluate": ("model", "dtype", "prune", "recover", "evaluate"),
                "bench": ("model", "dtype", "prune", "recover", "bench"), "export": ("model", "prune", "recover", "export"),
                "report": ()}


# ----------------------------------------------------------------------------- the runner


def run(recipe: str | Path | dict | Recipe, run_dir: str | Path, *, overrides: tuple[str, ...] = (),
        dry_run: bool = False, progress_print: Callable[[str], None] = print) -> dict:
    """Run (or with dry_run, only validate and estimate) a recipe into `run_dir`; returns the records."""
    loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe, overrides)
    loaded = resolve_auto(loaded, _has_local_data(loaded.data_dir))
    structure = validate(loaded)
    run_dir = Path(run_dir)
    progress_print(format_estimate(estimate(loaded, structure, gpu=torch.cuda.is_available())))
    if dry_run:
        return {"dry_run": True, "recipe": loaded.to_dict()}
    source_paths = resolve_model_source(loaded.model).local_paths
    if any(run_dir.resolve() == p.resolve() or p.resolve() in run_dir.resolve().parents for p in source_paths):
        raise RecipeError(f"the run directory {run_dir} lies inside the model {loaded.model}; choose another")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RECORDS_DIR).mkdir(exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(loaded.to_dict(), sort_keys=False))
    settings = loaded.to_dict()
    records = {}
    for stage in loaded.stages:
        inputs = {key: settings[key] for key in STAGE_INPUTS[stage]}
        path = run_dir / RECORDS_DIR / f"{stage}.json"
        if path.is_file():
            previous = json.loads(path.read_text())
            if previous["inputs"] == inputs:
                progress_print(f"[{stage}] done before ({previous['seconds']:.0f} s): skipped")
                records[stage] = previous
                continue
            changed = sorted(k for k in inputs if previous["inputs"].get(k) != inputs[k])
            raise RecipeError(f"stage {stage} finished in {run_dir} with other settings ({', '.join(changed)}); use a "
                              f"new run directory, or delete {path} to run it again")
        progress_print(f"[{stage}] running")
        started = time.perf_counter()
        figures = STAGES[stage](loaded, run_dir)
        record = {"stage": stage, "inputs": inputs, "seconds": round(time.perf_counter() - started, 1),
                  "versions": versions(), "figures": figures}
        atomic_write_text(path, json.dumps(record, indent=1, default=str) + "\n")  # last: the stage is done
        records[stage] = record
        progress_print(f"[{stage}] done in {record['seconds']:.0f} s")
    summary = format_summary(records)
    if summary:
        progress_print(summary)
    if "report" in records:
        progress_print(f"report: {run_dir / records['report']['figures']['report']}")
    return records


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
