"""`prunekit sweep`: score once, prune at several targets, and draw quality and speed against size,
so that the ratio is picked from a picture rather than guessed.

    sweep("smollm2-135m", "runs/sweep", SweepSettings(targets=(0.1, 0.2, 0.3, 0.4, 0.5)))

writes sweep.json (every figure), sweep.md (the table) and two figures: perplexity against the
share removed (the dense model marked) and measured speedup against it (ideal from FLOPs beside).
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from prunekit.data import NAMED_SOURCES, SELF_SOURCE, DataError
from prunekit.evaluate import self_text
from prunekit.evaluate.perplexity import perplexity
from prunekit.evaluate.speed import benchmark_speed
from prunekit.export.files import atomic_directory, check_output_dir
from prunekit.models.loading import load, load_skeleton, resolve_model_source
from prunekit.models.structure import model_structure
from prunekit.pipeline import PruneSettings, calibration_batch, load_device, preflight_prune, prune_loaded, score_loaded
from prunekit.plan.plan import PlanError
from prunekit.preflight import Machine
from prunekit.report.plots import plot_quality_vs_size, plot_speedup_vs_size
from prunekit.runner.recipe import auto_source, has_local_data


@dataclass(frozen=True)
class SweepSettings:
    targets: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
    prune: PruneSettings = field(default_factory=PruneSettings)   # its target is ignored; steps must be 1
    eval_source: str = "auto"       # wikitext2 / c4 / ptb / a text file / self; auto: wikitext2 if local, else self
    eval_seq_len: int = 512
    window_every: int = 16
    speed: bool = True              # measure prefill and decode speed beside the dense model (CPU, bf16)
    speed_repeats: int = 3

    def validate(self) -> None:
        if not self.targets or any(not 0 < t < 1 for t in self.targets):
            raise PlanError(f"targets must be fractions in (0, 1), e.g. 0.1,0.2,0.3; got {list(self.targets)}")
        named = {"auto", SELF_SOURCE, *NAMED_SOURCES}
        if self.eval_source not in named and not Path(self.eval_source.split(":")[0]).is_file():
            raise DataError(f"unknown evaluation source {self.eval_source!r}; use one of {sorted(named)} or an "
                            "existing .txt / .jsonl file")
        if self.prune.steps != 1:
            raise PlanError("a sweep scores once and prunes every target from those scores; set steps to 1")
        self.prune.validate()


def _evaluator(model, tokenizer, settings: SweepSettings, data_dir):
    if settings.eval_source == SELF_SOURCE:
        held_out = self_text.held_out_self_tokens(model, tokenizer)
        return self_text.DESCRIPTION, lambda m: self_text.self_perplexity(m, tokenizer, held_out)
    name = f"{settings.eval_source}, {settings.eval_seq_len}-token windows, every {settings.window_every}th"
    return name, lambda m: perplexity(m, tokenizer, dataset=settings.eval_source, seq_len=settings.eval_seq_len,
                                      window_every=settings.window_every, data_dir=data_dir, progress=False).perplexity


def sweep(model: str | Path, out: str | Path, settings: SweepSettings, *, force: bool = False,
          progress: bool = True, dtype: str = "float32", machine: Machine | None = None) -> dict:
    """See the module docstring: a loop over the prune step (`prune_loaded`) at each target, from
    one set of scores. Settings, the output path, every target's reachability and the memory of the
    prune step are checked before the weights are loaded."""
    data_dir = settings.prune.calibration.data_dir
    local = has_local_data(data_dir)
    settings = replace(settings, eval_source=auto_source(settings.eval_source, local, evaluation=True),
                       prune=replace(settings.prune, calibration=replace(
                           settings.prune.calibration, source=auto_source(settings.prune.calibration.source, local))))
    settings.validate()
    spec = resolve_model_source(model)
    skeleton = load_skeleton(spec)
    structure = model_structure(skeleton)
    positions = getattr(skeleton.config, "max_position_embeddings", None)
    if settings.eval_source != SELF_SOURCE and positions is not None and settings.eval_seq_len > positions:
        raise PlanError(f"eval_seq_len={settings.eval_seq_len} exceeds the model's max_position_embeddings={positions}; "
                        "lower it")
    out = Path(out)
    check_output_dir(out, force=force, protected=spec.local_paths)
    for target in settings.targets:  # every target's reachability, and the prune step's memory at the first
        preflight = preflight_prune(spec, replace(settings.prune, target=target), dtype, structure=structure)
    preflight.check(machine or Machine.here(out), str(model))
    with atomic_directory(out, force=force, protected=spec.local_paths) as tmp:
        dense, tokenizer = load(model, dtype=dtype, device=load_device(settings.prune.device,
                                                                       settings.prune.layer_by_layer))
        calibration = calibration_batch(dense, tokenizer, settings.prune.calibration)
        started = time.perf_counter()
        scores, _ = score_loaded(dense, *calibration, replace(settings.prune, compensation="none"), progress)
        score_seconds = time.perf_counter() - started
        eval_name, evaluate = _evaluator(dense, tokenizer, settings, data_dir)
        record = {"model": str(model), "settings": asdict(settings), "evaluation": eval_name,
                  "score_seconds": round(score_seconds, 1), "dense": {"perplexity": round(evaluate(dense), 4),
                                                                      "params": structure.non_embedding_params},
                  "points": []}
        for target in tqdm(settings.targets, desc="sweep: targets", unit="target", disable=not progress):
            t0 = time.perf_counter()
            pruned = copy.deepcopy(dense)
            step = prune_loaded(pruned, tokenizer, replace(settings.prune, target=target), calibration=calibration,
                                scores=scores, progress=False)
            point = {"target": target, "label": f"{settings.prune.criterion}, {settings.prune.allocation}",
                     "fraction_removed": round(step["removed"]["non-embedding"], 4),
                     "params": step["params"]["non_embedding_after"], "prune_seconds": round(time.perf_counter() - t0, 1),
                     "perplexity": round(evaluate(pruned), 4), "plan": step["steps"][0]["plan"]}
            if settings.speed:
                speed = benchmark_speed(pruned, baseline=dense, dtype="bfloat16", prefill_batch=4, prefill_len=256,
                                        decode_batches=(1,), decode_tokens=16, repeats=settings.speed_repeats)
                point["ideal_speedup"] = round(speed.ideal_speedup, 3)
                point["speedup"] = {k: round(v.median, 3) for k, v in speed.speedup.items()}
            record["points"].append(point)
            del pruned
        (tmp / "sweep.json").write_text(json.dumps(record, indent=1) + "\n")
        points = record["points"]
        plot_quality_vs_size(points, tmp / "quality_vs_size.png", dense=record["dense"], data=eval_name.split(",")[0])
        if settings.speed:
            plot_speedup_vs_size(points, tmp / "speedup_vs_size.png")
        (tmp / "sweep.md").write_text(format_sweep(record))
    return record


def format_sweep(record: dict) -> str:
    speed = "speedup" in record["points"][0]
    header = "| target | removed (non-embedding) | params | perplexity |" + (
        " prefill speedup | decode speedup (batch 1) | ideal (FLOPs) |" if speed else "")
    lines = [f"# Sweep of `{record['model']}`", "", f"Perplexity on {record['evaluation']}; dense: "
             f"{record['dense']['perplexity']:.2f} with {record['dense']['params']:,} non-embedding parameters.", "",
             header, "|" + "---|" * (header.count("|") - 1)]
    for p in record["points"]:
        row = f"| {p['target']:.0%} | {p['fraction_removed']:.1%} | {p['params']:,} | {p['perplexity']:.2f} |"
        if speed:
            row += (f" {p['speedup']['prefill_tokens_per_s']:.2f}x | {p['speedup']['decode_tokens_per_s_batch1']:.2f}x |"
                    f" {p['ideal_speedup']:.2f}x |")
        lines.append(row)
    lines += ["", "![Perplexity against size](quality_vs_size.png)"]
    if speed:
        lines += ["", "![Speedup against size](speedup_vs_size.png)"]
    return "\n".join(lines) + "\n"
