"""The run report: one Markdown page, with figures, for everything a pruning run left in a folder.

    write_run_report(Path("runs/demo"))

reads what it finds in the run directory, reports it, and says what it did not find:

- the pruned model (the directory itself, or `recovered/` or `model/` in it; it holds prunekit.json): parameters,
  settings, per-layer widths before and after, kept-width figure, compensation fits;
- `scores.json` (`prunekit analyze`): per-layer, head and channel score figures;
- `eval*.json` (`prunekit eval --json`): perplexity and task tables, quality against size;
- `bench*.json` (`prunekit bench --json`): speed, measured against ideal speedup;
- `summary.json` (`prunekit demo`): perplexity and speed before and after.

The report goes to RUN_DIR/report.md, or to RUN_DIR/run_report.md when report.md is someone
else's (the demo writes its own); figures go to RUN_DIR/figures/. A file this module did not
write is never overwritten: its reports start with `MARKER`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunekit.errors import PrunekitError
from prunekit.evaluate.speed import format_speed_markdown
from prunekit.export.files import OutputExistsError, atomic_write_text
from prunekit.export.model_card import (
    PROVENANCE_FILE,
    final_model_dir,
    local_structure,
    model_role,
    perplexity_rows,
    perplexity_table,
    refresh_run_card,
    removal_rows,
    removal_table,
    settings_lines,
    skeleton_structure,
    source_structure,
)
from prunekit.models.structure import ModelStructure
from prunekit.report.plots import (
    plot_allocation_search,
    plot_channel_scores,
    plot_head_heatmap,
    plot_kept_widths,
    plot_layer_scores,
    plot_loss_curve,
    plot_quality_vs_size,
)
from prunekit.score.scores import LAYER_KINDS, Scores

MARKER = "<!-- written by `prunekit report`; it replaces this file when run again -->"
REPORT_FILE = "report.md"
FALLBACK_FILE = "run_report.md"  # when report.md is not ours (the demo writes its own)
FIGURES_DIR = "figures"


class RunReportError(PrunekitError, ValueError):
    """The run directory cannot be reported on as asked."""


# ----------------------------------------------------------------------------- Markdown helpers


def _table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table; `align` gives one letter per column ('l' or 'r'), right-aligned by default."""
    align = align.ljust(len(header), "r")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if a == "l" else "---:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _note(text: str) -> str:
    return f"*{text}*"


@dataclass
class _Context:
    """What the sections share: where the report and figures go, and what was not found."""

    run_dir: Path
    report_dir: Path
    missing: list[str] = field(default_factory=list)

    def figure(self, name: str) -> Path:
        return self.run_dir / FIGURES_DIR / name

    def image(self, alt: str, path: Path) -> str:
        return f"![{alt}]({Path(os.path.relpath(path, self.report_dir)).as_posix()})"


def _read_json(path: Path, context: _Context) -> Any | None:
    """The JSON in `path`, or None (and a note) when it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        context.missing.append(f"`{path.name}` could not be read ({error}); skipped.")
        return None


# ----------------------------------------------------------------------------- the pruned model


def _width_cell(before: int, after: int | None) -> str:
    if after is None:
        return f"{before} → –"
    if after == before:
        return str(before)
    return f"{before} → {after}" if after else f"{before} → 0 (removed)"


def _widths_table(before: ModelStructure, after: ModelStructure, dropped: list[int]) -> str:
    kept = iter(after.layers)
    rows = []
    for index, shape in enumerate(before.layers):
        if index in dropped:
            rows.append([index, "dropped", "dropped", "dropped"])
            continue
        new = next(kept)
        rows.append([
            index,
            _width_cell(shape.num_attention_heads, new.num_attention_heads),
            _width_cell(shape.num_key_value_heads, new.num_key_value_heads),
            _width_cell(shape.intermediate_size, new.intermediate_size),
        ])
    return _table(["layer", "query heads", "KV groups", "FFN channels"], rows)


def _fits_table(provenance: dict) -> str | None:
    steps = (provenance.get("pruning") or {}).get("steps") or []
    rows = []
    for step in steps:
        for fit in (step.get("compensation") or {}).get("fits") or []:
            # least squares reports the plan's cut and its refit; OBS (compensate/obs.py) its own choice
            before = fit["error_before"] if "error_before" in fit else fit["error_plan_cut"]
            after = fit["error_after"] if "error_after" in fit else fit["error_obs"]
            rows.append([
                *([step["step"]] if len(steps) > 1 else []), fit["layer"], fit["sublayer"],
                f"{fit['kept']} / {fit['kept'] + fit['removed']}",
                f"{before:.3g} → {after:.3g}" if before is not None else "–",
                f"{100 * (1 - after / before):.0f}%" if before else "–",
            ])
    if not rows:
        return None
    header = [*(["step"] if len(steps) > 1 else []), "layer", "sublayer", "units kept", "relative error of the cut → after",
              "error removed"]
    return _table(header, rows, align="rl" if len(steps) == 1 else "rrl")


def _model_section(context: _Context) -> str | None:
    model_dir = final_model_dir(context.run_dir)
    if model_dir is None:
        context.missing.append(f"no pruned model (a directory with {PROVENANCE_FILE}, here or in `model/`).")
        return None
    provenance = _read_json(model_dir / PROVENANCE_FILE, context)
    if provenance is None:
        return None
    after = skeleton_structure(model_dir)
    source = provenance.get("source_model")
    lines = ["## Pruned model", "",
             f"`{os.path.relpath(model_dir, context.report_dir)}`, pruned from `{source or 'an unrecorded model'}` "
             f"({after.model_type}, saved in the {provenance.get('format', '?')} format).", ""]
    lines += settings_lines(provenance)

    before, dropped = source_structure(provenance, after)
    if before is None:
        context.missing.append(f"neither the plan nor a local copy of `{source}` gives the source model's widths "
                               "(or the pruned model has no attention or no MLP left to cost them from): no widths "
                               "table or kept-width figure.")
    recorded = (provenance.get("pruning") or {}).get("params") or {}
    lines += ["", "### What was removed", "", removal_table(removal_rows(before, after, recorded))]
    if before is not None:
        figure = plot_kept_widths(before, after, context.figure("kept_widths.png"), dropped_layers=dropped)
        lines += ["", "### Widths per layer", "", "Source layer index; one number means the width was kept.", "",
                  _widths_table(before, after, dropped), "", context.image("Kept width per layer", figure)]
    search = (provenance.get("pruning") or {}).get("search")
    if search:
        figure = plot_allocation_search(search, context.figure("allocation_search.png"))
        lines += ["", "### Allocation search", "",
                  f"KL divergence from the dense model on held-out calibration rows: {search['start_fitness']:.4f} "
                  f"for global allocation's plan, {search['fitness']:.4f} for the plan found in "
                  f"{len(search['trace']) - 1} generations ({search['evaluations']} candidate measurements, "
                  f"{search['seconds']:.0f} s).", "", context.image("Allocation search", figure)]
    fits = _fits_table(provenance)
    if fits is None:
        context.missing.append("no compensation fits (compensation was off, or the model was pruned to a given plan).")
    else:
        lines += ["", "### Compensation", "",
                  "Per sublayer, the relative error of its output on the calibration data with the pruned inputs "
                  "dropped, before and after refitting the output projection.", "", fits]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- recovery


def _recovery_section(context: _Context) -> str | None:
    model_dir = final_model_dir(context.run_dir)
    provenance = _read_json(model_dir / PROVENANCE_FILE, context) if model_dir is not None else None
    recovery = (provenance or {}).get("recovery")
    if not recovery:
        context.missing.append("no recovery record (the model was not trained after pruning: `prunekit recover`).")
        return None
    settings = recovery["settings"]
    data = settings["data"]
    evals = recovery.get("eval") or []
    rows = [("method", settings["method"]), ("teacher", f"`{recovery.get('teacher')}`"),
            ("data", f"{data['source']} ({'prompt/response pairs' if data['pairs'] else 'text'}, "
                     f"{data['seq_len']}-token rows)"),
            ("training tokens", f"{recovery['tokens']:,} in {recovery['total_steps']} steps"),
            ("trainable parameters", f"{recovery['trainable_params']:,}"),
            ("peak learning rate", f"{settings['lr'] if settings['lr'] is not None else 'method default'}"),
            ("training speed", f"{recovery['tokens_per_second']:,.0f} tokens/s ({recovery['precision']}, "
                               f"{recovery['world_size']} process{'es' * (recovery['world_size'] > 1)})")]
    if evals:
        rows.append(("held-out perplexity", f"{evals[0][1]:.2f} at step {evals[0][0]} -> {evals[-1][1]:.2f} "
                                            f"at step {evals[-1][0]}"))
    lines = ["## Recovery", "", _table(("", "value"), rows, align="ll")]
    if recovery.get("steps"):
        figure = plot_loss_curve(recovery["steps"], recovery["loss"], context.figure("recovery_loss.png"),
                                 eval_points=[tuple(point) for point in evals],
                                 data=f"held-out {Path(data['source']).name}")
        lines += ["", context.image("Recovery loss curve", figure)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- scores


def _scores_section(context: _Context) -> str | None:
    path = context.run_dir / "scores.json"
    if not path.is_file():
        context.missing.append("no `scores.json` (`prunekit analyze`): no score figures.")
        return None
    data = _read_json(path, context)
    if data is None:
        return None
    try:
        scores = Scores.from_dict(data)
    except (KeyError, TypeError, ValueError) as error:
        context.missing.append(f"`scores.json` is not a prunekit scores file ({error}); skipped.")
        return None
    unit = scores.meta.get("unit")
    lines = ["## Importance scores", "", f"Criterion `{scores.criterion}`" + (f", in {unit}" if unit else "")
             + f"; kinds: {', '.join(f'`{kind}`' for kind in scores.values)}."]
    figures: list[tuple[str, Callable[[], Path]]] = []
    if any(scores.has(kind) for kind in LAYER_KINDS):
        figures.append(("Per-layer scores", lambda: plot_layer_scores(scores, context.figure("layer_scores.png"))))
    if scores.has("head") and any(len(v) for v in scores.values["head"]):
        figures.append(("Query-head scores", lambda: plot_head_heatmap(scores, context.figure("head_scores.png"))))
    if scores.has("channel") and any(len(v) for v in scores.values["channel"]):
        figures.append(("FFN channel scores", lambda: plot_channel_scores(scores, context.figure("channel_scores.png"))))
    for alt, draw in figures:
        lines += ["", context.image(alt, draw())]
    if not figures:
        lines += ["", _note("none of the kinds has values to draw.")]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- eval and bench


def _json_files(context: _Context, prefix: str, expected_format: str) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(context.run_dir.glob(f"{prefix}*.json")):
        data = _read_json(path, context)
        if data is None:
            continue
        if not isinstance(data, dict) or data.get("format") != expected_format:
            context.missing.append(f"`{path.name}` is not a `{expected_format}` file; skipped.")
            continue
        found.append((path, data))
    return found


def _non_embedding_params(entry: dict, known: dict[int, int]) -> int | None:
    """Non-embedding parameters of an eval entry's model: from its skeleton, or from a total count
    that prunekit.json matched to a non-embedding one."""
    structure = local_structure(entry.get("location"))
    if structure is not None:
        return structure.non_embedding_params
    return known.get(entry.get("parameters"))


def _known_counts(context: _Context) -> dict[int, int]:
    """Total → non-embedding parameter counts that the pruned model's record gives."""
    model_dir = final_model_dir(context.run_dir)
    if model_dir is None:
        return {}
    try:
        provenance = json.loads((model_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    params = (provenance.get("pruning") or {}).get("params") or {}
    known = {provenance["params"]["total"]: provenance["params"]["non_embedding"]} if provenance.get("params") else {}
    if "before" in params and "non_embedding_before" in params:
        known[params["before"]] = params["non_embedding_before"]
    return known


def _quality_figure(reports: list[tuple[Path, dict]], context: _Context) -> list[str]:
    entries = [report for _, report in reports if report["perplexity"]]
    if len(entries) < 2:
        context.missing.append("fewer than two evaluated models: no quality-against-size figure.")
        return []
    known = _known_counts(context)
    sizes = [_non_embedding_params(report["model"], known) for report in entries]
    if None in sizes:
        unknown = entries[sizes.index(None)]["model"]["spec"]
        context.missing.append(f"the non-embedding size of `{unknown}` is unknown (not a local model): "
                               "no quality-against-size figure.")
        return []
    lines = []
    datasets = sorted({name for report in entries for name in report["perplexity"]})
    for number, dataset in enumerate(datasets):
        measured = [(size, report) for size, report in zip(sizes, entries) if dataset in report["perplexity"]]
        if len(measured) < 2:
            continue
        dense_size, dense = max(measured, key=lambda pair: pair[0])
        # each point named for what it is (its prunekit.json says pruned or recovered), the dense one apart
        points = [{"label": model_role(report["model"].get("location"), context.run_dir), "params": size,
                   "perplexity": report["perplexity"][dataset]["perplexity"]}
                  for size, report in measured if report is not dense]
        reference = {"params": dense_size, "perplexity": dense["perplexity"][dataset]["perplexity"]}
        name = "quality_vs_size.png" if len(datasets) == 1 else f"quality_vs_size_{number}.png"
        figure = plot_quality_vs_size(points, context.figure(name), dense=reference, data=dataset)
        lines += ["", context.image(f"Perplexity against size on {dataset}", figure)]
    return lines


def _eval_section(context: _Context) -> str | None:
    reports = _json_files(context, "eval", "prunekit.eval/1")
    if not reports:
        context.missing.append("no `eval*.json` (`prunekit eval --json`): no perplexity or task tables.")
        return None
    ppl_rows, task_rows = perplexity_rows(reports, context.run_dir), []
    for path, report in reports:
        model = f"`{report['model']['spec']}`"
        for task, entry in report["tasks"].items():
            task_rows.append([model, task, f"{entry['n']:,}", *(_accuracy(entry, name) for name in ("acc", "acc_norm"))])
    lines = ["## Quality", "", f"From {', '.join(f'`{path.name}`' for path, _ in reports)}."]
    if ppl_rows:
        lines += ["", "### Perplexity", "", perplexity_table(ppl_rows)]
    if task_rows:
        lines += ["", "### Zero-shot tasks", "", _table(["model", "task", "n", "acc", "acc_norm"], task_rows, align="ll")]
    return "\n".join(lines + _quality_figure(reports, context))


def _accuracy(entry: dict, name: str) -> str:
    value, stderr = entry.get(name), entry.get(f"{name}_stderr")
    if value is None:
        return "–"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _bench_section(context: _Context) -> str | None:
    reports = _json_files(context, "bench", "prunekit.bench/1")
    if not reports:
        context.missing.append("no `bench*.json` (`prunekit bench --json`): no speed table.")
        return None
    lines = ["## Speed"]
    for path, report in reports:
        against = f" against `{report['baseline']['spec']}`" if report.get("baseline") else ""
        lines += ["", f"`{report['model']['spec']}`{against} (`{path.name}`):", "", format_speed_markdown(report["speed"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the demo's summary


def _summary_section(context: _Context) -> str | None:
    path = context.run_dir / "summary.json"
    if not path.is_file():
        context.missing.append("no `summary.json` (`prunekit demo`).")
        return None
    summary = _read_json(path, context)
    if summary is None:
        return None
    perplexity = summary.get("perplexity") or {}
    lines = ["## Demo summary", "", f"`{summary.get('model', '?')}`, data: {summary.get('data', 'not recorded')}."]
    if perplexity:
        change = perplexity["pruned"] / perplexity["dense"] - 1
        lines += ["", _table(["perplexity", "dense", "pruned", "change"],
                             [[perplexity.get("protocol", "–"), f"{perplexity['dense']:.2f}", f"{perplexity['pruned']:.2f}",
                               f"{change:+.0%}"]], align="l")]
    if summary.get("speed"):
        lines += ["", "### Speed (dense interleaved with pruned)", "", format_speed_markdown(summary["speed"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the report


def _is_ours(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as handle:
            return handle.readline().rstrip("\n") == MARKER
    except (OSError, UnicodeDecodeError):
        return False


def _report_path(run_dir: Path, out: Path | None) -> Path:
    if out is not None:
        if out.is_dir():
            raise RunReportError(f"--out {out} is a directory; name a file such as {out / REPORT_FILE}")
        if out.exists() and not _is_ours(out):
            raise OutputExistsError(f"{out} exists and was not written by `prunekit report`; choose another --out")
        return out
    for name in (REPORT_FILE, FALLBACK_FILE):
        path = run_dir / name
        if not path.exists() or _is_ours(path):
            return path
    raise OutputExistsError(f"{run_dir} already has a {REPORT_FILE} and a {FALLBACK_FILE} that `prunekit report` did "
                            f"not write; pass --out to write the report elsewhere")


def write_run_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the report on `run_dir` (see the module doc) and its figures; return the report's path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunReportError(f"run directory {run_dir} does not exist; pass the folder a prune, eval or demo run wrote")
    path = _report_path(run_dir, None if out is None else Path(out))
    context = _Context(run_dir.absolute(), path.parent.absolute())
    sections = [section() for section in (
        lambda: _model_section(context), lambda: _recovery_section(context), lambda: _summary_section(context),
        lambda: _eval_section(context),
        lambda: _bench_section(context), lambda: _scores_section(context),
    )]
    found = [section for section in sections if section]
    if not found:
        raise RunReportError(
            f"nothing to report in {run_dir}: no pruned model ({PROVENANCE_FILE}), scores.json, eval*.json, "
            f"bench*.json or summary.json; pass the folder a prune, eval or demo run wrote"
        )
    card = refresh_run_card(run_dir)  # from the same records, so the card and this report agree
    if card is not None:
        found.append(f"The model card `{os.path.relpath(card, context.report_dir)}` was written again with these "
                     "figures.")
    if context.missing:
        found.append("## Not found\n\n" + "\n".join(f"- {item[0].upper()}{item[1:]}" for item in context.missing))
    text = "\n\n".join([MARKER, f"# Run report: `{run_dir.name}`", *found]) + "\n"
    atomic_write_text(path, text)  # last: the figures it links to are already there
    return path


# ----------------------------------------------------------------------------- command line


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run's folder: a pruned model, eval/bench JSON, scores.json, a demo")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"report file (default RUN_DIR/{REPORT_FILE}, or RUN_DIR/{FALLBACK_FILE} when "
                             f"{REPORT_FILE} is another tool's)")


def _run(args: argparse.Namespace) -> int:
    try:
        path = write_run_report(args.run_dir, args.out)
    except RunReportError as error:
        print(f"prunekit report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path} (figures in {Path(args.run_dir) / FIGURES_DIR})")
    return 0


REPORT_COMMAND = ("write a Markdown report with figures on everything a run folder holds", _add_arguments, _run)

__all__ = ["MARKER", "REPORT_COMMAND", "RunReportError", "write_run_report"]
