"""The evaluations' output besides their CSV/JSON tables: a PNG plot and the run's logger.

Kept out of the evaluations so that they need neither matplotlib nor a logger's API: without matplotlib
only the plot is skipped, every Lightning logger gets the metrics, and W&B also gets the table and plot.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def log_results(logger, metrics: dict, table=None, table_key: str = "", plot: Path | list | None = None) -> None:
    """Metrics to any Lightning logger; the table and the plot(s) to W&B when it is the logger.

    The table's index becomes its first column and every column name a string: W&B writes a table
    with ``json.dump(sort_keys=True)``, which fails on names that mix ints (RULER's lengths) with strings.
    """
    if not logger:
        return
    logger.log_metrics(metrics)
    if hasattr(logger, "log_table") and table is not None:
        frame = table.reset_index()
        frame.columns = [str(c) for c in frame.columns]
        logger.log_table(key=table_key, dataframe=frame)
    plots = [p for p in (plot if isinstance(plot, list) else [plot]) if p is not None and Path(p).exists()]
    if hasattr(logger, "log_image") and plots:
        logger.log_image(key=f"{table_key}_plot", images=[str(p) for p in plots])


def _pyplot(path: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: %s not written", path.name)
        return None
    return plt


def save_figure(fig, path: Path) -> Path:
    """``fig`` laid out, written to ``path`` (PNG, 120 dpi) and closed; every plot of the project ends here."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_ruler_plots(table, out_dir: Path) -> list[Path]:
    """RULER's usual pictures: a task x length heatmap of scores on a fixed 0-100 scale (``ruler.png``)
    and the average against length on 0-100 (``ruler_average.png``). ``table``: tasks (and ``average``)
    as rows, lengths as columns. Empty without matplotlib."""
    heat, line = Path(out_dir) / "ruler.png", Path(out_dir) / "ruler_average.png"
    plt = _pyplot(heat)
    if plt is None:
        return []
    tasks = table.drop(index="average", errors="ignore")
    lengths = [str(c) for c in table.columns]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.35 * len(tasks)))
    image = ax.imshow(tasks.to_numpy(dtype=float), vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    for (i, j), value in _cells(tasks):
        ax.text(j, i, "-" if value != value else f"{value:.0f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(lengths)), lengths)
    ax.set_yticks(range(len(tasks.index)), [str(t) for t in tasks.index])
    ax.set_xlabel("length (tokens)")
    ax.set_title("RULER score (0-100)")
    fig.colorbar(image, ax=ax)
    save_figure(fig, heat)
    if "average" in table.index:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(len(lengths)), table.loc["average"].to_numpy(dtype=float), marker="o")
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_ylim(0, 100)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("average score")
        ax.set_title("RULER average")
        ax.grid(alpha=0.3)
        return [heat, save_figure(fig, line)]
    return [heat]


def _cells(frame):
    for i, row in enumerate(frame.to_numpy(dtype=float)):
        for j, value in enumerate(row):
            yield (i, j), value


def save_plot(table, path: Path, xlabel: str, ylabel: str, title: str, errors=None) -> Path | None:
    """One line per column of ``table`` over its index, saved as ``path``; None without matplotlib.
    ``errors`` (same shape) draws error bars (the sweep report's spread over seeds)."""
    plt = _pyplot(path)
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for column in table.columns:
        err = None if errors is None else errors[column]
        ax.errorbar(range(len(table.index)), table[column], yerr=err, marker="o", capsize=3, label=str(column))
    ax.set_xticks(range(len(table.index)), [str(i) for i in table.index], rotation=45, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(table.columns) > 1:
        ax.legend(fontsize=7)
    return save_figure(fig, path)
