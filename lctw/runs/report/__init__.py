"""The report of a sweep: one row per configuration, mean ± std over seeds, a paired comparison against
uniform, and plots.

    python -m lctw.runs.report outputs/multirun/<date>_<time>-<token>          # a local sweep directory
    python -m lctw.runs.report <entity>/<project>/<group>                      # a sweep's W&B group (online)
    python -m lctw.runs.report <sweep> --out docs/study --tradeoff val/ce_within_n eval/recall/beyond_n/acc

A run is a job directory of the sweep (``.hydra/config.yaml``, Hydra's ``.hydra/hydra.yaml`` for the
option names, ``status.json``, ``metrics.json``, ``token_weights.npz`` from
:class:`lctw.training.callbacks.TokenWeights`) or a W&B run of the group (its flat config, summary and
``token_weights.npz`` file); runs that did not complete are left out and listed. A **configuration** is
everything but the seed: weighting (and its λ/κ/γ), scorer, context, n → N, plus any other config key
that differs between the runs. Written to ``--out`` (default ``<sweep>/report``):

* ``report.md`` / ``report.csv``: per configuration, the number of seeds and the mean ± sample std (n−1)
  over seeds of every metric in the metric families (``--family NAME=GLOB,GLOB``; defaults
  :data:`FAMILIES`: recall, RULER per task and length with its average, CE within and beyond n, the
  weight diagnostics averaged over training steps);
* ``paired.csv`` and a section of ``report.md``: each configuration against uniform weighting with the
  same other keys, seed by seed: the difference's mean ± std, a paired t-test and a sign test;
* learning curves (metrics recorded during training as ``<metric>@<step>``, :mod:`lctw.training.curve`):
  a section of ``report.md`` per curve (``--curves``) with mean ± std per step and the paired test against
  uniform at every step, ``curves.png`` (one panel per curve, a line per configuration, seed bands) and
  ``learning_curves.png`` (the first two curves: the first as it is, the second minus uniform's, seed by seed);
* ``length_*.png`` (each metric family ``<prefix>/<length>``, one line per configuration),
  ``position_ce.png`` (CE by position bucket), ``histograms.png`` (scores and weights sampled in
  training), ``tradeoff.png`` (``--tradeoff X Y``, one point per configuration with seed error bars).

``runs.py`` collects the runs, ``tables.py`` makes the tables, ``plots.py`` the plots, ``curves.py`` the learning
curves; :func:`report` joins them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lctw.runs.report.curves import CURVE, curve_plot, curve_points, headline_plot
from lctw.runs.report.plots import LENGTH_PLOTS, histogram_plot, length_plots, position_plot, tradeoff_plot
from lctw.runs.report.runs import Run, local_runs, wandb_runs
from lctw.runs.report.tables import (
    CURVES,
    FAMILIES,
    PAIRED,
    config_columns,
    configurations,
    markdown,
    matches_any,
    metric_families,
    paired,
)

__all__ = ["FAMILIES", "Run", "configurations", "local_runs", "main", "paired", "report", "wandb_runs"]


def report(source: str, out: Path | None = None, families: dict[str, list[str]] | None = None,
           paired_metrics: list[str] | None = None, length_patterns: list[str] | None = None,
           tradeoff: tuple[str, str] = ("val/ce_within_n", "val/ce_beyond_n"), curves: list[str] | None = None,
           api=None) -> Path:
    """Collect the runs of ``source`` (a local sweep directory, else a W&B group) and write the report.
    ``curves``: the learning-curve metrics (``<metric>`` of ``<metric>@<step>``) to plot and tabulate, in
    order (default: every one the runs have)."""
    families = families or FAMILIES
    local = Path(source).expanduser().exists()
    if not local and source.startswith(("/", ".", "~")):
        raise SystemExit(f"{source}: no such sweep directory")
    runs, left_out = local_runs(Path(source).expanduser()) if local else wandb_runs(source, api)
    if not runs:
        raise SystemExit(f"{source}: no completed runs" + (f" (left out: {', '.join(left_out)})" if left_out else ""))
    out = Path(out) if out else (Path(source) / "report" if local else Path("outputs/reports") / source.split("/")[-1])
    out.mkdir(parents=True, exist_ok=True)
    per_run, table = configurations(runs, families)
    columns = config_columns(runs)
    found = metric_families(runs, families)
    metrics = [m for names in found.values() for m in names]
    points = curve_points(found.get(CURVES, []))
    shown = curves or list(points)  # a curve shown is paired at every step
    chosen = [m for m in metrics if matches_any(m, paired_metrics or PAIRED) or CURVE.match(m) and
              CURVE.match(m)["metric"] in shown]
    pairs = paired(per_run, chosen, columns)
    table.to_csv(out / "report.csv")
    per_run.to_csv(out / "runs.csv", index=False)
    pairs.to_csv(out / "paired.csv", index=False)
    plots = [*length_plots(table, metrics, length_patterns or LENGTH_PLOTS, out), position_plot(table, metrics, out),
             histogram_plot(runs, per_run, out), tradeoff_plot(table, *tradeoff, out)]
    headline = headline_plot(table, pairs, points, *shown[:2], out) if len(shown) >= 2 else None
    plots = [headline, curve_plot(table, points, shown, out), *plots]
    plots = [p for p in plots if p is not None]
    (out / "report.md").write_text(markdown(source, table, found, pairs, left_out, columns, plots, curves))
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
    parser = argparse.ArgumentParser(prog="python -m lctw.runs.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a sweep directory (outputs/multirun/...) or a W&B group [entity/]project/group")
    parser.add_argument("--out", type=Path, help="output directory (default <sweep>/report or outputs/reports/<group>)")
    parser.add_argument("--family", action="append", help="NAME=GLOB[,GLOB] metric family (repeatable)")
    parser.add_argument("--paired", nargs="+", help=f"metrics compared with uniform (globs; default {PAIRED})")
    parser.add_argument("--length", nargs="+", help=f"metrics plotted against length (globs; default {LENGTH_PLOTS})")
    parser.add_argument("--curves", nargs="+", help="learning-curve metrics to plot, in order (default: all)")
    parser.add_argument("--tradeoff", nargs=2, metavar=("X", "Y"), default=("val/ce_within_n", "val/ce_beyond_n"),
                        help="metrics of the trade-off plot (default: val/ce_within_n val/ce_beyond_n)")
    args = parser.parse_args(argv)
    out = report(args.source, args.out, _families(args.family), args.paired, args.length, tuple(args.tradeoff),
                 args.curves)
    print(f"report written to {out / 'report.md'}")
    return out

