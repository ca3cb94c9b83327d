"""The demo's plot: accuracy on the new task against trainable parameters (log scale)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vera_cli.demo.report import Result
from vera_core.atomic import write_file


def plot(results: Sequence[Result], path: Path, *, title: str) -> None:
    """Save a PNG: one point per method, before-adaptation accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    # neighbours on the x axis alternate their labels below and above, so they do not overlap
    by_size = sorted(results, key=lambda r: r.trainable_parameters)
    for index, result in enumerate(by_size):
        axes.scatter(result.trainable_parameters, 100 * result.accuracy_after, s=60, zorder=3)
        axes.annotate(
            result.label,
            (result.trainable_parameters, 100 * result.accuracy_after),
            textcoords="offset points",
            xytext=(6, -14 if index % 2 == 0 else 7),
            fontsize=9,
        )
    if results:
        axes.axhline(
            100 * results[0].accuracy_before, color="grey", linestyle="--", linewidth=1, label="before adaptation"
        )
        axes.legend(loc="lower right", fontsize=9)
    axes.set_xscale("log")
    if results:
        counts = [r.trainable_parameters for r in results]
        axes.set_xlim(min(counts) / 2, max(counts) * 4)
    axes.set_xlabel("trainable parameters (log scale)")
    axes.set_ylabel("test accuracy on the new task (%)")
    axes.set_ylim(0, 108)
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    write_file(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
