"""The demo's plot: accuracy on the new task against trainable parameters (log scale)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vera_cli.demo.report import Result
from vera_core.atomic import write_file


def accuracy_range(values: Sequence[float], *, margin: float = 0.2, least: float = 4.0) -> tuple[float, float]:
    """The y range (in %) that shows ``values`` with a margin, at least ``least`` points tall, within 0-100.

    Examples
    --------
    >>> accuracy_range([91.5, 95.6, 97.0])
    (90.4, 98.1)
    >>> accuracy_range([99.0])
    (96.0, 100.0)
    """
    low, high = min(values), max(values)
    pad = max((high - low) * margin, (least - (high - low)) / 2, 0.0)
    low, high = max(low - pad, 0.0), min(high + pad, 100.0)
    if high - low < least:  # pushed against 0 or 100: grow the other way
        low, high = (max(high - least, 0.0), high) if high == 100.0 else (low, min(low + least, 100.0))
    return round(low, 1), round(high, 1)


def plot(results: Sequence[Result], path: Path, *, title: str) -> None:
    """Save a PNG: one point per method, the before-adaptation accuracy as a labelled dashed line.

    The accuracy axis is zoomed to the adapted accuracies. When the before-adaptation
    accuracy lies far below them, it gets a slim panel of its own under a broken axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.layout_engine import ConstrainedLayoutEngine

    after = [100 * r.accuracy_after for r in results] or [0.0, 100.0]
    low, high = accuracy_range(after)
    before = 100 * results[0].accuracy_before if results else None
    line = None
    if before is not None and before < low - (high - low) / 2:  # far below: its own panel, the axis broken
        figure, (axes, line) = plt.subplots(
            2,
            1,
            sharex=True,
            figsize=(6.4, 4.6),
            dpi=120,
            layout=ConstrainedLayoutEngine(hspace=0.0, h_pad=0.03),
            height_ratios=(5, 1),
        )
        _break(axes, line)
        line.set_ylim(before - 2, before + 2)
        line.set_yticks([before], [f"{before:.1f}"])
        line.grid(True, which="both", alpha=0.3)
    else:
        figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120, layout="constrained")
        if before is not None:
            low = min(low, round(before - 1, 1))
    axes.set_ylim(low, high)
    if before is not None:
        (line or axes).axhline(before, color="grey", linestyle="--", linewidth=1)
        (line or axes).annotate(
            f"before adaptation: {before:.1f}%",
            (1.0, before),
            xycoords=("axes fraction", "data"),
            xytext=(-4, 3),
            textcoords="offset points",
            ha="right",
            va="bottom",
            fontsize=9,
            color="dimgrey",
        )
    # neighbours on the x axis alternate their labels below and above, so they do not overlap;
    # the rightmost label stands to the left of its point
    by_size = sorted(results, key=lambda r: r.trainable_parameters)
    for index, result in enumerate(by_size):
        point = (result.trainable_parameters, 100 * result.accuracy_after)
        axes.scatter(*point, s=60, zorder=3)
        last = index == len(by_size) - 1
        axes.annotate(
            f"{result.label}: {point[1]:.1f}%",
            point,
            textcoords="offset points",
            xytext=(-6 if last else 6, -14 if index % 2 == 0 else 7),
            ha="right" if last else "left",
            fontsize=9,
        )
    axes.set_xscale("log")
    if results:
        counts = [r.trainable_parameters for r in results]
        axes.set_xlim(min(counts) / 2, max(counts) * 4)
    (line or axes).set_xlabel("trainable parameters (log scale)")
    axes.set_ylabel("test accuracy on the new task (%)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    write_file(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def _break(top: Any, bottom: Any) -> None:
    """Draw the two panels as one axis with a gap: no spines between them, diagonal marks at the cut."""
    top.spines["bottom"].set_visible(False)
    bottom.spines["top"].set_visible(False)
    top.tick_params(axis="x", which="both", bottom=False)
    marks = {"marker": [(-1, -0.5), (1, 0.5)], "markersize": 10, "linestyle": "none", "color": "k", "clip_on": False}
    top.plot([0, 1], [0, 0], transform=top.transAxes, **marks)
    bottom.plot([0, 1], [1, 1], transform=bottom.transAxes, **marks)


def plot_tenants(
    path: Path,
    *,
    angles: Sequence[float],
    before: Sequence[float],
    after: Sequence[float],
    storage: Sequence[tuple[str, int]],
    title: str,
) -> None:
    """Save the many-users PNG: accuracy against each user's angle, its distribution, and storage for all users."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    figure, (by_angle, spread, sizes) = plt.subplots(1, 3, figsize=(13.5, 4.2), dpi=110)
    before_pct, after_pct = [100 * a for a in before], [100 * a for a in after]
    small = max(2.0, min(12.0, 4000.0 / max(1, len(angles))))
    by_angle.scatter(angles, before_pct, s=small, color="0.6", label="before adaptation", zorder=2)
    by_angle.scatter(angles, after_pct, s=small, color="tab:blue", label="after (one batched run)", zorder=3)
    by_angle.set_xlabel("the user's rotation of the digits (degrees)")
    by_angle.set_ylabel("the user's test accuracy (%)")
    by_angle.set_xlim(-180, 180)
    by_angle.set_xticks(range(-180, 181, 90))
    by_angle.set_ylim(0, 102)
    by_angle.legend(loc="center left", bbox_to_anchor=(0.01, 0.6), fontsize=8)
    by_angle.grid(True, alpha=0.3)

    bins = [5 * i for i in range(21)]
    spread.hist(before_pct, bins=bins, color="0.6", alpha=0.8, label="before")
    spread.hist(after_pct, bins=bins, color="tab:blue", alpha=0.7, label="after")
    spread.set_xlabel("per-user test accuracy (%)")
    spread.set_ylabel("users")
    spread.legend(loc="upper left", fontsize=8)
    spread.grid(True, alpha=0.3)

    labels = [label for label, _ in storage]
    values = [value for _, value in storage]
    bars = sizes.bar(range(len(values)), values, color=["tab:blue", "tab:orange", "tab:red"][: len(values)])
    sizes.set_yscale("log")
    sizes.set_xticks(range(len(values)), labels, fontsize=8)
    sizes.set_ylabel(f"bytes for all {len(angles):,} users (log scale)")
    users = max(1, len(angles))
    for bar, value in zip(bars, values, strict=True):
        sizes.annotate(
            f"{human_bytes(value)}\n{human_bytes(value / users)} per user",
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    sizes.set_ylim(min(values) / 3, max(values) * 6)
    sizes.grid(True, axis="y", which="both", alpha=0.3)

    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    write_file(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


def human_bytes(value: float) -> str:
    """A byte count in KB/MB/GB (powers of 1000).

    Examples
    --------
    >>> human_bytes(1_320_000), human_bytes(999)
    ('1.3 MB', '999 B')
    """
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"
