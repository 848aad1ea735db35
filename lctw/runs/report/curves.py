"""Learning curves in the report: metrics recorded during training as ``<metric>@<step>``
(:class:`lctw.training.curve.LearningCurve`), per configuration over steps, and paired against uniform at
each step.

Why: the study compares how fast the weightings teach the extended model to copy beyond n, at equal
compute, so the report shows the whole curve, with the spread over seeds, and a paired test at every
point (the same seed's uniform run is the baseline: same θ0, same data order, same probes).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

CURVE = re.compile(r"^(?P<metric>.+)@(?P<step>\d+)$")


def curve_points(metrics: list[str]) -> dict[str, list[tuple[int, str]]]:
    """metric -> [(step, its name at that step)], steps ascending, for every ``<metric>@<step>`` in ``metrics``."""
    points: dict[str, list[tuple[int, str]]] = {}
    for name in metrics:
        match = CURVE.match(name)
        if match:
            points.setdefault(match["metric"], []).append((int(match["step"]), name))
    return {m: sorted(p) for m, p in points.items()}


def _style(config: str) -> dict:
    """Uniform black; dense blue, sparse red, the further from uniform (small λ or κ) the darker; self dashed."""
    import matplotlib

    numbers = [float(v) for v in re.findall(r"(?:lam|kappa)=([0-9.]+)", config) if float(v) > 0]
    strength = min(1.0, -math.log10(numbers[-1])) if numbers else 0.5  # λ 0.75: 0.12, λ 0.25: 0.6, κ 0.1: 1
    if config.startswith("uniform"):
        return {"color": "black", "linewidth": 2.5, "linestyle": "-"}
    cmap = matplotlib.colormaps["Blues" if config.startswith("dense") else "Reds"]
    return {"color": cmap(0.3 + 0.65 * strength), "linewidth": 1.5,
            "linestyle": "--" if "self" in config else "-"}


def _legend(config: str) -> str:
    """The configuration without what the legend does not need (a study arm's name repeats its parts)."""
    return re.sub(r" arm=\S+| lam=0\.0(?= kappa)| scorer=none", "", config)


def curve_plot(table: pd.DataFrame, points: dict[str, list[tuple[int, str]]], metrics: list[str], out: Path,
               name: str = "curves.png") -> Path | None:
    """One panel per metric of ``metrics``: its mean over seeds against the training step, a line per
    configuration, a band of ± one std over seeds."""
    shown = [m for m in metrics if m in points]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lctw.eval.report import save_figure

    cols = min(2, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 4.2 * rows), squeeze=False)
    for ax, metric in zip(axes.flat, shown, strict=False):
        steps = [s for s, _ in points[metric]]
        for config, row in table.iterrows():
            mean = [row.get(f"{p} mean", math.nan) for _, p in points[metric]]
            std = [row.get(f"{p} std", math.nan) for _, p in points[metric]]
            _band(ax, steps, mean, std, str(config), alpha=0.12, label=_legend(str(config)))
        ax.set_xlabel("training step (2 × 512 tokens each)" if "beyond" in metric or "N" in metric else "training step")
        ax.set_ylabel(metric.removeprefix("eval/"))
        ax.set_title(_title(metric), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("learning curves: mean ± std over seeds", fontsize=11)
    return save_figure(fig, out / name)


def _band(ax, steps, mean, std, config: str, alpha: float, label: str | None = None) -> None:
    """One configuration's line with a band of ± std around it (no band where the std is not finite)."""
    std = [x if math.isfinite(x) else 0.0 for x in std]
    style = _style(config)
    ax.plot(steps, mean, marker="o", markersize=3, label=label, **style)
    ax.fill_between(steps, [m - x for m, x in zip(mean, std, strict=True)],
                    [m + x for m, x in zip(mean, std, strict=True)], color=style["color"], alpha=alpha)


def headline_plot(table: pd.DataFrame, pairs: pd.DataFrame, points: dict[str, list[tuple[int, str]]], gain: str,
                  cost: str, out: Path, name: str = "learning_curves.png") -> Path | None:
    """The study at a glance: ``gain`` against the training step (mean, band ± std over seeds) beside
    ``cost`` as configuration − uniform with the same seed (mean, band ± std of the paired differences; the
    seeds differ in their training order and planting, so the paired difference is the cost, not the spread of
    the levels)."""
    if gain not in points or cost not in points or not len(pairs):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lctw.eval.report import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    steps = [s for s, _ in points[gain]]
    for config, row in table.iterrows():
        mean = [row.get(f"{p} mean", math.nan) for _, p in points[gain]]
        std = [row.get(f"{p} std", math.nan) for _, p in points[gain]]
        _band(left, steps, mean, std, str(config), alpha=0.1, label=_legend(str(config)))
    right.axhline(0, color="black", linewidth=2.5, label="uniform")
    cost_steps = [s for s, _ in points[cost]]
    for config in dict.fromkeys(pairs["configuration"]):
        rows = [pairs[(pairs["configuration"] == config) & (pairs["metric"] == p)] for _, p in points[cost]]
        if any(r.empty for r in rows):
            continue
        mean = [float(r["diff mean"].iloc[0]) for r in rows]
        std = [float(r["diff std"].iloc[0]) for r in rows]
        _band(right, cost_steps, mean, std, str(config), alpha=0.1)
    left.set_title(_title(gain), fontsize=10)
    left.set_ylabel(gain.removeprefix("eval/"))
    right.set_title(_title(cost) + ", minus uniform's (same seed)", fontsize=10)
    right.set_ylabel(f"Δ {cost.removeprefix('eval/')} vs uniform")
    for ax in (left, right):
        ax.set_xlabel("training step after extension to N (2 × 512 tokens each)")
        ax.grid(alpha=0.3)
    left.legend(fontsize=7, loc="lower right")
    fig.suptitle("learning to copy beyond n, and what it costs within n (mean, band ± std over seeds)", fontsize=11)
    return save_figure(fig, out / name)


def _title(metric: str) -> str:
    parts = metric.split("/")
    if "gain" in parts[-1]:
        where = parts[-1].replace("gain_", "").replace("_", " ")
        unit = "nats per value" if "facts" in parts else "nats per copied token"
        return f"copy gain of held-out {parts[-2]} {where} ({unit})"
    if parts[-1].startswith("acc_"):
        where = parts[-1].replace("acc_", "").replace("_", " ")
        return f"exact match of held-out {parts[-2]} {where} (share of probes)"
    if "prose_ce" in parts[-1]:
        return f"CE of plain held-out prose {parts[-1].replace('prose_ce_', '').replace('_', ' ')} (the cost)"
    return metric


def curve_tables(table: pd.DataFrame, pairs: pd.DataFrame, points: dict[str, list[tuple[int, str]]],
                 metrics: list[str]) -> list[tuple[str, str, list[str], list[list]]]:
    """Per metric of ``metrics``, two tables as ``(title, caption, header, rows)``: mean ± std per configuration
    and step, then configuration − uniform (same seed) per step with the paired t-test's p."""
    blocks = []
    for metric in (m for m in metrics if m in points):
        steps = points[metric]
        header = [f"step {s}" for s, _ in steps]
        rows = [[config, int(row["seeds"]), *(_pm(row[f"{p} mean"], row[f"{p} std"]) for _, p in steps)]
                for config, row in table.iterrows()]
        blocks.append((metric, _title(metric) + "; mean ± std over seeds at each training step.",
                       ["configuration", "seeds", *header], rows))
        if not len(pairs):
            continue
        diff = []
        for config in dict.fromkeys(pairs["configuration"]):
            cells = []
            for _, p in steps:
                hit = pairs[(pairs["configuration"] == config) & (pairs["metric"] == p)]
                if hit.empty:
                    cells.append("")
                    continue
                r = hit.iloc[0]
                p_t = f"p {r['p (t)']:.2g}" if math.isfinite(r["p (t)"]) else "p –"
                cells.append(f"{r['diff mean']:+.3f} ± {r['diff std']:.3f} ({p_t}, {r['higher']}/{r['lower']})"
                             if math.isfinite(r["diff std"]) else f"{r['diff mean']:+.3f}")
            diff.append([config, *cells])
        blocks.append(("", "Paired against uniform (configuration − uniform, same seed): mean ± std of the "
                       "differences (paired t-test p, seeds higher/lower).", ["configuration", *header], diff))
    return blocks


def _pm(mean: float, std: float) -> str:
    if not math.isfinite(mean):
        return ""
    return f"{mean:.3f}" if not math.isfinite(std) else f"{mean:.3f} ± {std:.3f}"
