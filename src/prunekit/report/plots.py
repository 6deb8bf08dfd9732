"""Figures for reports: score profiles, kept widths, quality against size, recovery curves.

Every function draws one figure sized for a README (about 1000 px wide), writes it as a PNG
atomically and returns its path. Figures are built on `matplotlib.figure.Figure`, not pyplot:
no global state, no GUI backend (saving a PNG renders with Agg), and a caller's own pyplot
session, such as a notebook's, is left alone.
"""
from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from prunekit.models.structure import ModelStructure, format_count
from prunekit.score.scores import LAYER_KINDS, Scores

DPI = 130
FIGSIZE = (7.6, 3.8)  # inches: 988 x 494 px at DPI, full width of a README without scaling

# A linear axis over values whose largest is this many times the smallest flattens everything
# but the largest into the floor: layer 0 of a small LM often scores 10-100x the other layers.
_LOG_SPAN = 30.0
# Tick mantissas for `_plain_log_ticks`, roundest first; the last step is every 2-digit value.
_TICK_MANTISSAS = (
    (1.0, 2.0, 5.0),
    (1.0, 1.5, 2.0, 3.0, 5.0, 7.0),
    (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0),
    tuple(np.arange(10, 100) / 10),
)
_MISSING = "#d9d9d9"      # grey for units a layer does not have
_NONPOSITIVE = "#d62728"  # red for scores <= 0 on a log colour scale: removing the unit did not hurt
_KIND_STYLE = {
    "layer": dict(color="#333333", marker="o", label="whole layer"),
    "attention": dict(color="#1f77b4", marker="s", label="attention sublayer"),
    "mlp": dict(color="#ff7f0e", marker="^", label="MLP sublayer"),
}
_WIDTH_KINDS = (  # (label, LayerShape attribute, colour) for plot_kept_widths
    ("query heads", "num_attention_heads", "#1f77b4"),
    ("KV groups", "num_key_value_heads", "#9ecae1"),
    ("FFN channels", "intermediate_size", "#ff7f0e"),
)


@dataclass(frozen=True)
class _Scale:
    name: str                        # "linear", "log" or "symlog"
    linthresh: float | None = None   # symlog only: half-width of the linear band around zero


def _scale_for(values: np.ndarray) -> _Scale:
    """Log when the values span orders of magnitude; symlog when some of those are also <= 0."""
    finite = values[np.isfinite(values)]
    magnitudes = np.abs(finite[finite != 0])
    if magnitudes.size == 0 or magnitudes.max() / magnitudes.min() < _LOG_SPAN:
        return _Scale("linear")
    if (finite > 0).all():
        return _Scale("log")
    # Slightly negative scores (removing the unit helped a little: calibration noise) and exact
    # zeros sit in a linear band around zero, narrow enough that most values stay on the log part.
    # A power of ten, so that the band's edges are ticks of the log part rather than crowding them.
    linthresh = max(float(np.quantile(magnitudes, 0.1)), float(magnitudes.max()) * 1e-4)
    return _Scale("symlog", 10.0 ** math.floor(math.log10(linthresh)))


def _set_yscale(ax: Axes, scale: _Scale) -> None:
    if scale.name == "symlog":
        ax.set_yscale("symlog", linthresh=scale.linthresh, linscale=1.0)
    else:
        ax.set_yscale(scale.name)
    if scale.name != "log":
        ax.axhline(0.0, color="#888888", linewidth=0.8, zorder=1)


def _color_norm(values: np.ndarray) -> tuple[Normalize, bool]:
    """The colour scale for `values`, and whether values <= 0 fall below it.

    Where a symlog axis would be used, colour is log over the positive values and the few <= 0
    get a colour of their own: a symlog colorbar spends half its length and a crowd of tick
    labels on a sliver of noise around zero.
    """
    finite = values[np.isfinite(values)]
    positive = finite[finite > 0]
    scale = _scale_for(values)
    if scale.name == "linear" or not positive.size:
        return Normalize(float(finite.min()), float(finite.max())), False
    return LogNorm(float(positive.min()), float(positive.max())), scale.name == "symlog"


def _unit(scores: Scores) -> str:
    return scores.meta.get("unit") or f"{scores.criterion} score"


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float64).cpu().numpy().reshape(-1)


def _figure(title: str) -> tuple[Figure, Axes]:
    figure = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    figure.suptitle(title, fontsize=11)
    return figure, figure.add_subplot()


def _score_title(what: str, scores: Scores, data: str | None) -> str:
    return f"{what}: {scores.criterion} criterion" + (f", {data}" if data else "")


def _layer_axis(ax: Axes, num_layers: int) -> None:
    step = math.ceil(num_layers / 32)  # at most ~32 labels, which fit side by side at this width
    ax.set_xticks(range(0, num_layers, step))
    ax.set_xlim(-0.6, num_layers - 0.4)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_xlabel("decoder layer")


def _shade_layers(ax: Axes, layers: Sequence[int], **style) -> None:
    for index in layers:
        ax.axvspan(index - 0.5, index + 0.5, zorder=0, linewidth=0, **style)


def _plain_log_ticks(ax: Axes, count: int = 6) -> None:
    """About `count` round, plainly written ticks on a log y axis.

    Matplotlib labels only powers of ten, and a perplexity range such as 12-40 holds none; so
    pick the roundest values that give at least three ticks, spread evenly in log space.
    Call after everything is drawn on `ax`: the ticks follow its current limits.
    """
    low, high = ax.get_ylim()
    exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in _TICK_MANTISSAS:
        candidates = np.array([m * 10.0**e for e in exponents for m in mantissas])
        candidates = candidates[(candidates >= low) & (candidates <= high)]
        if len(candidates) >= 3:
            break
    if len(candidates) < 2:
        return  # under two round values in range: matplotlib's own ticks are as good
    targets = np.geomspace(low, high, count)
    nearest = np.abs(np.log(candidates[:, None] / targets[None, :])).argmin(axis=0)
    ax.yaxis.set_major_locator(FixedLocator(np.unique(candidates[nearest])))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _save(figure: Figure, path: str | os.PathLike) -> Path:
    """Write under a temporary name beside `path`, then rename: a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600), and a figure should get the umask's permissions.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    handle = open(tmp, "xb")  # before the try: if this fails, there is no file of ours to remove
    try:
        with handle:
            figure.savefig(handle, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def plot_layer_scores(scores: Scores, path: str | os.PathLike, *, data: str | None = None) -> Path:
    """Per-layer scores of the `layer`, `attention` and `mlp` kinds that `scores` has, one line each."""
    kinds = [kind for kind in LAYER_KINDS if scores.has(kind)]
    if not kinds:
        raise ValueError(f"the {scores.criterion} scores have none of the per-layer kinds {list(LAYER_KINDS)}")
    figure, ax = _figure(_score_title("Importance per layer", scores, data))
    series = {kind: _array(scores.layer_values(kind)) for kind in kinds}
    for kind, values in series.items():
        ax.plot(np.arange(len(values)), values, linewidth=1.2, markersize=4, **_KIND_STYLE[kind])
    _set_yscale(ax, _scale_for(np.concatenate(list(series.values()))))
    _layer_axis(ax, max(len(values) for values in series.values()))
    ax.set_ylabel(f"importance ({_unit(scores)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(figure, path)


def plot_head_heatmap(
    scores: Scores, path: str | os.PathLike, kind: str = "head", *, data: str | None = None
) -> Path:
    """Layer x unit heatmap of `head` (with KV-group boundaries) or `kv_group` scores.

    Layers with fewer units (pruned, or no attention) leave grey cells.
    """
    if kind not in ("head", "kv_group"):
        raise ValueError(f"kind must be 'head' or 'kv_group', got {kind!r}")
    if not scores.has(kind):
        raise ValueError(f"the {scores.criterion} scores have no {kind!r} kind; kinds present: {sorted(scores.values)}")
    per_layer = [_array(values) for values in scores.values[kind]]
    rows = max(len(values) for values in per_layer)
    if rows == 0:
        raise ValueError(f"the {scores.criterion} {kind} scores are empty in every layer: no layer has attention")
    grid = np.full((rows, len(per_layer)), np.nan)  # rows: unit index, columns: layer
    for index, values in enumerate(per_layer):
        grid[: len(values), index] = values

    what = "Query-head importance" if kind == "head" else "KV-group importance"
    figure, ax = _figure(_score_title(what, scores, data))
    norm, clipped = _color_norm(grid)
    if clipped:
        # LogNorm masks values <= 0 as bad, which would paint them like a missing head; below vmin
        # they take the `under` colour instead. NaN stays NaN.
        grid = np.where(grid <= 0, norm.vmin / 10, grid)
    image = ax.imshow(
        grid, aspect="auto", interpolation="nearest", norm=norm,
        cmap=colormaps["viridis"].with_extremes(bad=_MISSING, under=_NONPOSITIVE),
    )
    figure.colorbar(image, ax=ax, pad=0.01, label=_unit(scores), extend="min" if clipped else "neither")
    _layer_axis(ax, len(per_layer))
    ax.set_yticks(range(0, rows, math.ceil(rows / 16)))
    ax.set_ylabel("query head" if kind == "head" else "KV group")

    notes = []
    if kind == "head" and scores.has("kv_group"):
        per_group = set()
        for index, (heads, groups) in enumerate(zip(per_layer, scores.values["kv_group"])):
            num_groups = len(groups)
            if num_groups < 2 or len(heads) % num_groups:
                continue
            per_group.add(len(heads) // num_groups)
            for group in range(1, num_groups):
                ax.hlines(group * len(heads) // num_groups - 0.5, index - 0.5, index + 0.5, colors="white", linewidth=2)
        if per_group:
            uniform = f" ({per_group.pop()} heads per group)" if len(per_group) == 1 else ""
            notes.append(f"white lines: KV-group boundaries{uniform}")
    if clipped:
        notes.append("red: score ≤ 0")
    if np.isnan(grid).any():
        notes.append(f"grey: no such {'head' if kind == 'head' else 'group'} in that layer")
    if notes:
        ax.set_title("; ".join(notes), fontsize=8, loc="left", color="#555555")
    return _save(figure, path)


def plot_channel_scores(scores: Scores, path: str | os.PathLike, *, data: str | None = None) -> Path:
    """FFN channel scores per layer as quantile bands: median, 25-75% and 5-95% of the layer's channels."""
    # Why bands: 30 layers x 1536 channels as 30 sorted curves is a tangle, and a heatmap of
    # sorted channel groups reads magnitude from colour, which the eye does poorly over several
    # decades. Bands put the value on a (log) axis and show each layer's level and spread at once;
    # a global pruning threshold is then a horizontal line, and the share of a layer's channels
    # below it can be read off the bands.
    if not scores.has("channel"):
        raise ValueError(f"the {scores.criterion} scores have no 'channel' kind; kinds present: {sorted(scores.values)}")
    per_layer = [_array(values) for values in scores.values["channel"]]
    if not any(len(values) for values in per_layer):
        raise ValueError(f"the {scores.criterion} channel scores are empty in every layer: no layer has an MLP")
    levels = (0.05, 0.25, 0.5, 0.75, 0.95)
    bands = np.array([np.quantile(values, levels) if len(values) else np.full(len(levels), np.nan) for values in per_layer])
    layers = np.arange(len(per_layer))

    figure, ax = _figure(_score_title("FFN channel importance per layer", scores, data))
    colour = _KIND_STYLE["mlp"]["color"]
    ax.fill_between(layers, bands[:, 0], bands[:, 4], color=colour, alpha=0.2, linewidth=0, label="5-95% of channels")
    ax.fill_between(layers, bands[:, 1], bands[:, 3], color=colour, alpha=0.45, linewidth=0, label="25-75%")
    ax.plot(layers, bands[:, 2], color=colour, marker="o", markersize=3, linewidth=1.2, label="median")
    without = [index for index, values in enumerate(per_layer) if not len(values)]
    _shade_layers(ax, without, color=_MISSING)
    _set_yscale(ax, _scale_for(bands))
    _layer_axis(ax, len(per_layer))
    ax.set_ylabel(f"channel importance ({_unit(scores)})")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if without:
        handles.append(Patch(color=_MISSING, label="no MLP"))
    ax.legend(handles=handles, fontsize=8)
    return _save(figure, path)


def plot_kept_widths(
    before: ModelStructure, after: ModelStructure, path: str | os.PathLike, dropped_layers: Sequence[int] = ()
) -> Path:
    """Per source layer, the kept share of query heads, KV groups and FFN channels.

    `after` lists the surviving layers in order (as `predicted_structure` gives them), so the
    source layers it maps onto are those not in `dropped_layers`.
    """
    dropped = sorted(set(dropped_layers))
    outside = [index for index in dropped if not 0 <= index < before.num_layers]
    if outside:
        raise ValueError(f"dropped layers {outside} out of range: the model had {before.num_layers} layers")
    survivors = sorted(set(range(before.num_layers)) - set(dropped))
    if len(survivors) != after.num_layers:
        raise ValueError(
            f"the pruned model has {after.num_layers} layers, but {before.num_layers} layers minus {len(dropped)} "
            f"dropped leaves {len(survivors)}; pass the dropped_layers of the plan that made it"
        )

    kept = {label: np.full(before.num_layers, np.nan) for label, _, _ in _WIDTH_KINDS}
    removed: dict[str, list[int]] = {label: [] for label, _, _ in _WIDTH_KINDS}
    for source, shape in zip(survivors, after.layers):
        for label, attribute, _ in _WIDTH_KINDS:
            total, left = getattr(before.layers[source], attribute), getattr(shape, attribute)
            if left > total:
                raise ValueError(
                    f"layer {source}: the pruned model has {left} {label}, more than the {total} it started with; "
                    f"`after` does not come from `before`"
                )
            if total:
                kept[label][source] = 100.0 * left / total
                if not left:
                    removed[label].append(source)

    old, new = before.non_embedding_params, after.non_embedding_params
    change = f"{100.0 * (new - old) / old:+.1f}%".replace("-", "−")  # a typographic minus, as in the axis labels
    figure, ax = _figure(
        f"Kept width per layer: {format_count(old)} → {format_count(new)} non-embedding params ({change})"
    )
    layers = np.arange(before.num_layers)
    width = 0.27
    for offset, (label, _, colour) in zip((-width, 0.0, width), _WIDTH_KINDS):
        ax.bar(layers + offset, kept[label], width, color=colour, label=label)
        # A removed sublayer is a bar of height 0, invisible; a cross says it is gone, not missing.
        ax.plot(np.array(removed[label]) + offset, np.full(len(removed[label]), 3.0),
                linestyle="none", marker="x", color=colour, markersize=6, markeredgewidth=2)
    _shade_layers(ax, dropped, facecolor="none", edgecolor="#999999", hatch="///")
    for index in dropped:
        ax.text(index, 50, "dropped", rotation=90, ha="center", va="center", fontsize=7, color="#333333",
                bbox=dict(facecolor="white", edgecolor="none", pad=1.5))
    _layer_axis(ax, before.num_layers)
    ax.set_ylim(0, 108)
    ax.set_ylabel("kept (% of original width)")
    ax.grid(axis="y", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if any(removed.values()):
        handles.append(Line2D([], [], linestyle="none", marker="x", color="#333333", markeredgewidth=1.8,
                              label="sublayer removed"))
    if dropped:
        handles.append(Patch(facecolor="none", edgecolor="#999999", hatch="///", label="layer dropped"))
    ax.legend(handles=handles, fontsize=8, ncols=len(handles), loc="lower center", bbox_to_anchor=(0.5, 1.0),
              frameon=False)
    return _save(figure, path)


def _removed_percent(point: Mapping, dense: Mapping | None) -> float:
    if "fraction_removed" in point:
        return 100.0 * float(point["fraction_removed"])
    if "params" in point:
        if not dense or "params" not in dense:
            raise ValueError(f"point {point.get('label')!r} gives params; pass dense={{'params': ...}} to compare with")
        return 100.0 * (1.0 - float(point["params"]) / float(dense["params"]))
    raise ValueError(f"point {dict(point)!r} needs 'fraction_removed' (0-1) or 'params' (non-embedding, kept)")


def _label_point(ax, x: float, y: float, text: str, color: str) -> None:
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8, color=color)


def plot_quality_vs_size(
    points: Sequence[Mapping],
    path: str | os.PathLike,
    dense: Mapping | None = None,
    *,
    data: str | None = None,
) -> Path:
    """Perplexity against the share of non-embedding parameters removed, one series per label.

    Each point has `label` (its series: method or criterion, or what the model is: pruned,
    recovered), `perplexity`, and either `fraction_removed` (0-1) or `params` (non-embedding
    parameters kept, then `dense` needs `params`). `dense` may give the unpruned model's
    `perplexity`, drawn as a reference. Every point is written with its value beside it.
    """
    if not points:
        raise ValueError("no points to plot")
    series: dict[str, list[tuple[float, float]]] = {}
    for point in points:
        series.setdefault(str(point.get("label", "")), []).append((_removed_percent(point, dense), float(point["perplexity"])))

    figure, ax = _figure("Perplexity against size" + (f" on {data}" if data else ""))
    for label, pairs in series.items():
        removed, perplexity = zip(*sorted(pairs))
        line, = ax.plot(removed, perplexity, marker="o", markersize=4, linewidth=1.2, label=label or None)
        for x, y in zip(removed, perplexity):
            _label_point(ax, x, y, f"{label}: {y:.4g}" if label and len(pairs) == 1 else f"{y:.4g}", line.get_color())
    if dense and "perplexity" in dense:
        reference = float(dense["perplexity"])
        ax.axhline(reference, color="#555555", linestyle="--", linewidth=0.9)
        ax.plot([0.0], [reference], marker="*", markersize=11, color="black", linestyle="none",
                label=f"dense ({reference:.4g})")
        _label_point(ax, 0.0, reference, f"dense: {reference:.4g}", "black")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlim(left=-1.0)
    ax.set_xlabel("non-embedding parameters removed (%)")
    ax.set_ylabel("perplexity (log scale)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(figure, path)


def _running_mean(values: np.ndarray, window: int) -> np.ndarray:
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    path: str | os.PathLike,
    eval_points: Sequence[tuple[int, float]] | None = None,
    *,
    data: str | None = None,
) -> Path:
    """Training loss per step (raw and smoothed), with held-out perplexity at `eval_points`
    ((step, perplexity) pairs) on a second, log axis; `data` names the held-out set."""
    steps_array, losses_array = np.asarray(steps, dtype=float), np.asarray(losses, dtype=float)
    if len(steps_array) != len(losses_array) or not len(steps_array):
        raise ValueError(f"steps and losses must be non-empty and of equal length, got {len(steps_array)} and {len(losses_array)}")
    figure, ax = _figure("Recovery training")
    # Per-step loss of small batches is noisy; a running mean over ~2% of the run shows the trend.
    window = max(1, len(losses_array) // 50)
    if window > 1:
        ax.plot(steps_array, losses_array, color="#1f77b4", alpha=0.25, linewidth=0.8, label="training loss")
        ax.plot(steps_array[window - 1:], _running_mean(losses_array, window), color="#1f77b4", linewidth=1.5,
                label=f"running mean of {window} steps")
    else:
        ax.plot(steps_array, losses_array, color="#1f77b4", linewidth=1.2, marker="o", markersize=3, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats/token)")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if eval_points:
        eval_steps, perplexities = zip(*eval_points)
        right = ax.twinx()
        right.plot(eval_steps, perplexities, color="#d62728", marker="D", markersize=5, linewidth=1.2,
                   label="held-out perplexity" + (f" ({data})" if data else ""))
        right.set_yscale("log")
        _plain_log_ticks(right)
        right.set_ylabel("held-out perplexity (log scale)", color="#d62728")
        right.tick_params(axis="y", colors="#d62728")
        handles += right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="best")
    return _save(figure, path)


def plot_speedup_vs_size(points: Sequence[Mapping], path: str | os.PathLike) -> Path:
    """Measured speedups (prefill, decode at batch 1) against the share of non-embedding parameters
    removed, with the ideal speedup from FLOPs per token. Each point has `fraction_removed`,
    `ideal_speedup` and `speedup` (metric -> median ratio)."""
    if not points:
        raise ValueError("no points to plot")
    ordered = sorted(points, key=lambda p: p["fraction_removed"])
    removed = [100 * p["fraction_removed"] for p in ordered]
    figure, ax = _figure("Speedup against size (measured beside the dense model)")
    ax.plot(removed, [p["ideal_speedup"] for p in ordered], color="#555555", linestyle="--", marker="o", markersize=3,
            linewidth=1.0, label="ideal (FLOPs per token)")
    for metric, label, color in (("prefill_tokens_per_s", "prefill", "#1f77b4"),
                                 ("decode_tokens_per_s_batch1", "decode, batch 1", "#d62728")):
        if all(metric in p["speedup"] for p in ordered):
            ax.plot(removed, [p["speedup"][metric] for p in ordered], marker="o", markersize=4, linewidth=1.2,
                    color=color, label=label)
    ax.axhline(1.0, color="#999999", linewidth=0.8)
    ax.set_xlabel("non-embedding parameters removed (%)")
    ax.set_ylabel("speedup over the dense model (x)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(figure, path)


def plot_allocation_search(search: Mapping, path: str | os.PathLike) -> Path:
    """The allocation search of a prune (its record in prunekit.json): the parent's fitness by
    generation, and the basis removed per layer by the search next to global allocation's."""
    figure = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * 1.6), dpi=DPI, layout="constrained")
    figure.suptitle("allocation search", fontsize=11)
    trace_ax, layers_ax = figure.subplots(2, 1)
    trace = search["trace"]
    trace_ax.plot([t["generation"] for t in trace], [t["fitness"] for t in trace], color="C0", label="parent")
    tried = [t for t in trace if "child_fitness" in t]
    trace_ax.scatter([t["generation"] for t in tried], [t["child_fitness"] for t in tried], s=6, color="C1",
                     label="best child")
    trace_ax.set_xlabel("generation")
    trace_ax.set_ylabel("KL from the dense model (held-out rows)")
    trace_ax.legend(fontsize=8)
    start, found = np.array(search["start_removed_per_layer"]), np.array(search["removed_per_layer"])
    index = np.arange(len(found))
    layers_ax.bar(index - 0.2, start, width=0.4, color="C7", label="global (the search's start)")
    layers_ax.bar(index + 0.2, found, width=0.4, color="C0", label="search")
    layers_ax.set_ylabel("removed per layer (basis units)")
    layers_ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: format_count(value)))
    _layer_axis(layers_ax, len(found))
    layers_ax.legend(fontsize=8)
    return _save(figure, path)
