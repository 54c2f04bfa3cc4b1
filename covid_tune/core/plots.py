"""Pictures: confusion matrices (leaderboard PNGs and TensorBoard images) and the
leaderboard's comparison chart. matplotlib only, on the Agg backend."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_confusion(ax, matrix: np.ndarray, label: str) -> None:
    """One 2x2 confusion matrix on a matplotlib axis (rows true, columns predicted)."""
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        colour = "white" if count > matrix.max() / 2 else "black"
        ax.text(j, i, str(int(count)), ha="center", va="center", color=colour)
    ax.set_xticks([0, 1], [f"not {label}", label], fontsize=7)
    ax.set_yticks([0, 1], [f"not {label}", label], fontsize=7)
    ax.set_xlabel("predicted", fontsize=7)
    ax.set_ylabel("true", fontsize=7)


def confusion_figure(confusion, title: str = "", panel: float = 2.4, dpi: int = 80):
    """A figure of one 2x2 matrix (binary) or one per label (multilabel, a dict);
    ``None`` for a matrix that was not scored."""
    plt = pyplot()
    panels = confusion if isinstance(confusion, dict) else {"infected": confusion}
    fig, axes = plt.subplots(1, len(panels), figsize=(panel * len(panels), panel + 0.1),
                             dpi=dpi, squeeze=False)
    for ax, (label, matrix) in zip(axes[0], panels.items()):
        if matrix is None:
            ax.text(0.5, 0.5, "not scored", ha="center", va="center")
            ax.set_axis_off()
        else:
            draw_confusion(ax, np.asarray(matrix), label)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def confusion_image(confusion) -> np.ndarray:
    """The confusion figure as an RGB array (TensorBoard's image summary)."""
    fig = confusion_figure(confusion)
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    pyplot().close(fig)
    return image


def write_confusion(confusion, title: str, path: Path) -> None:
    fig = confusion_figure(confusion, title, panel=2.8, dpi=100)
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


def write_chart(labels: list[str], scores: list[dict[str, dict]], splits: list[str],
                path: Path) -> None:
    """Accuracy and F1 of every row, one panel per split: the assignment's bar chart."""
    plt = pyplot()
    fig, axes = plt.subplots(len(splits), 1, squeeze=False,
                             figsize=(max(5, 1.3 * len(labels)), 2.8 * len(splits)))
    x = np.arange(len(labels))
    for ax, split in zip(axes[:, 0], splits):
        for offset, key in ((-0.2, "accuracy"), (0.2, "f1")):
            values = [row.get(split, {}).get(key, math.nan) for row in scores]
            ax.bar(x + offset, values, width=0.4, label=key)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(split)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_roc(labels: list[str], curves: list[tuple[list, list] | None], title: str,
              path: Path) -> None:
    """One ROC curve per row on one chart (rows with no curve are left out)."""
    plt, fig, ax = unit_square()
    for label, curve in zip(labels, curves):
        if curve is not None:
            ax.plot(*curve, linewidth=1.2, label=label.replace("\n", ", "))
    save_unit_square(plt, fig, ax, ("false positive rate", "true positive rate"), title,
                     any(curve is not None for curve in curves), "lower right", path)


def write_reliability(curves: dict[str, list[tuple[float, float, int]]], title: str,
                      path: Path) -> None:
    """A reliability diagram: for each curve (name -> the points of
    ``covid_tune.core.calibration.reliability``), the fraction of positives against
    the mean predicted probability per bin, each point sized by its images; a perfectly
    calibrated model lies on the diagonal."""
    plt, fig, ax = unit_square()
    for (name, points), style in zip(curves.items(), ("o:", "s-", "^-", "d-")):
        if points:
            claimed, observed, count = zip(*points)
            ax.plot(claimed, observed, style, linewidth=1.2, label=name, markersize=3)
            ax.scatter(claimed, observed, s=[8 + 60 * c / max(count) for c in count],
                       alpha=0.35)
    save_unit_square(plt, fig, ax, ("mean predicted probability (bin)", "fraction positive"),
                     title, any(curves.values()), "upper left", path)


def unit_square():
    """A 5 x 5 inch chart of [0, 1] x [0, 1] with its diagonal dashed."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    return plt, fig, ax


def save_unit_square(plt, fig, ax, axes: tuple[str, str], title: str, drawn: bool,
                     legend: str, path: Path) -> None:
    """Label, limit and save a ``unit_square`` chart; "not scored" on it when no curve
    was drawn (the dataset was not found)."""
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title, fontsize=9)
    if drawn:
        ax.legend(fontsize=7, loc=legend)
    else:
        ax.text(0.5, 0.5, "not scored (the dataset was not found)", ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_pareto(metric: str, panels: dict[str, dict], title: str, path: Path) -> None:
    """``metric`` (the y-axis label) against each cost (name -> panel), one panel per cost: every trial a
    point, the front a step line through its points, the best trial annotated; a log
    x-axis where the costs span more than 10x. A panel holds ``trials`` and ``front``,
    lists of (cost, metric), and ``best``, (cost, metric, label)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (cost, panel) in zip(axes[0], panels.items()):
        draw_front(ax, panel)
        ax.set_xlabel(f"{cost} (lower is better)")
        ax.set_ylabel(metric)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_front(ax, panel: dict) -> None:
    """One panel of ``write_pareto``."""
    costs, values = zip(*panel["trials"]) if panel["trials"] else ((), ())
    ax.scatter(costs, values, s=18, color="grey", alpha=0.6, label="trial")
    if panel["front"]:
        front_costs, front_values = zip(*sorted(panel["front"]))
        ax.step(front_costs, front_values, where="post", color="tab:blue", linewidth=1.2)
        ax.scatter(front_costs, front_values, s=40, color="tab:blue", label="Pareto front")
    if panel.get("best"):
        x, y, label = panel["best"]
        ax.scatter([x], [y], s=90, marker="*", color="tab:red", label="best", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=7)
    positive = [c for c in costs if c > 0]
    if positive and max(positive) > 10 * min(positive):
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.legend(fontsize=7)
