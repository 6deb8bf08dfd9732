"""The analysis report: what a criterion measured on a model, as Markdown with its figures.

    write_analysis_report(scores, model_structure(model), Path("out/analysis"),
                          title="SmolLM2-135M, sensitivity",
                          calibration={"source": "fineweb-edu", "n_samples": 128, "seq_len": 512, "seed": 0})

writes out/analysis/analysis.md and the PNGs it shows beside it. Kinds the criterion did not
measure are skipped with a note.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from prunekit.export.files import atomic_write_text
from prunekit.models.structure import ModelStructure
from prunekit.report.plots import plot_channel_scores, plot_head_heatmap, plot_layer_scores
from prunekit.score.scores import KINDS, LAYER_KINDS, Scores

REPORT_FILE = "analysis.md"
EXTREMES = 10  # heads listed at each end of the ranking

_KIND_NAMES = {"layer": "whole layer", "attention": "attention", "mlp": "MLP"}


def _check_matches(scores: Scores, structure: ModelStructure) -> None:
    """Scores of another model would be reported against the wrong layers and heads: refuse them."""
    widths: dict[str, Callable[[int], int]] = {
        "head": lambda i: structure.layers[i].num_attention_heads,
        "kv_group": lambda i: structure.layers[i].num_key_value_heads,
        "channel": lambda i: structure.layers[i].dense_ffn_width,  # a MoE layer's: its shared expert's (if any)
        "hidden": lambda i: structure.hidden_size,  # each layer's share of every residual channel's score
        "expert": lambda i: structure.layers[i].num_experts,  # routed experts (none on dense layers)
        # every channel of every routed expert (none on dense layers)
        "expert_channel": lambda i: structure.layers[i].num_experts * structure.layers[i].intermediate_size,
    }
    for kind, per_layer in scores.values.items():
        if len(per_layer) != structure.num_layers:
            raise ValueError(
                f"the {kind} scores cover {len(per_layer)} layers but the model has {structure.num_layers}; "
                f"report on the model that was scored"
            )
        for index, values in enumerate(per_layer):
            expected = widths[kind](index) if kind in widths else 1
            if values.numel() != expected:
                raise ValueError(
                    f"layer {index}: {values.numel()} {kind} scores for a layer with {expected}; "
                    f"report on the model that was scored"
                )


def _number(value: float) -> str:
    return f"{value:.3g}"


def _ranks(values: np.ndarray) -> np.ndarray:
    """1 = most important; ties keep their layer order."""
    order = np.argsort(-values, kind="stable")
    ranks = np.empty(len(values), dtype=int)
    ranks[order] = np.arange(1, len(values) + 1)
    return ranks


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _image(alt: str, path: Path, out_dir: Path) -> str:
    return f"![{alt}]({path.relative_to(out_dir).as_posix()})"


def _skipped(kinds: Sequence[str], scores: Scores) -> str:
    names = ", ".join(f"`{kind}`" for kind in kinds)
    return f"*{scores.criterion} did not measure {names}: skipped.*"


def describe_calibration(calibration: dict) -> str:
    """A short name for the calibration data, for titles: "fineweb-edu, 128 × 512 tokens"."""
    name = str(calibration.get("source") or calibration.get("spec") or "calibration data")
    if "n_samples" in calibration and "seq_len" in calibration:
        return f"{name}, {calibration['n_samples']} × {calibration['seq_len']} tokens"
    return name


def _token_count(calibration: dict, cost: dict) -> int | None:
    if "tokens" in calibration:
        return int(calibration["tokens"])
    for source in (calibration, cost):
        samples, length = source.get("n_samples", source.get("sequences")), source.get("seq_len")
        if samples is not None and length is not None:
            return int(samples) * int(length)
    return None


def _key_values(mapping: dict) -> str:
    return ", ".join(f"{key} = {value}" for key, value in mapping.items())


def _measured_section(scores: Scores, structure: ModelStructure, calibration: dict) -> str:
    cost = scores.meta.get("cost") or {}
    tokens = _token_count(calibration, cost)
    unit = scores.meta.get("unit")
    other_meta = {key: value for key, value in scores.meta.items() if key not in ("cost", "unit")}
    missing = [kind for kind in KINDS if not scores.has(kind)]
    lines = [
        "## What was measured",
        "",
        f"- **Criterion:** `{scores.criterion}`" + (f"; unit: {unit}" if unit else "") + "; higher means more important.",
        f"- **Model:** {structure.model_type}, {structure.num_layers} layers, "
        f"{structure.total_params:,} parameters ({structure.non_embedding_params:,} outside the embeddings).",
        f"- **Calibration data:** {_key_values(calibration) if calibration else 'not recorded'}.",
        f"- **Tokens:** {tokens:,}." if tokens is not None else "- **Tokens:** not recorded.",
        f"- **Cost:** {_key_values(cost)}." if cost else "- **Cost:** not recorded by this criterion.",
    ]
    if other_meta:
        lines.append(f"- **Criterion settings:** {_key_values(other_meta)}.")
    lines.append(f"- **Kinds scored:** {', '.join(f'`{kind}`' for kind in scores.values) or 'none'}"
                 + (f"; not scored: {', '.join(f'`{kind}`' for kind in missing)}." if missing else "."))
    return "\n".join(lines)


def _layer_section(scores: Scores, structure: ModelStructure, out_dir: Path, data: str) -> str:
    kinds = [kind for kind in LAYER_KINDS if scores.has(kind)]
    lines = ["## Layers", ""]
    if not kinds:
        return "\n".join(lines + [_skipped(LAYER_KINDS, scores)])
    values = {kind: scores.layer_values(kind).to(torch.float64).numpy() for kind in kinds}
    ranks = {kind: _ranks(v) for kind, v in values.items()}
    header = ["layer", "heads / KV groups", "FFN channels"] + [f"{_KIND_NAMES[kind]} (rank)" for kind in kinds]
    rows = [
        [index, f"{shape.num_attention_heads} / {shape.num_key_value_heads}", shape.intermediate_size]
        + [f"{_number(values[kind][index])} ({ranks[kind][index]})" for kind in kinds]
        for index, shape in enumerate(structure.layers)
    ]
    lines += [f"Rank 1 is the most important of the {structure.num_layers} layers.", "", _table(header, rows)]
    missing = [kind for kind in LAYER_KINDS if kind not in kinds]
    if missing:
        lines += ["", _skipped(missing, scores)]
    plot = plot_layer_scores(scores, out_dir / "layer_scores.png", data=data)
    lines += ["", _image("Per-layer scores", plot, out_dir)]
    return "\n".join(lines)


def _head_rows(scores: Scores, structure: ModelStructure) -> list[list[object]]:
    """Every head as [rank, layer, head, KV group, score], most important first."""
    entries = [
        (float(score), layer, head)
        for layer, per_layer in enumerate(scores.values["head"])
        for head, score in enumerate(per_layer.tolist())
    ]
    entries.sort(key=lambda entry: -entry[0])  # stable: ties stay in layer, head order
    return [
        [rank, layer, head, head // structure.layers[layer].heads_per_group, _number(score)]
        for rank, (score, layer, head) in enumerate(entries, start=1)
    ]


def _head_section(scores: Scores, structure: ModelStructure, out_dir: Path, data: str) -> str:
    lines = ["## Attention heads", ""]
    if not scores.has("head"):
        lines.append(_skipped(["head"], scores))
    else:
        rows = _head_rows(scores, structure)
        header = ["rank", "layer", "head", "KV group", "score"]
        shown = min(EXTREMES, len(rows))
        lines += [
            f"Ranked over all {len(rows)} query heads; rank 1 is the most important.",
            "",
            f"**{shown} least important** (first to prune):",
            "",
            _table(header, rows[::-1][:shown]),
            "",
            f"**{shown} most important:**",
            "",
            _table(header, rows[:shown]),
            "",
            _image("Query-head scores per layer", plot_head_heatmap(scores, out_dir / "head_scores.png", data=data), out_dir),
        ]
    if scores.has("kv_group") and any(len(values) for values in scores.values["kv_group"]):
        plot = plot_head_heatmap(scores, out_dir / "kv_group_scores.png", kind="kv_group", data=data)
        lines += ["", _image("KV-group scores per layer", plot, out_dir)]
    else:
        lines += ["", _skipped(["kv_group"], scores)]
    return "\n".join(lines)


def _channel_section(scores: Scores, out_dir: Path, data: str) -> str:
    lines = ["## FFN channels", ""]
    if not scores.has("channel"):
        return "\n".join(lines + [_skipped(["channel"], scores)])
    if not any(len(values) for values in scores.values["channel"]):
        return "\n".join(lines + ["*No layer has a dense FFN left (an MLP, or a MoE block's shared expert): no channel scores.*"])
    levels = (0.0, 0.05, 0.5, 0.95, 1.0)
    rows = []
    for index, per_layer in enumerate(scores.values["channel"]):
        values = per_layer.to(torch.float64).numpy()
        summary = [_number(q) for q in np.quantile(values, levels)] if len(values) else ["–"] * len(levels)
        rows.append([index, len(values), *summary, _number(values.sum()) if len(values) else "–"])
    lines += [
        "Score distribution over each layer's channels.",
        "",
        _table(["layer", "channels", "min", "5%", "median", "95%", "max", "sum"], rows),
        "",
        _image("FFN channel scores per layer", plot_channel_scores(scores, out_dir / "channel_scores.png", data=data), out_dir),
    ]
    return "\n".join(lines)


def write_analysis_report(
    scores: Scores, structure: ModelStructure, out_dir: Path, *, title: str, calibration: dict
) -> Path:
    """Write `analysis.md` and its figures into `out_dir`; return the report's path.

    `calibration` describes the data the scores were measured on (source, n_samples, seq_len,
    seed, ...); it is reported as given. The figures are written first, so the report never
    links to a file that is not there.
    """
    _check_matches(scores, structure)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = describe_calibration(calibration)
    sections = [
        f"# {title}",
        _measured_section(scores, structure, calibration),
        _layer_section(scores, structure, out_dir, data),
        _head_section(scores, structure, out_dir, data),
        _channel_section(scores, out_dir, data),
    ]
    path = out_dir / REPORT_FILE
    atomic_write_text(path, "\n\n".join(sections) + "\n")
    return path
