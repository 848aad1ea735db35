"""The report's tables: one row per configuration (mean ± std over seeds) and the paired comparison
against uniform weighting, as DataFrames and as Markdown."""

from __future__ import annotations

import fnmatch
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from lctw.runs.report.curves import CURVE, curve_points, curve_tables
from lctw.runs.report.runs import Run

# Metric families: title -> glob patterns over metric names; a metric belongs to the first family it matches.
FAMILIES = {
    "copy": ["eval/copy/*"],
    "recall": ["eval/recall/*"],
    "RULER": ["eval/ruler/*"],
    "CE": ["val/ce", "val/ce_within_n", "val/ce_beyond_n", "eval/ce/*"],
    "weights": ["train/weight_ess_mean", "train/weight_mass_beyond_n_mean"],
    "base": ["base/*"],  # θ0's own measurements (lctw.training.base.base_metrics): the same for runs on one base
}
# compared with uniform, seed by seed
PAIRED = ["eval/copy/*", "eval/recall/*", "eval/ruler/average/*", "val/ce_within_n", "val/ce_beyond_n"]
# The configuration's named columns; other keys that differ between runs are added after them.
LABELS = {"weighting": "weighting", "weighting.lam": "lam", "weighting.kappa": "kappa", "weighting.gamma": "gamma",
          "scorer": "scorer", "context": "context", "n": "n", "N": "N"}
# Keys that never make a configuration: the seed, where files go, logging, checkpoints, and W&B's own.
NOT_CONFIG = ["seed", "*.seed", "name", "paths.*", "logger*", "callbacks*", "ckpt_path", "*cache_dir", "hydra*",
              "_*", "checkpoint_every", "*._target_"]
WEIGHTING_KEYS = ["weighting", "weighting.*", "scorer", "scorer.*", "arm"]  # what differs from the uniform baseline
# (arm: a study grid's name for a weighting with its scorer, conf/arm/)


def matches_any(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def config_columns(runs: list[Run]) -> list[str]:
    """The label keys present in any run, then every other key with two or more values among the runs (a key
    that only some runs have, such as ``scorer.mode`` beside ``scorer=none``, needs two values of its own)."""
    keys = [k for k in LABELS if any(k in r.config for r in runs)]
    values = lambda k: {json.dumps(x.config[k], sort_keys=True, default=str)  # noqa: E731
                        for x in runs if x.config.get(k) is not None}
    varying = sorted({k for r in runs for k in r.config
                      if k not in LABELS and not matches_any(k, NOT_CONFIG) and len(values(k)) > 1})
    return keys + varying


CURVES = "learning curves"  # the family of every <metric>@<step> (lctw.runs.report.curves), before the others


def metric_families(runs: list[Run], families: dict[str, list[str]]) -> dict[str, list[str]]:
    """family -> the metric names of that family present in the runs, in a stable order. Points of a
    learning curve (``<metric>@<step>``) form the family :data:`CURVES`, whatever their metric."""
    names = sorted({k for r in runs for k in r.metrics}, key=_natural)
    out: dict[str, list[str]] = {CURVES: [], **{f: [] for f in families}}
    for name in names:
        family = CURVES if CURVE.match(name) else next((f for f, p in families.items() if matches_any(name, p)), None)
        if family:
            out[family].append(name)
    return {f: v for f, v in out.items() if v}


def _natural(key: str):
    """``eval/ce/256-512`` after ``eval/ce/0-256``; ``.../1024`` after ``.../512``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", key)]


def _label(row: pd.Series, columns: list[str]) -> str:
    """``dense lam=0.75 scorer=frozen``: the weighting, its parameters and the other keys that vary."""
    parts = []
    for key in columns:
        value = row[key]
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        parts.append(str(value) if key == "weighting" else f"{LABELS.get(key, key)}={value}")
    return " ".join(parts) or "all runs"


def configurations(runs: list[Run], families: dict[str, list[str]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per run: its configuration, seed and metrics; one row per configuration: seeds, mean, std)."""
    columns = config_columns(runs)
    metrics = [m for names in metric_families(runs, families).values() for m in names]
    records = [{**{k: _plain(r.config.get(k)) for k in columns}, "seed": r.config.get("seed"), "run": r.name,
                **{m: r.metrics.get(m, np.nan) for m in metrics}} for r in runs]
    per_run = pd.DataFrame(records, columns=[*columns, "seed", "run", *metrics])
    varying = [c for c in columns if c.startswith("weighting") or per_run[c].dropna().astype(str).nunique() > 1]
    per_run["configuration"] = [_label(row, varying) for _, row in per_run.iterrows()]
    grouped = per_run.groupby("configuration", sort=False, dropna=False)
    stats = {f"{m} {kind}": grouped[m].mean() if kind == "mean" else grouped[m].std(ddof=1)
             for m in metrics for kind in ("mean", "std")}  # one concat: a column at a time fragments the frame
    table = pd.concat([grouped[columns].first(), grouped["seed"].nunique().rename("seeds"), pd.DataFrame(stats)],
                      axis=1)
    order = sorted(table.index, key=lambda c: (table.loc[c].get("weighting") != "uniform", _natural(c)))
    return per_run, table.loc[order]


def _plain(value):
    """Lists and dicts as JSON text, so that they can label and group rows."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def paired(per_run: pd.DataFrame, metrics: list[str], columns: list[str]) -> pd.DataFrame:
    """Each non-uniform configuration against the uniform one with the same other keys, seed by seed."""
    from scipy import stats

    header = ["configuration", "baseline", "metric", "pairs", "diff mean", "diff std", "t", "p (t)", "higher",
              "lower", "p (sign)"]
    if "weighting" not in per_run:
        return pd.DataFrame([], columns=header)
    context = [c for c in columns if not matches_any(c, WEIGHTING_KEYS)]
    per_run = per_run.assign(_context=per_run[context].astype(str).agg("|".join, axis=1) if context else "")
    uniform = per_run["weighting"] == "uniform"
    rows = []
    for config, runs in per_run[~uniform].groupby("configuration", sort=False):
        baseline = per_run[uniform & (per_run["_context"] == runs["_context"].iloc[0])]
        if baseline.empty:
            continue
        if "scorer" in baseline and (baseline["scorer"] == runs["scorer"].iloc[0]).any():
            baseline = baseline[baseline["scorer"] == runs["scorer"].iloc[0]]  # uniform with the same scorer
        baseline = baseline[baseline["configuration"] == baseline["configuration"].iloc[0]]  # one uniform row
        joined = runs.merge(baseline, on="seed", suffixes=("", " (uniform)"))
        for m in metrics:
            pairs = joined[[m, f"{m} (uniform)"]].dropna()
            d = (pairs[m] - pairs[f"{m} (uniform)"]).to_numpy(dtype=float)
            if not len(d):
                continue
            sd = float(np.std(d, ddof=1)) if len(d) > 1 else math.nan
            t = float(np.mean(d) / (sd / math.sqrt(len(d)))) if len(d) > 1 and sd > 0 else math.nan
            p_t = float(2 * stats.t.sf(abs(t), len(d) - 1)) if math.isfinite(t) else math.nan
            up, down = int((d > 0).sum()), int((d < 0).sum())
            p_sign = float(stats.binomtest(up, up + down).pvalue) if up + down else math.nan
            rows.append({"configuration": config, "baseline": baseline["configuration"].iloc[0], "metric": m,
                         "pairs": len(d), "diff mean": float(np.mean(d)), "diff std": sd, "t": t, "p (t)": p_t,
                         "higher": up, "lower": down, "p (sign)": p_sign})
    return pd.DataFrame(rows, columns=header)


def _pm(mean: float, std: float) -> str:
    if mean is None or not math.isfinite(mean):
        return ""
    return f"{mean:.4f}" if not math.isfinite(std) else f"{mean:.4f} ± {std:.4f}"


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else str(x)  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]]


def markdown(source: str, table: pd.DataFrame, families: dict[str, list[str]], pairs: pd.DataFrame,
             left_out: list[str], columns: list[str], plots: list[Path], curves: list[str] | None = None) -> str:
    runs = int(table["seeds"].sum()) if len(table) else 0
    lines = [f"# Sweep report: {source}", "",
             f"{len(table)} configurations, {runs} completed runs; mean ± std (n−1) over seeds."]
    if left_out:
        lines.append(f"Left out (not completed): {', '.join(left_out)}.")
    label = [LABELS.get(c, c) for c in columns]
    if families.get(CURVES):
        points = curve_points(families[CURVES])
        lines += ["", "## Learning curves", "", "Measured during training at the listed steps (`<metric>@<step>` in "
                  "runs.csv and paired.csv, which hold every metric at every step)."]
        for title, caption, header, rows in curve_tables(table, pairs, points, curves or list(points)):
            lines += ["", *([f"### {title}", ""] if title else []), caption, "", *_md_table(header, rows)]
    pairs = pairs[~pairs["metric"].str.match(CURVE.pattern)] if len(pairs) else pairs  # the curves show theirs
    for family, names in families.items():
        if family == CURVES:
            continue
        lines += ["", f"## {family}", ""]
        rows = [[*(row[c] for c in columns), int(row["seeds"]),
                 *(_pm(row[f"{m} mean"], row[f"{m} std"]) for m in names)] for _, row in table.iterrows()]
        lines += _md_table([*label, "seeds", *names], rows)
    if len(pairs):
        lines += ["", "## Paired against uniform (same seeds)", "",
                  "diff = configuration − uniform, seed by seed; t: paired t-test; sign: exact binomial test of "
                  "higher vs lower.", ""]
        rows = [[r["configuration"], r["metric"], r["pairs"], _pm(r["diff mean"], r["diff std"]),
                 f"{r['t']:.2f}" if math.isfinite(r["t"]) else "", f"{r['p (t)']:.3g}" if math.isfinite(r["p (t)"])
                 else "", f"{r['higher']}/{r['lower']}", f"{r['p (sign)']:.3g}" if math.isfinite(r["p (sign)"])
                 else ""] for _, r in pairs.iterrows()]
        lines += _md_table(["configuration", "metric", "pairs", "diff", "t", "p (t)", "higher/lower", "p (sign)"],
                           rows)
    if plots:
        lines += ["", "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots]]
    return "\n".join(lines) + "\n"

