"""The report's plots (PNG): metrics against length, CE by position, training score/weight histograms,
and the long- against short-context trade-off; each with the spread over seeds."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from lctw.runs.report.runs import Run
from lctw.runs.report.tables import matches_any

log = logging.getLogger(__name__)
LENGTH_PLOTS = ["eval/recall/*", "eval/ruler/average/*"]  # metrics <prefix>/<length> plotted against length


def _mean_std(table: pd.DataFrame, names: list[str], index: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(means, stds) with one column per configuration and ``index`` as rows."""
    means = pd.DataFrame({c: [table.loc[c, f"{m} mean"] for m in names] for c in table.index}, index=index)
    stds = pd.DataFrame({c: [table.loc[c, f"{m} std"] for m in names] for c in table.index}, index=index)
    return means, stds.fillna(0.0)


def length_plots(table: pd.DataFrame, metrics: list[str], patterns: list[str], out: Path) -> list[Path]:
    """One PNG per metric family ``<prefix>/<length>``: the metric against length, a line per configuration."""
    from lctw.eval.report import save_plot

    prefixes: dict[str, list[tuple[int, str]]] = {}
    for m in metrics:
        prefix, _, last = m.rpartition("/")
        if last.isdigit() and matches_any(m, patterns):
            prefixes.setdefault(prefix, []).append((int(last), m))
    plots = []
    for prefix, items in prefixes.items():
        items.sort()
        means, stds = _mean_std(table, [m for _, m in items], [str(length) for length, _ in items])
        path = out / f"length_{re.sub(r'[^A-Za-z0-9]+', '_', prefix).strip('_')}.png"
        if save_plot(means, path, "length (tokens)", prefix, f"{prefix} against length", errors=stds):
            plots.append(path)
    return plots


def position_plot(table: pd.DataFrame, metrics: list[str], out: Path) -> Path | None:
    """CE by position bucket (``eval/ce/<lo>-<hi>``, from eval=ppl), else CE within and beyond n."""
    from lctw.eval.report import save_plot

    buckets = [m for m in metrics if re.fullmatch(r"eval/ce/\d+-\d+", m)]
    names = buckets or [m for m in ("val/ce_within_n", "val/ce_beyond_n") if m in metrics]
    if not names:
        return None
    index = [m.rsplit("/", 1)[-1] if buckets else ("within n" if "within" in m else "beyond n") for m in names]
    means, stds = _mean_std(table, names, index)
    return save_plot(means, out / "position_ce.png", "target position (tokens before it)", "cross-entropy (nats)",
                     "CE by position", errors=stds)


def histogram_plot(runs: list[Run], per_run: pd.DataFrame, out: Path) -> Path | None:
    """Scores and weights sampled during training, pooled over seeds, a step histogram per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lctw.eval.report import save_figure

    config_of = dict(zip(per_run["run"], per_run["configuration"], strict=True))
    pooled: dict[str, dict[str, list]] = {}
    for r in runs:
        for key in ("scores", "weights"):
            values = r.samples.get(key)
            if values is not None and len(values) and np.isfinite(values).all():
                pooled.setdefault(config_of[r.name], {"scores": [], "weights": []})[key].append(values)
    if not pooled:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, xlabel in ((axes[0], "scores", "score s_i (nats)"), (axes[1], "weights", "weight w_i")):
        for config, values in pooled.items():
            if values[key]:
                ax.hist(np.concatenate(values[key]), bins=60, histtype="step", density=True, label=config)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("density")
    axes[1].legend(fontsize=7)
    fig.suptitle("scores and weights of targets sampled during training")
    return save_figure(fig, out / "histograms.png")


def tradeoff_plot(table: pd.DataFrame, x: str, y: str, out: Path) -> Path | None:
    """Short-context cost against long-context benefit: a point per configuration, seed std as error bars."""
    if f"{x} mean" not in table or f"{y} mean" not in table:
        log.warning("no trade-off plot: %s or %s is not a metric of these runs", x, y)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lctw.eval.report import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for config, row in table.iterrows():
        ax.errorbar(row[f"{x} mean"], row[f"{y} mean"], xerr=_zero(row[f"{x} std"]), yerr=_zero(row[f"{y} std"]),
                    marker="o", capsize=3, label=config)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title("long-context against short-context (mean ± std over seeds)")
    ax.legend(fontsize=7)
    return save_figure(fig, out / "tradeoff.png")


def _zero(std: float) -> float:
    return 0.0 if not math.isfinite(std) else std

