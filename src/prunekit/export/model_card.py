"""The model card of every saved model directory: README.md with the Hugging Face Hub's YAML front
matter (`base_model`, `library_name`, `tags`, `pipeline_tag`), saying what was removed and how, and
the figures the run measured where they are known.

`save_model` writes the card from the provenance it records. `refresh_run_card(run_dir)` writes
it again for a run's final model from the run's records (eval, bench, demo summary, recovery), and
`prunekit report` calls it with the same records it reports from, so the report and the card agree.
A README.md that prunekit did not write (no `CARD_MARKER`) is never replaced.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from prunekit.models.structure import LayerCosts, LayerShape, ModelStructure, format_count, model_structure
from prunekit.plan.plan import structure_signature, surviving_layers

CARD_FILE = "README.md"
CARD_MARKER = "<!-- model card written by prunekit; `prunekit report RUN_DIR` writes it again from the run's records -->"
PROVENANCE_FILE = "prunekit.json"
# The Hub shows these on the model page and lists the model under them.
TAGS = ("pruned", "prunekit", "structured-pruning")
_BASIS_NAMES = {"non-embedding": "non-embedding parameters", "total": "all parameters", "flops": "FLOPs per token",
                "kv-cache": "the KV cache"}


# ----------------------------------------------------------------------------- the base model


def read_front_matter(path: Path) -> dict | None:
    """The YAML front matter of a Markdown file, or None when it has none or it does not parse."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---\n"):
        return None
    end = text.find("\n---", 4)
    try:
        data = yaml.safe_load(text[4:end]) if end > 0 else None
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def base_model_id(source: str | os.PathLike | None) -> str | None:
    """The Hub id of the model that `source` was made from, for the card's `base_model` (the Hub
    accepts only repository ids there): a Hub id as given, the embedded model's origin, or what a
    local directory's own card or prunekit.json names; None when nothing says."""
    from prunekit.models.loading import EMBEDDED_HUB_IDS, ModelLoadError, resolve_model_source

    if not source:
        return None
    try:
        resolved = resolve_model_source(source)
    except ModelLoadError:
        return None
    if resolved.kind == "hub":
        return resolved.spec
    if resolved.kind == "embedded":
        return EMBEDDED_HUB_IDS.get(resolved.spec)
    if resolved.kind == "directory":
        card = read_front_matter(Path(resolved.location) / CARD_FILE) or {}
        base = card.get("base_model")
        if isinstance(base, list):
            base = base[0] if base else None
        if isinstance(base, str) and base:
            return base
        try:
            return json.loads((Path(resolved.location) / PROVENANCE_FILE).read_text(encoding="utf-8")).get("base_model")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
    return None


# ----------------------------------------------------------------------------- before and after


def provenance_plans(provenance: dict) -> list[dict]:
    """The plans that made a saved model, in order: each step's of a `--target` run, else the one plan."""
    steps = (provenance.get("pruning") or {}).get("steps") or []
    if steps:
        return [step["plan"] for step in steps]
    return [provenance["plan"]] if provenance.get("plan") else []


def skeleton_structure(spec: str | os.PathLike) -> ModelStructure:
    from prunekit.models.loading import load_skeleton, resolve_model_source

    return model_structure(load_skeleton(resolve_model_source(spec)))


def local_structure(spec: str | None) -> ModelStructure | None:
    """The structure of a model named by a local directory or the embedded model; None for a Hub id
    (no network for a report or a card) or anything that does not load."""
    from prunekit.models.architecture import UnsupportedModelError
    from prunekit.models.loading import ModelLoadError, resolve_model_source

    if not spec:
        return None
    try:
        if resolve_model_source(spec).kind not in ("directory", "embedded"):
            return None
        return skeleton_structure(spec)
    except (ModelLoadError, UnsupportedModelError, OSError, ValueError):
        return None


def dropped_layers(plans: list[dict], num_layers: int) -> list[int]:
    """Source layers that no step kept."""
    return sorted(set(range(num_layers)) - set(surviving_layers(plans, num_layers)))


def before_structure(
    signature: dict, after: ModelStructure, dropped: list[int], source: str | None
) -> ModelStructure | None:
    """The source model's structure: its skeleton when it is at hand and matches the plan, else
    the plan's per-layer widths costed with the pruned model's per-unit parameters; None when no
    pruned layer has an attention or no pruned layer has an MLP to take those from."""
    shapes = tuple(LayerShape(*widths) for widths in signature["layers"])
    skeleton = local_structure(source)
    if skeleton is not None and structure_signature(skeleton)["layers"] == signature["layers"]:
        return skeleton
    # Per-unit costs depend on head_dim and biases, which pruning leaves alone, and on the hidden
    # size, which the result is costed back to; a pruned layer that lost a sublayer borrows them
    # from a layer that kept it.
    def donor(has: Callable[[LayerShape], bool]) -> LayerCosts | None:
        return next((c for s, c in zip(after.layers, after.layer_costs) if has(s)), None)

    attention_donor, mlp_donor = donor(lambda s: s.num_attention_heads > 0), donor(lambda s: s.intermediate_size > 0)
    if attention_donor is None or mlp_donor is None:
        return None
    base = replace(
        attention_donor, mlp_fixed=mlp_donor.mlp_fixed, per_channel=mlp_donor.per_channel, other=attention_donor.other
    )
    survivors = [index for index in range(len(shapes)) if index not in set(dropped)]
    costs = [base] * len(shapes)
    for source_index, kept_costs, kept_shape in zip(survivors, after.layer_costs, after.layers):
        if kept_shape.num_attention_heads and kept_shape.intermediate_size:
            costs[source_index] = kept_costs
    costed = replace(after, layers=shapes, layer_costs=tuple(costs), layer_types=None)
    return costed.at_hidden_size(signature.get("hidden_size", after.hidden_size))


def source_structure(provenance: dict, after: ModelStructure) -> tuple[ModelStructure | None, list[int]]:
    """The structure the saved model was pruned from, and the source layers dropped; (None, []) when
    neither the plan nor a local copy of the source gives the widths."""
    plans = provenance_plans(provenance)
    source = provenance.get("source_model")
    signature = plans[0].get("model") if plans else None
    if signature is None and plans:  # a hand-written plan need not record the model; its source may be at hand
        skeleton = local_structure(source)
        signature = structure_signature(skeleton) if skeleton is not None else None
    if signature is None:
        return None, []
    dropped = dropped_layers(plans, len(signature["layers"]))
    return before_structure(signature, after, dropped, source), dropped


def _sublayer_params(structure: ModelStructure) -> tuple[int, int]:
    """Parameters of all attention sublayers and of all MLP sublayers (their norms included)."""
    attention = mlp = 0
    for shape, costs in zip(structure.layers, structure.layer_costs):
        attention += costs.params(shape.attention_part()) - costs.other
        mlp += costs.params(shape.mlp_part()) - costs.other
    return attention, mlp


@dataclass(frozen=True)
class RemovedRow:
    kind: str
    before: int | None
    after: int


def removal_rows(before: ModelStructure | None, after: ModelStructure, recorded: dict | None = None) -> list[RemovedRow]:
    """What pruning removed, per kind: parameters (all, non-embedding, attention, FFN) and units (query
    heads, KV groups, FFN channels, layers). `recorded` (the pruning record's `params`) gives the
    totals before where the source's structure is not known."""
    recorded = recorded or {}
    rows = [
        RemovedRow("parameters", recorded.get("before", before.total_params if before else None), after.total_params),
        RemovedRow("non-embedding parameters",
                   recorded.get("non_embedding_before", before.non_embedding_params if before else None),
                   after.non_embedding_params),
    ]
    after_attention, after_mlp = _sublayer_params(after)
    before_attention, before_mlp = _sublayer_params(before) if before else (None, None)
    rows += [RemovedRow("attention parameters", before_attention, after_attention),
             RemovedRow("FFN parameters", before_mlp, after_mlp)]
    for kind, count in (("query heads", lambda s: sum(x.num_attention_heads for x in s.layers)),
                        ("KV groups", lambda s: sum(x.num_key_value_heads for x in s.layers)),
                        ("FFN channels", lambda s: sum(x.intermediate_size for x in s.layers)),
                        ("layers", lambda s: s.num_layers)):
        rows.append(RemovedRow(kind, count(before) if before else None, count(after)))
    return rows


def removal_table(rows: list[RemovedRow]) -> str:
    def cell(kind: str, value: int) -> str:
        return format_count(value, 2) if "parameters" in kind else f"{value:,}"

    lines = ["| | before | after | removed |", "|:---|---:|---:|---:|"]
    for row in rows:
        if row.before is None:
            lines.append(f"| {row.kind} | not recorded | {cell(row.kind, row.after)} | – |")
        else:
            share = f"{1 - row.after / row.before:.1%}" if row.before else "–"
            lines.append(f"| {row.kind} | {cell(row.kind, row.before)} | {cell(row.kind, row.after)} | {share} |")
    return "\n".join(lines)


def settings_lines(provenance: dict) -> list[str]:
    """The settings of the pruning (or the plan it followed), as Markdown list items."""
    from prunekit.report.analysis import describe_calibration

    pruning = provenance.get("pruning")
    if pruning and pruning.get("settings"):
        settings = pruning["settings"]
        calibration = settings.get("calibration") or {}
        removed = pruning.get("removed") or {}
        steps = settings.get("steps", 1)
        lines = [
            f"- **Target:** {settings['target']:.0%} of {settings.get('basis', 'non-embedding')} parameters, "
            f"in {steps} step{'s' * (steps != 1)}; pruned kinds: {', '.join(settings.get('prune', [])) or '–'}.",
            f"- **Criterion:** `{settings['criterion']}`; **allocation:** `{settings['allocation']}`; "
            f"**compensation:** `{settings['compensation']}`.",
            f"- **Calibration:** {describe_calibration({**calibration, 'source': calibration.get('source')})}, "
            f"seed {calibration.get('seed', '–')}" + (f", task {calibration['task']}" if calibration.get("task") else "") + ".",
        ]
        if removed:
            lines.append("- **Removed:** " + ", ".join(
                f"{value:.1%} of {_BASIS_NAMES.get(basis, basis)}" for basis, value in removed.items()) + ".")
        return lines
    plan = provenance.get("plan")
    if plan is None:
        return ["- **Settings:** not recorded (the model was saved without a plan or pruning record)."]
    meta = plan.get("meta") or {}
    made_by = ", ".join(f"{key} = {value}" for key, value in meta.items() if not isinstance(value, dict))
    return ["- **Settings:** pruned to a given plan (`prunekit prune --plan`)"
            + (f"; plan meta: {made_by}." if made_by else "; the plan records no settings.")]


# ----------------------------------------------------------------------------- measured figures


@dataclass(frozen=True)
class PerplexityRow:
    model: str          # "dense", "pruned", "recovered" or the spec as evaluated
    spec: str
    text: str
    window: int | str
    windows: int
    perplexity: float


@dataclass
class RunFigures:
    """What a run measured, read from its records: perplexity rows and speed records (each a
    `SpeedResult.to_dict()` with where it came from)."""

    perplexity: list[PerplexityRow]
    speed: list[tuple[str, dict]]


def model_role(location: str | None, run_dir: Path | None = None) -> str:
    """"recovered", "pruned" or "dense" for the model at `location`, from its prunekit.json (a model
    saved without a plan or pruning record, or without prunekit.json, is the dense one)."""
    if not location:
        return "dense"
    path = Path(location)
    if not path.is_absolute() and run_dir is not None and not path.exists():
        path = run_dir / path
    try:
        provenance = json.loads((path / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "dense"
    if provenance.get("recovery"):
        return "recovered"
    return "pruned" if provenance_plans(provenance) or provenance.get("pruning") else "dense"


def _json_records(run_dir: Path, prefix: str, expected_format: str) -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(run_dir.glob(f"{prefix}*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("format") == expected_format:
            found.append((path, data))
    return found


def perplexity_rows(reports: list[tuple[Path, dict]], run_dir: Path | None = None) -> list[PerplexityRow]:
    rows = []
    for _, report in reports:
        model = report["model"]
        role = model_role(model.get("location"), run_dir)
        for text, entry in report["perplexity"].items():
            protocol = entry.get("protocol") or {}
            rows.append(PerplexityRow(role, model["spec"], text, protocol.get("seq_len", "–"), entry["n_windows"],
                                      entry["perplexity"]))
    return rows


def run_figures(run_dir: Path) -> RunFigures:
    """Every figure a run's records hold: `eval*.json`, `bench*.json` and the demo's `summary.json`."""
    run_dir = Path(run_dir)
    rows = perplexity_rows(_json_records(run_dir, "eval", "prunekit.eval/1"), run_dir)
    speed = [(path.name, report["speed"]) for path, report in _json_records(run_dir, "bench", "prunekit.bench/1")
             if report.get("speed")]
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        summary = None
    if isinstance(summary, dict):
        perplexity = summary.get("perplexity") or {}
        for role in ("dense", "pruned"):
            if role in perplexity:
                rows.append(PerplexityRow(role, summary.get("model", "?") if role == "dense" else "model/",
                                          perplexity.get("protocol", "–"), "–", 0, perplexity[role]))
        if summary.get("speed"):
            speed.append(("summary.json", summary["speed"]))
    return RunFigures(rows, speed)


def perplexity_table(rows: list[PerplexityRow]) -> str:
    lines = ["| model | text | window (tokens) | windows | perplexity |", "|:---|:---|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row.model} (`{row.spec}`) | {row.text} | {row.window} | "
                     f"{f'{row.windows:,}' if row.windows else '–'} | {row.perplexity:.2f} |")
    return "\n".join(lines)


def figures_markdown(figures: RunFigures, recovery: dict | None = None) -> str | None:
    """The measured figures as Markdown (the card's section, and the report's headline); None when
    there are none."""
    from prunekit.evaluate.speed import format_speed_markdown

    parts = []
    if figures.perplexity:
        parts += ["### Perplexity", "", perplexity_table(figures.perplexity)]
    if recovery and recovery.get("eval"):
        first, last = recovery["eval"][0], recovery["eval"][-1]
        parts += ["", f"Recovery training ({recovery['settings']['method']}, {recovery['tokens']:,} tokens): held-out "
                      f"perplexity {first[1]:.2f} at step {first[0]} → {last[1]:.2f} at step {last[0]}."]
    for name, speed in figures.speed:
        parts += ["", f"### Speed (`{name}`)", "", format_speed_markdown(speed)]
    return "\n".join(parts).strip() or None


# ----------------------------------------------------------------------------- the card


def _yaml_front_matter(base_model: str | None) -> str:
    lines = ["---"]
    if base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
    lines += ["library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {tag}" for tag in TAGS]
    lines.append("---")
    return "\n".join(lines)


def model_card_text(provenance: dict, after: ModelStructure, *, name: str = "pruned model",
                    figures: RunFigures | None = None) -> str:
    """The card's Markdown for a saved model whose record is `provenance` and structure `after`."""
    source = provenance.get("source_model")
    base = provenance.get("base_model")
    before, dropped = source_structure(provenance, after)
    rows = removal_rows(before, after, (provenance.get("pruning") or {}).get("params"))
    version = (provenance.get("versions") or {}).get("prunekit", "")
    origin = f"[{base}](https://huggingface.co/{base})" if base else f"`{source or 'an unrecorded model'}`"
    if source and base and source != base:
        origin += f" (read from `{source}`)"
    removed = (provenance.get("pruning") or {}).get("removed") or {}
    share = removed.get("non-embedding")
    if share is None and rows[1].before:
        share = 1 - rows[1].after / rows[1].before
    headline = (f"{share:.1%} of its non-embedding parameters removed by structured pruning"
                if share is not None else "structured pruning")
    lines = [
        _yaml_front_matter(base), CARD_MARKER, "", f"# {name}", "",
        f"{origin} with {headline} (whole attention heads, KV groups, FFN channels or layers taken out, so the "
        f"weights are smaller dense matrices, not sparse ones), made with prunekit{f' {version}' if version else ''}.",
        "",
        "## Loading", "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        *(["tokenizer = AutoTokenizer.from_pretrained(PATH)",
            "# per-layer widths need modeling_prunekit.py, this folder's modeling code; without",
            "# trust_remote_code=True transformers builds the stock model and stops at a size mismatch",
            "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)"]
          if provenance.get("format") == "prunekit" else
          ["tokenizer = AutoTokenizer.from_pretrained(PATH)", "model = AutoModelForCausalLM.from_pretrained(PATH)"]),
        "```", "",
        f"Saved as {provenance.get('dtype', 'the model dtype')} safetensors.", "",
        "## What was removed", "", removal_table(rows),
    ]
    if dropped:
        lines += ["", f"Layers dropped (source indices): {', '.join(map(str, dropped))}."]
    lines += ["", "## How", "", *settings_lines(provenance)]
    recovery = provenance.get("recovery")
    if recovery:
        settings = recovery["settings"]
        lines.append(f"- **Recovery:** {settings['method']} on {settings['data']['source']}, "
                     f"{recovery['tokens']:,} tokens in {recovery['total_steps']} steps, teacher `{recovery.get('teacher')}`.")
    measured = figures_markdown(figures or RunFigures([], []), recovery)
    lines += ["", "## Measured", "",
              measured or "Not measured when this card was written: run `prunekit eval` / `prunekit bench` on this "
                          "folder's run, then `prunekit report RUN_DIR` writes the figures here."]
    lines += ["", "The full record of the run (plan, settings, versions) is in `prunekit.json`."]
    return "\n".join(lines) + "\n"


def card_is_ours(path: Path) -> bool:
    try:
        return CARD_MARKER in path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False


def write_model_card(model_dir: Path, provenance: dict, after: ModelStructure, *, name: str | None = None,
                     figures: RunFigures | None = None) -> Path | None:
    """Write `model_dir`/README.md unless a README.md that prunekit did not write is there; its path, or
    None. `name` titles the card (default: the directory's name)."""
    from prunekit.export.files import atomic_write_text

    path = Path(model_dir) / CARD_FILE
    if path.exists() and not card_is_ours(path):
        return None
    title = name or Path(model_dir).resolve().name
    atomic_write_text(path, model_card_text(provenance, after, name=title, figures=figures))
    return path


def final_model_dir(run_dir: Path) -> Path | None:
    """The run's final model: the directory itself, else `recovered/`, else `model/`."""
    for candidate in (run_dir, run_dir / "recovered", run_dir / "model"):
        if (candidate / PROVENANCE_FILE).is_file():
            return candidate
    return None


def refresh_run_card(run_dir: Path, figures: RunFigures | None = None) -> Path | None:
    """Write the card of the run's final model again, with the figures the run's records hold; the
    card's path, or None when the run has no saved model (or its README.md is someone else's)."""
    run_dir = Path(run_dir)
    model_dir = final_model_dir(run_dir)
    if model_dir is None:
        return None
    try:
        provenance: dict[str, Any] = json.loads((model_dir / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    figures = run_figures(run_dir) if figures is None else figures
    return write_model_card(model_dir, provenance, skeleton_structure(model_dir), figures=figures)


__all__ = ["CARD_FILE", "CARD_MARKER", "RunFigures", "base_model_id", "model_card_text", "refresh_run_card",
           "removal_rows", "run_figures", "write_model_card"]
