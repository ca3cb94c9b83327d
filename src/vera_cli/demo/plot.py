"""The demo's plot: accuracy on the new task against trainable parameters (log scale)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vera_cli.demo.report import Result
from vera_core.adapter_file import write_atomically


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
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)


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
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png"))
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
