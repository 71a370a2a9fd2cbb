"""The PNG: increments per second against writer threads, one panel per engine.

It is drawn from the same data as bench.json (so a chart can be redrawn from
a kept JSON file with ``draw``). matplotlib comes with the ``bench`` extra and
is imported only here, with the Agg backend, so the chart draws the same with
or without a display, and type checking works with or without the extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .contenders import CONTENDERS
from .results import median_points

if TYPE_CHECKING:
    from matplotlib.artist import Artist  # type: ignore[import-not-found,unused-ignore]
    from matplotlib.axes import Axes  # type: ignore[import-not-found,unused-ignore]

# One colour, marker and line per contender, the same on every panel.
_STYLE = {
    "blind": ("black", "o", "--"),
    "naive": ("tab:red", "x", ":"),
    "txn-1": ("tab:orange", "v", "-"),
    "txn-5": ("tab:olive", "^", "-"),
    "txn-20": ("tab:green", "<", "-"),
    "txn-50": ("tab:cyan", ">", "-"),
    "transform-20": ("tab:purple", "D", "-"),
    "counter": ("tab:blue", "s", "-"),
    "counter-solo": ("tab:brown", "s", "--"),
    "counter-unread": ("tab:blue", "s", ":"),
    "bounded": ("tab:gray", "P", "-"),
    "buffer": ("tab:pink", "*", "-."),
}
_ORDER = [c.key for c in CONTENDERS]
_FLOOR = 0.1  # a rate of 0 has no place on a log scale
_NUDGE = 1.12  # the multi-process markers sit just right of the thread count they match


def draw(path: Path, data: Mapping[str, Any], titles: Mapping[str, str]) -> None:
    """Draw ``data`` (shaped as bench.json) to ``path``."""
    import matplotlib  # type: ignore[import-not-found,unused-ignore]

    matplotlib.use("Agg")
    from matplotlib import pyplot  # type: ignore[import-not-found,unused-ignore]

    engines = data["engines"]
    figure, axes = pyplot.subplots(
        1, len(engines), figsize=(6.6 * len(engines), 7.6), sharey=True, squeeze=False
    )
    for axis, (engine, results) in zip(axes[0], engines.items(), strict=True):
        _panel(axis, results, titles.get(engine, engine))
    axes[0][0].set_ylabel("increments per second (log scale)")
    # Every contender that ran anywhere, once, below the panels, in the listed order.
    legend: dict[str, Artist] = {}
    for axis in axes[0]:
        for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    figure.legend(
        list(legend.values()), list(legend), loc="lower center", ncol=4, fontsize="small",
        frameon=False,
    )  # fmt: skip
    figure.suptitle("sharded-counter: increments/s against writer threads (higher is better)")
    figure.tight_layout(rect=(0, 0.1, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def _rank(key: str) -> int:
    return _ORDER.index(key) if key in _ORDER else len(_ORDER)


def _panel(ax: Axes, results: Mapping[str, Any], title: str) -> None:
    by_contender: dict[str, list[dict[str, Any]]] = {}
    for point in median_points(results):
        by_contender.setdefault(point["contender"], []).append(point)
    threads: set[int] = set()
    for key in sorted(by_contender, key=_rank):
        points = by_contender[key]
        colour, marker, line = _STYLE.get(key, ("grey", ".", "-"))
        single = sorted((p for p in points if p["processes"] == 1), key=lambda p: p["threads"])
        threads.update(p["threads"] for p in single)
        ax.plot(
            [p["threads"] for p in single],
            [max(p["rate"], _FLOOR) for p in single],
            marker=marker,
            linestyle=line,
            color=colour,
            label=points[0]["label"],
        )
        several = [p for p in points if p["processes"] > 1]
        if several:
            # Hollow: the same writers spread over processes, each with its own GIL.
            ax.scatter(
                [p["writers"] * _NUDGE for p in several],
                [max(p["rate"], _FLOOR) for p in several],
                marker=marker,
                s=140,
                facecolors="none",
                edgecolors=colour,
                linewidths=1.5,
            )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted(threads)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("writer threads (hollow markers: the same spread over processes)")
    ax.set_title(title, fontsize="medium")
    ax.grid(True, which="both", alpha=0.3)
    for i, (key, why) in enumerate(results["not_applicable"].items()):
        ax.text(
            0.02, 0.02 + 0.04 * i, f"{key}: n/a, {why}",
            transform=ax.transAxes, fontsize="x-small", color="dimgrey",
        )  # fmt: skip
