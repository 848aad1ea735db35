"""Collecting a sweep's runs: the job directories of a local sweep, or the runs of a W&B group.

A run is its flat config (dotted keys and the names of the chosen options, as :func:`lctw.runs.loggers.flat_config`
logs it to W&B), its final metrics, and the score/weight samples :class:`lctw.training.callbacks.TokenWeights`
wrote (``token_weights.npz``). Runs that did not complete are left out and named.
"""

from __future__ import annotations

import importlib
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lctw.runs.jobs import read_metrics, read_status
from lctw.runs.loggers import flat_config
from lctw.training.callbacks import SAMPLES

log = logging.getLogger(__name__)


@dataclass
class Run:
    name: str
    config: dict  # flat: dotted keys and the option names of the config groups
    metrics: dict
    samples: dict = field(default_factory=dict)  # token_weights.npz: scores, weights, step_ess, ...


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
    names = {}
    for group in ("weighting", "scorer", "context"):
        target = config.get(f"{group}._target_")
        if not target:
            continue
        module, _, cls = str(target).rpartition(".")
        try:
            name = getattr(getattr(importlib.import_module(module), cls, None), "name", None)
        except ImportError:  # a part this installation does not have
            name = None
        names[group] = name if isinstance(name, str) else cls.lower()
    if "context.method" in config:
        names["context"] = config["context.method"]
    return names


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

        try:
            api = wandb.Api()
        except Exception as err:  # no API key, no network
            raise SystemExit(f"{path} is not a local directory, and W&B's API cannot reach it as a group "
                             f"(entity/project/group): {err}") from None
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
