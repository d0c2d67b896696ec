"""Figures written next to results: per-layer score bars and layer × task heatmaps (matplotlib, Agg)."""

from collections.abc import Sequence
from pathlib import Path

__all__ = ["pyplot", "score_bars", "relevance_heatmap"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, imported on first use (keeps start-up fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def score_bars(scores: Sequence[float | None], path: str | Path, *, title: str, ylabel: str, highlight: Sequence[int] = ()) -> Path:
    """Bar plot of one score per layer (``None`` bars are left empty); ``highlight`` bars in red."""
    values = [float("nan") if v is None else v for v in scores]
    colors = ["tab:red" if i in set(highlight) else "tab:blue" for i in range(len(values))]
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(max(6, 0.3 * len(values)), 3.5))
    axis.bar(range(len(values)), values, color=colors)
    axis.set_xlabel("layer")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.set_xticks(range(len(values)))
    axis.tick_params(axis="x", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)


def relevance_heatmap(panels: dict[str, dict[str, Sequence[float | None]]], path: str | Path, *, title: str) -> Path:
    """One heatmap panel per metric: rows are layers, columns the tasks (``panels[metric][task]``)."""
    plt = pyplot()
    figure, axes = plt.subplots(
        1, len(panels), figsize=(3 + 2.2 * len(panels) * max(len(p) for p in panels.values()) / 3, 7), squeeze=False
    )
    for axis, (metric, columns) in zip(axes[0], panels.items()):
        names = list(columns)
        matrix = [[float("nan") if v is None else v for v in columns[name]] for name in names]
        image = axis.imshow(list(map(list, zip(*matrix))), aspect="auto", cmap="viridis")
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right")
        axis.set_ylabel("layer")
        axis.set_title(metric)
        figure.colorbar(image, ax=axis)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return Path(path)
