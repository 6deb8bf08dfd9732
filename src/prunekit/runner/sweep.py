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

from prunekit.compensate import compensate, compensate_sequential
from prunekit.data import NAMED_SOURCES, SELF_SOURCE, DataError, calibration_tokens
from prunekit.evaluate.perplexity import perplexity
from prunekit.evaluate.speed import benchmark_speed
from prunekit.export.files import atomic_directory
from prunekit.models.loading import load, load_skeleton, resolve_model_source
from prunekit.models.structure import model_structure
from prunekit.pipeline import PruneSettings, _score, calibration_batch
from prunekit.plan.plan import PlanError
from prunekit.plan.planner import check_reachable, make_plan, removed_fraction
from prunekit.prune.surgery import apply_plan
from prunekit.report.plots import plot_quality_vs_size, plot_speedup_vs_size
from prunekit.score import collect_layer_stats, get_criterion


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
        held_out = calibration_tokens(SELF_SOURCE, tokenizer, n_samples=16, seq_len=256, seed=1234, model=model)
        name = "held-out text sampled from the dense model (16 x 256 tokens)"
        return name, lambda m: perplexity(m, tokenizer, dataset=held_out.reshape(-1), seq_len=256, progress=False).perplexity
    name = f"{settings.eval_source}, {settings.eval_seq_len}-token windows, every {settings.window_every}th"
    return name, lambda m: perplexity(m, tokenizer, dataset=settings.eval_source, seq_len=settings.eval_seq_len,
                                      window_every=settings.window_every, data_dir=data_dir, progress=False).perplexity


def sweep(model: str | Path, out: str | Path, settings: SweepSettings, *, force: bool = False,
          progress: bool = True) -> dict:
    """See the module docstring. Settings, the output path and every target's reachability are
    checked before the weights are loaded."""
    from prunekit.runner.stages import _has_local_data

    data_dir = settings.prune.calibration.data_dir
    if settings.eval_source == "auto":
        settings = replace(settings, eval_source="wikitext2" if _has_local_data(data_dir) else SELF_SOURCE)
    if settings.prune.calibration.source == "auto":
        source = "c4" if _has_local_data(data_dir) else SELF_SOURCE
        settings = replace(settings, prune=replace(settings.prune, calibration=replace(settings.prune.calibration,
                                                                                       source=source)))
    settings.validate()
    spec = resolve_model_source(model)
    skeleton = load_skeleton(spec)
    structure = model_structure(skeleton)
    positions = getattr(skeleton.config, "max_position_embeddings", None)
    if settings.eval_source != SELF_SOURCE and positions is not None and settings.eval_seq_len > positions:
        raise PlanError(f"eval_seq_len={settings.eval_seq_len} exceeds the model's max_position_embeddings={positions}; "
                        "lower it")
    for target in settings.targets:
        check_reachable(structure, settings.prune.planner_settings(target))
    out = Path(out)
    with atomic_directory(out, force=force, protected=spec.local_paths) as tmp:
        dense, tokenizer = load(model)
        ids, labels = calibration_batch(dense, tokenizer, settings.prune.calibration)
        started = time.perf_counter()
        scores, _ = _score(dense, ids, labels, replace(settings.prune, compensation="none"), progress)
        score_seconds = time.perf_counter() - started
        stats = (collect_layer_stats(dense, ids, batch_size=settings.prune.batch_size, with_gram=True, progress=progress)
                 if settings.prune.compensation == "one-shot" else None)
        eval_name, evaluate = _evaluator(dense, tokenizer, settings, data_dir)
        record = {"model": str(model), "settings": asdict(settings), "evaluation": eval_name,
                  "score_seconds": round(score_seconds, 1), "dense": {"perplexity": round(evaluate(dense), 4),
                                                                      "params": structure.non_embedding_params},
                  "points": []}
        for target in tqdm(settings.targets, desc="sweep: targets", unit="target", disable=not progress):
            t0 = time.perf_counter()
            pruned = copy.deepcopy(dense)
            plan = make_plan(structure, scores, settings.prune.planner_settings(target),
                             comparable=get_criterion(settings.prune.criterion).comparable)
            if settings.prune.compensation == "one-shot":
                compensate(pruned, plan, stats, ridge=settings.prune.ridge, bias=settings.prune.bias_compensation)
            elif settings.prune.compensation == "sequential":
                compensate_sequential(pruned, plan, ids, ridge=settings.prune.ridge,
                                      batch_size=settings.prune.batch_size, progress=False)
            after = apply_plan(pruned, plan)
            point = {"target": target, "label": f"{settings.prune.criterion}, {settings.prune.allocation}",
                     "fraction_removed": round(removed_fraction(structure, after, "non-embedding"), 4),
                     "params": after.non_embedding_params, "prune_seconds": round(time.perf_counter() - t0, 1),
                     "perplexity": round(evaluate(pruned), 4), "plan": plan.to_dict()}
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
