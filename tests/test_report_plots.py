"""Report figures and the analysis report: every figure is a readable PNG of README size, written
atomically; the report holds its tables, links only to files that exist, and notes what the
criterion did not measure instead of failing."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model
from matplotlib.figure import Figure
from PIL import Image

from prunekit import LayerPlan, Plan, model_structure, predicted_structure
from prunekit.models.structure import ModelStructure
from prunekit.report import (
    plot_channel_scores,
    plot_head_heatmap,
    plot_kept_widths,
    plot_layer_scores,
    plot_loss_curve,
    plot_quality_vs_size,
    write_analysis_report,
)
from prunekit.report.plots import DPI, FIGSIZE, _scale_for
from prunekit.score.scores import KINDS, Scores

# Uneven on purpose: no attention in layer 0, 6 of 8 heads in layer 1, no MLP in layer 3.
UNEVEN = Plan(
    layers={
        0: LayerPlan(drop_attention=True),
        1: LayerPlan(keep_query_heads=(0, 1, 2, 4, 5, 6), keep_channels=tuple(range(30))),
        3: LayerPlan(drop_mlp=True),
    },
    drop_layers=(2,),
)
CALIBRATION = {"source": "wikitext2", "n_samples": 4, "seq_len": 32, "seed": 0}
_WIDTH = {"head": "num_attention_heads", "kv_group": "num_key_value_heads", "channel": "intermediate_size"}


@pytest.fixture(scope="module")
def structure() -> ModelStructure:
    return model_structure(tiny_model("llama"))  # 4 layers, 8 heads in 2 KV groups, 80 channels


@pytest.fixture(scope="module")
def uneven(structure) -> ModelStructure:
    return predicted_structure(UNEVEN, structure)


def fake_scores(structure: ModelStructure, kinds=KINDS, seed: int = 0) -> Scores:
    """Scores shaped like `structure`: log-normal, layer 0 at 50x the rest, a few slightly negative."""
    generator = torch.Generator().manual_seed(seed)
    values: dict[str, list[torch.Tensor]] = {kind: [] for kind in kinds}
    for index, shape in enumerate(structure.layers):
        for kind in kinds:
            count = getattr(shape, _WIDTH[kind]) if kind in _WIDTH else 1
            drawn = torch.exp(torch.randn(count, generator=generator, dtype=torch.float64) * 1.5 - 4)
            drawn *= 50.0 if index == 0 else 1.0
            drawn[3::7] *= -0.05  # removing these units helped a little: calibration noise
            values[kind].append(drawn if kind in _WIDTH else drawn.reshape(()))
    return Scores("sensitivity", values, {"unit": "loss increase (nats/token)", "cost": {"seconds": 1.5, "removals": 42}})


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
        image.load()  # decodes every pixel: a truncated file fails here
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"


PLOTS = {
    "layer scores": lambda s, u, path: plot_layer_scores(fake_scores(u), path, data="wikitext2"),
    "head heatmap": lambda s, u, path: plot_head_heatmap(fake_scores(u), path),
    "kv-group heatmap": lambda s, u, path: plot_head_heatmap(fake_scores(u), path, kind="kv_group"),
    "channel scores": lambda s, u, path: plot_channel_scores(fake_scores(u), path),
    "kept widths": lambda s, u, path: plot_kept_widths(s, u, path, dropped_layers=UNEVEN.drop_layers),
    "quality vs size": lambda s, u, path: plot_quality_vs_size(
        [{"label": "taylor", "fraction_removed": 0.2, "perplexity": 30.0},
         {"label": "taylor", "fraction_removed": 0.1, "perplexity": 20.0},
         {"label": "magnitude", "params": s.non_embedding_params * 0.8, "perplexity": 45.0}],
        path, dense={"perplexity": 15.0, "params": s.non_embedding_params}, data="wikitext2 test",
    ),
    "loss curve": lambda s, u, path: plot_loss_curve(
        list(range(200)), (3 + np.exp(-np.arange(200) / 50)).tolist(), path, eval_points=[(0, 40.0), (199, 25.0)],
    ),
}


@pytest.mark.parametrize("name", PLOTS)
def test_every_plot_writes_a_readable_png(name, structure, uneven, tmp_path):
    path = tmp_path / "figures" / f"{name.replace(' ', '_')}.png"
    assert PLOTS[name](structure, uneven, path) == path
    _assert_png(path)


def test_plots_of_the_unpruned_model(structure, tmp_path):
    scores = fake_scores(structure)
    for plot in (plot_layer_scores, plot_head_heatmap, plot_channel_scores):
        _assert_png(plot(scores, tmp_path / f"{plot.__name__}.png"))
    _assert_png(plot_kept_widths(structure, structure, tmp_path / "kept.png"))


@pytest.mark.parametrize("values, scale", [
    ([1.0, 2.0, 3.0], "linear"),
    ([-0.1, 0.5, 1.0], "linear"),
    ([50.0, 1.0, 1.2, 0.9], "log"),             # layer 0 at 50x the rest
    ([50.0, 1.0, -0.01, 0.0], "symlog"),         # and some slightly negative, or zero
])
def test_scale_follows_the_span_and_sign_of_the_values(values, scale):
    assert _scale_for(np.array(values)).name == scale


def test_heatmap_without_kv_groups_and_missing_kinds_are_refused(structure, tmp_path):
    _assert_png(plot_head_heatmap(fake_scores(structure, kinds=("head",)), tmp_path / "heads.png"))
    only_layers = fake_scores(structure, kinds=("layer",))
    for plot, kind in ((plot_head_heatmap, "head"), (plot_channel_scores, "channel")):
        with pytest.raises(ValueError, match=f"no '{kind}' kind"):
            plot(only_layers, tmp_path / "x.png")
    with pytest.raises(ValueError, match="none of the per-layer kinds"):
        plot_layer_scores(fake_scores(structure, kinds=("channel",)), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_a_failed_write_leaves_the_previous_figure(structure, tmp_path, monkeypatch):
    path = plot_layer_scores(fake_scores(structure), tmp_path / "layers.png")
    before = path.read_bytes()

    def half_written(self, handle, **kwargs):
        handle.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        plot_layer_scores(fake_scores(structure, seed=1), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]


def test_bad_inputs_fail_with_a_clear_message(structure, uneven, tmp_path):
    with pytest.raises(ValueError, match="pass the dropped_layers"):
        plot_kept_widths(structure, uneven, tmp_path / "x.png")
    with pytest.raises(ValueError, match="does not come from"):
        plot_kept_widths(uneven, predicted_structure(Plan(drop_layers=(2,)), structure), tmp_path / "x.png")
    with pytest.raises(ValueError, match="pass dense="):
        plot_quality_vs_size([{"label": "a", "params": 10, "perplexity": 20.0}], tmp_path / "x.png")
    with pytest.raises(ValueError, match="equal length"):
        plot_loss_curve([1, 2, 3], [4.0, 3.0], tmp_path / "x.png")


def _links(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


def test_analysis_report_has_its_tables_and_figures(uneven, tmp_path):
    scores = fake_scores(uneven)
    path = write_analysis_report(scores, uneven, tmp_path / "analysis", title="Tiny llama", calibration=CALIBRATION)
    assert path == tmp_path / "analysis" / "analysis.md"
    report = path.read_text(encoding="utf-8")

    assert report.startswith("# Tiny llama\n")
    assert "`sensitivity`" in report and "loss increase (nats/token)" in report
    assert "source = wikitext2" in report and "**Tokens:** 128." in report and "seconds = 1.5" in report
    assert "| layer | heads / KV groups | FFN channels | whole layer (rank) | attention (rank) | MLP (rank) |" in report
    assert re.search(r"^\| 1 \| 6 / 2 \| 30 \| ", report, re.MULTILINE)
    assert "**10 least important**" in report and "**10 most important:**" in report
    assert re.search(r"^\| 1 \| \d \| \d \| \d \| [-\d.e]+ \|$", report, re.MULTILINE)  # rank 1 in the head table
    assert "| layer | channels | min | 5% | median | 95% | max | sum |" in report
    assert re.search(r"^\| 2 \| 0 \| – \|", report, re.MULTILINE)  # the layer without an MLP

    links = _links(report)
    assert set(links) == {"layer_scores.png", "head_scores.png", "kv_group_scores.png", "channel_scores.png"}
    for link in links:
        assert not Path(link).is_absolute()
        _assert_png(path.parent / link)


def test_analysis_report_skips_kinds_not_measured(structure, tmp_path):
    scores = fake_scores(structure, kinds=("layer", "channel"))
    path = write_analysis_report(scores, structure, tmp_path, title="Partial", calibration={})
    report = path.read_text(encoding="utf-8")
    assert "sensitivity did not measure `attention`, `mlp`: skipped." in report
    assert "sensitivity did not measure `head`: skipped." in report
    assert "sensitivity did not measure `kv_group`: skipped." in report
    assert "**Calibration data:** not recorded." in report
    assert set(_links(report)) == {"layer_scores.png", "channel_scores.png"}
    assert all((tmp_path / link).is_file() for link in _links(report))


def test_analysis_report_refuses_scores_of_another_model(structure, uneven, tmp_path):
    with pytest.raises(ValueError, match="report on the model that was scored"):
        write_analysis_report(fake_scores(uneven), structure, tmp_path, title="x", calibration=CALIBRATION)
    assert not (tmp_path / "analysis.md").exists()


def _drawn(monkeypatch) -> list[Figure]:
    """The figures the plot functions save, kept for inspection."""
    from prunekit.report import plots

    figures: list[Figure] = []
    save = plots._save

    def keep(figure, path):
        figures.append(figure)
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_quality_vs_size_labels_every_point_with_its_value(tmp_path, monkeypatch):
    figures = _drawn(monkeypatch)
    points = [{"label": "pruned", "params": 70, "perplexity": 31.25}, {"label": "recovered", "params": 70, "perplexity": 24.5}]
    plot_quality_vs_size(points, tmp_path / "q.png", dense={"params": 100, "perplexity": 20.0}, data="wikitext2")
    (axes,) = figures[0].axes
    assert {text.get_text() for text in axes.texts} == {"pruned: 31.25", "recovered: 24.5", "dense: 20"}
    assert set(axes.get_legend_handles_labels()[1]) == {"pruned", "recovered", "dense (20)"}
    # a series of several points labels each point with its value only
    figures.clear()
    sweep = [{"label": "taylor", "fraction_removed": f, "perplexity": p} for f, p in ((0.2, 30.0), (0.4, 55.5))]
    plot_quality_vs_size(sweep, tmp_path / "s.png")
    assert {text.get_text() for text in figures[0].axes[0].texts} == {"30", "55.5"}
