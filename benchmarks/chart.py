"""The contended scenario's latency percentiles as an SVG: ``python benchmarks/run.py --chart FILE.svg``.

One panel per number of greenlets, one line per row, p50 to p99.9 on a
logarithmic scale: a fair hand-off is a flat line, a pool that lets some
callers wait much longer than others rises to the right.  It needs
matplotlib, which ``run.py`` installs into the benchmark's own venv.
"""

from __future__ import annotations

from typing import Any, Dict, List

PERCENTILES = [("p50", "p50"), ("p90", "p90"), ("p99", "p99"), ("p999", "p99.9")]


def draw(table: Any, path: str) -> None:
    """Write ``table`` (the contended scenario's) as an SVG chart of latency percentiles to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Text stays text (a smaller file, and searchable); a fixed salt makes two runs' ids alike.
    plt.rcParams.update(
        {
            "svg.fonttype": "none",
            "svg.hashsalt": "geventconnpool",
            "font.size": 9,
            "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],
        }
    )
    levels: Dict[int, List[str]] = {}
    for row in table.rows:
        levels.setdefault(int(row[0]), []).append(row[1])
    fig, axes = plt.subplots(1, len(levels), figsize=(9.5, 4.6), sharey=True, squeeze=False)
    xs = range(len(PERCENTILES))
    markers = "osD^v<>ph*"
    for ax, (level, names) in zip(axes[0], sorted(levels.items())):
        for i, name in enumerate(names):
            figures = table.data[f"{level} {name}"]
            ys = [figures[key] for key, _ in PERCENTILES]
            kind = table.kinds.get(name)
            if kind == "lib":
                style: Dict[str, Any] = {"color": "black", "linewidth": 2.4, "zorder": 3}
            else:
                style = {"linewidth": 1.2, "linestyle": "--" if kind == "ref" else "-"}
            ax.plot(xs, ys, marker=markers[i % len(markers)], markersize=4, label=name, **style)
        ax.set_yscale("log")
        ax.set_title(f"{level:,} greenlets")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([label for _, label in PERCENTILES])
        ax.set_xlabel("percentile of the request latency")
        ax.grid(True, which="major", axis="y", alpha=0.4)
    axes[0][0].set_ylabel("ms, waiting included (log scale)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False)
    fig.suptitle(table.title)
    fig.tight_layout(rect=(0, 0.15, 1, 1))
    # No date in an SVG, so that a new run changes the file only where the figures changed.
    fig.savefig(path, metadata={"Date": None} if path.endswith(".svg") else None)
    plt.close(fig)
