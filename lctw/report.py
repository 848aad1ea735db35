"""The report of a sweep: one row per configuration, mean ± std over seeds, a paired comparison against
uniform, and plots.

    python -m lctw.report outputs/multirun/<date>_<time>-<token>          # a local sweep directory
    python -m lctw.report <entity>/<project>/<group>                      # a sweep's W&B group (online)
    python -m lctw.report <sweep> --out docs/study --tradeoff val/ce_within_n eval/recall/beyond_n/acc

A run is a job directory of the sweep (``.hydra/config.yaml``, Hydra's ``.hydra/hydra.yaml`` for the
option names, ``status.json``, ``metrics.json``, ``token_weights.npz`` from
:class:`lctw.callbacks.TokenWeights`) or a W&B run of the group (its flat config, summary and
``token_weights.npz`` file); runs that did not complete are left out and listed. A **configuration** is
everything but the seed: weighting (and its λ/κ/γ), scorer, context, n → N, plus any other config key
that differs between the runs. Written to ``--out`` (default ``<sweep>/report``):

* ``report.md`` / ``report.csv``: per configuration, the number of seeds and the mean ± sample std (n−1)
  over seeds of every metric in the metric families (``--family NAME=GLOB,GLOB``; defaults
  :data:`FAMILIES`: recall, RULER per task and length with its average, CE within and beyond n, the
  weight diagnostics averaged over training steps);
* ``paired.csv`` and a section of ``report.md``: each configuration against uniform weighting with the
  same other keys, seed by seed: the difference's mean ± std, a paired t-test and a sign test;
* ``length_*.png`` (each metric family ``<prefix>/<length>``, one line per configuration),
  ``position_ce.png`` (CE by position bucket), ``histograms.png`` (scores and weights sampled in
  training), ``tradeoff.png`` (``--tradeoff X Y``, one point per configuration with seed error bars).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lctw.callbacks import SAMPLES
from lctw.jobs import read_metrics, read_status
from lctw.loggers import flat_config

log = logging.getLogger(__name__)

# Metric families: title -> glob patterns over metric names; a metric belongs to the first family it matches.
FAMILIES = {
    "recall": ["eval/recall/*"],
    "RULER": ["eval/ruler/*"],
    "CE": ["val/ce", "val/ce_within_n", "val/ce_beyond_n", "eval/ce/*"],
    "weights": ["train/weight_ess_mean", "train/weight_mass_beyond_n_mean"],
}
PAIRED = ["eval/recall/*", "eval/ruler/average/*", "val/ce_within_n", "val/ce_beyond_n"]
LENGTH_PLOTS = ["eval/recall/*", "eval/ruler/average/*"]
# The configuration's named columns; other keys that differ between runs are added after them.
LABELS = {"weighting": "weighting", "weighting.lam": "lam", "weighting.kappa": "kappa", "weighting.gamma": "gamma",
          "scorer": "scorer", "context": "context", "n": "n", "N": "N"}
# Keys that never make a configuration: the seed, where files go, logging, checkpoints, and W&B's own.
NOT_CONFIG = ["seed", "*.seed", "name", "paths.*", "logger*", "callbacks*", "ckpt_path", "*cache_dir", "hydra*",
              "_*", "checkpoint_every", "*._target_"]
WEIGHTING_KEYS = ["weighting", "weighting.*", "scorer", "scorer.*"]  # what differs from the uniform baseline


@dataclass
class Run:
    name: str
    config: dict  # flat: dotted keys and the option names of the config groups
    metrics: dict
    samples: dict = field(default_factory=dict)  # token_weights.npz: scores, weights, step_ess, ...


def _matches(key: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def _with_training_means(metrics: dict, samples: dict) -> dict:
    """The weight diagnostics averaged over all training steps (the logged ``train/*`` are the last step's)."""
    out = dict(metrics)
    for key in ("ess", "mass_beyond_n"):
        steps = samples.get(f"step_{key}")
        if steps is not None and len(steps):
            out[f"train/weight_{key}_mean"] = float(np.mean(steps))
    return out


def _option_names(config: dict) -> dict:
    """Without Hydra's record of the chosen options (a run composed in Python): each part's own name (a
    scorer's ``name``, a context's ``method``), else its class name in lower case (``Dense`` -> ``dense``)."""
    from hydra.utils import get_object

    names = {}
    for group in ("weighting", "scorer", "context"):
        target = config.get(f"{group}._target_")
        if not target:
            continue
        try:
            name = getattr(get_object(str(target)), "name", None)
        except Exception:  # a part this installation cannot import
            name = None
        names[group] = name if isinstance(name, str) else str(target).rsplit(".", 1)[-1].lower()
    if "context.method" in config:
        names["context"] = config["context.method"]
    return names


# -- collecting the runs ----------------------------------------------------------------------------

def local_runs(sweep: Path) -> tuple[list[Run], list[str]]:
    """The completed runs of a sweep directory (or a single run directory), and the others' names."""
    from omegaconf import OmegaConf

    import lctw.config  # noqa: F401  (registers the resolvers the saved configs use)

    sweep = Path(sweep)
    jobs = [sweep] if (sweep / ".hydra").is_dir() else sorted(p for p in sweep.iterdir() if (p / ".hydra").is_dir())
    runs, left_out = [], []
    for job in jobs:
        status = (read_status(job) or {}).get("status")
        if status != "completed":
            left_out.append(f"{job.name} ({status or 'no status.json'})")
            continue
        cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
        try:
            config = OmegaConf.to_container(cfg, resolve=True)
        except Exception:  # an interpolation this process cannot resolve (e.g. ${hydra:...}): keep it as written
            config = OmegaConf.to_container(cfg, resolve=False)
        hydra_file = job / ".hydra" / "hydra.yaml"
        choices = {}
        if hydra_file.exists():
            chosen = OmegaConf.load(hydra_file).hydra.runtime.choices
            choices = {k.replace("/", "."): str(v) for k, v in chosen.items() if v is not None and
                       not k.startswith("hydra")}
        flat = flat_config(config, choices)
        flat = {**_option_names(flat), **flat}
        samples = dict(np.load(job / SAMPLES)) if (job / SAMPLES).exists() else {}
        runs.append(Run(job.name, flat, _with_training_means(read_metrics(job / "metrics.json"), samples), samples))
    return runs, left_out


def wandb_runs(path: str, api=None) -> tuple[list[Run], list[str]]:
    """The finished runs of a W&B group ``[entity/]project/group`` (``group`` alone: project ``lctw``)."""
    if api is None:
        import wandb

        api = wandb.Api()
    *project, group = path.split("/")
    runs, left_out = [], []
    for r in api.runs("/".join(project) or "lctw", filters={"group": group}):
        if r.state != "finished":
            left_out.append(f"{r.name} ({r.state})")
            continue
        flat = flat_config(dict(r.config))
        flat = {**_option_names(flat), **flat}
        metrics = {k: float(v) for k, v in r.summary_metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        samples = {}
        try:
            with tempfile.TemporaryDirectory() as tmp:
                r.file(SAMPLES).download(root=tmp, replace=True)
                samples = dict(np.load(Path(tmp) / SAMPLES))
        except Exception as err:  # a run without the file (older runs, or logging switched off)
            log.info("run %s: no %s (%s)", r.name, SAMPLES, err)
        runs.append(Run(r.name, flat, _with_training_means(metrics, samples), samples))
    return runs, left_out


# -- the tables ---------------------------------------------------------------------------------------

def config_columns(runs: list[Run]) -> list[str]:
    """The label keys present in any run, then every other key with two or more values among the runs (a key
    that only some runs have, such as ``scorer.mode`` beside ``scorer=none``, needs two values of its own)."""
    keys = [k for k in LABELS if any(k in r.config for r in runs)]
    values = lambda k: {json.dumps(x.config[k], sort_keys=True, default=str)  # noqa: E731
                        for x in runs if x.config.get(k) is not None}
    varying = sorted({k for r in runs for k in r.config
                      if k not in LABELS and not _matches(k, NOT_CONFIG) and len(values(k)) > 1})
    return keys + varying


def _metrics(runs: list[Run], families: dict[str, list[str]]) -> dict[str, list[str]]:
    """family -> the metric names of that family present in the runs, in a stable order."""
    names = sorted({k for r in runs for k in r.metrics}, key=_natural)
    out: dict[str, list[str]] = {f: [] for f in families}
    for name in names:
        family = next((f for f, patterns in families.items() if _matches(name, patterns)), None)
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
    metrics = [m for names in _metrics(runs, families).values() for m in names]
    records = [{**{k: _plain(r.config.get(k)) for k in columns}, "seed": r.config.get("seed"), "run": r.name,
                **{m: r.metrics.get(m, np.nan) for m in metrics}} for r in runs]
    per_run = pd.DataFrame(records, columns=[*columns, "seed", "run", *metrics])
    varying = [c for c in columns if c.startswith("weighting") or per_run[c].dropna().astype(str).nunique() > 1]
    per_run["configuration"] = [_label(row, varying) for _, row in per_run.iterrows()]
    grouped = per_run.groupby("configuration", sort=False, dropna=False)
    table = grouped[columns].first()
    table["seeds"] = grouped["seed"].nunique()
    for m in metrics:
        table[f"{m} mean"] = grouped[m].mean()
        table[f"{m} std"] = grouped[m].std(ddof=1)
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
    context = [c for c in columns if not _matches(c, WEIGHTING_KEYS)]
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
             left_out: list[str], columns: list[str], plots: list[Path]) -> str:
    runs = int(table["seeds"].sum()) if len(table) else 0
    lines = [f"# Sweep report: {source}", "",
             f"{len(table)} configurations, {runs} completed runs; mean ± std (n−1) over seeds."]
    if left_out:
        lines.append(f"Left out (not completed): {', '.join(left_out)}.")
    label = [LABELS.get(c, c) for c in columns]
    for family, names in families.items():
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


# -- the plots ----------------------------------------------------------------------------------------

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
        if last.isdigit() and _matches(m, patterns):
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
    fig.tight_layout()
    path = out / "histograms.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tradeoff_plot(table: pd.DataFrame, x: str, y: str, out: Path) -> Path | None:
    """Short-context cost against long-context benefit: a point per configuration, seed std as error bars."""
    if f"{x} mean" not in table or f"{y} mean" not in table:
        log.warning("no trade-off plot: %s or %s is not a metric of these runs", x, y)
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for config, row in table.iterrows():
        ax.errorbar(row[f"{x} mean"], row[f"{y} mean"], xerr=_zero(row[f"{x} std"]), yerr=_zero(row[f"{y} std"]),
                    marker="o", capsize=3, label=config)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title("long-context against short-context (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "tradeoff.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _zero(std: float) -> float:
    return 0.0 if not math.isfinite(std) else std


# -- the report ---------------------------------------------------------------------------------------

def report(source: str, out: Path | None = None, families: dict[str, list[str]] | None = None,
           paired_metrics: list[str] | None = None, length_patterns: list[str] | None = None,
           tradeoff: tuple[str, str] = ("val/ce_within_n", "val/ce_beyond_n"), api=None) -> Path:
    """Collect the runs of ``source`` (a local sweep directory, else a W&B group) and write the report."""
    families = families or FAMILIES
    local = Path(source).expanduser().exists()
    runs, left_out = local_runs(Path(source).expanduser()) if local else wandb_runs(source, api)
    if not runs:
        raise SystemExit(f"{source}: no completed runs" + (f" (left out: {', '.join(left_out)})" if left_out else ""))
    out = Path(out) if out else (Path(source) / "report" if local else Path("outputs/reports") / source.split("/")[-1])
    out.mkdir(parents=True, exist_ok=True)
    per_run, table = configurations(runs, families)
    columns = config_columns(runs)
    found = _metrics(runs, families)
    metrics = [m for names in found.values() for m in names]
    pairs = paired(per_run, [m for m in metrics if _matches(m, paired_metrics or PAIRED)], columns)
    table.to_csv(out / "report.csv")
    per_run.to_csv(out / "runs.csv", index=False)
    pairs.to_csv(out / "paired.csv", index=False)
    plots = [*length_plots(table, metrics, length_patterns or LENGTH_PLOTS, out), position_plot(table, metrics, out),
             histogram_plot(runs, per_run, out), tradeoff_plot(table, *tradeoff, out)]
    plots = [p for p in plots if p is not None]
    (out / "report.md").write_text(markdown(source, table, found, pairs, left_out, columns, plots))
    return out


def _families(specs: list[str] | None) -> dict[str, list[str]]:
    """``NAME=GLOB,GLOB`` arguments on top of the defaults (the same NAME replaces a default family)."""
    families = dict(FAMILIES)
    for spec in specs or []:
        name, sep, patterns = spec.partition("=")
        if not sep or not patterns:
            raise SystemExit(f"--family {spec!r}: expected NAME=GLOB[,GLOB...], e.g. recall='eval/recall/*'")
        families[name] = patterns.split(",")
    return families


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m lctw.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a sweep directory (outputs/multirun/...) or a W&B group [entity/]project/group")
    parser.add_argument("--out", type=Path, help="output directory (default <sweep>/report or outputs/reports/<group>)")
    parser.add_argument("--family", action="append", help="NAME=GLOB[,GLOB] metric family (repeatable)")
    parser.add_argument("--paired", nargs="+", help=f"metrics compared with uniform (globs; default {PAIRED})")
    parser.add_argument("--length", nargs="+", help=f"metrics plotted against length (globs; default {LENGTH_PLOTS})")
    parser.add_argument("--tradeoff", nargs=2, metavar=("X", "Y"), default=("val/ce_within_n", "val/ce_beyond_n"),
                        help="metrics of the trade-off plot (default: val/ce_within_n val/ce_beyond_n)")
    args = parser.parse_args(argv)
    out = report(args.source, args.out, _families(args.family), args.paired, args.length, tuple(args.tradeoff))
    print(f"report written to {out / 'report.md'}")
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
