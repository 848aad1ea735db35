"""The evaluations' output besides their CSV/JSON tables: a PNG plot and the run's logger.

Kept out of the evaluations so that they need neither matplotlib nor a logger's API: without matplotlib
only the plot is skipped, every Lightning logger gets the metrics, and W&B also gets the table and plot.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def log_results(logger, metrics: dict, table=None, table_key: str = "", plot: Path | None = None) -> None:
    """Metrics to any Lightning logger; the table and the plot to W&B when it is the logger.

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
    if hasattr(logger, "log_image") and plot is not None and plot.exists():
        logger.log_image(key=f"{table_key}_plot", images=[str(plot)])


def save_plot(table, path: Path, xlabel: str, ylabel: str, title: str, errors=None) -> Path | None:
    """One line per column of ``table`` over its index, saved as ``path``; None without matplotlib.
    ``errors`` (same shape) draws error bars (the sweep report's spread over seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: %s written without its plot", path.name)
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
