"""Reports: figures and Markdown that show what a criterion measured and what pruning kept."""
from prunekit.report.analysis import describe_calibration, write_analysis_report
from prunekit.report.plots import (
    plot_channel_scores,
    plot_head_heatmap,
    plot_kept_widths,
    plot_layer_scores,
    plot_loss_curve,
    plot_quality_vs_size,
)

__all__ = [
    "describe_calibration", "plot_channel_scores", "plot_head_heatmap", "plot_kept_widths", "plot_layer_scores",
    "plot_loss_curve", "plot_quality_vs_size", "write_analysis_report",
]
