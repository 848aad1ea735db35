"""The base stage: θ0 pretrained from scratch at the short context n, as an ordinary training run.

    python train.py experiment=base                                # one base run; θ0 in <run dir>/hf
    python train.py -m experiment=base optimizer.lr=1e-3,3e-3      # sweep its recipe

The recipe is ``conf/experiment/base.yaml`` (or the one ``model.base.experiment`` names: ``base_copy``,
the copying base in phases, :mod:`lctw.training.phases`) (``scorer=none``, ``weighting=uniform``, ``context=none``,
N = n, its own optimizer, schedule and steps), run by the same :func:`lctw.training.experiment.run` as every
other stage. ``model=tiny`` needs a genuine θ0: the entry points run :func:`prepare` (through
:mod:`lctw.training.stages`) before any model is built; it runs this stage under a file lock (parallel
jobs and ranks on a fresh cache build once) into ``<paths.cache>/tiny/<key>/``: ``hf/`` is θ0, ``metrics.json`` and
``config.yaml`` record how it was made. The key hashes the composed base config (recipe and
architecture), so a change to either builds a new base; ``model.base`` holds deltas to the recipe
(``+model.base.optimizer.lr=1e-3``), merged into the composed config.

What θ0 can do is part of every result built on it: :func:`base_metrics` hands θ0's own measurements
(``val/ce`` at n and, when the recipe has an ``eval`` such as ``experiment=mini_repro``'s ``eval=recall``,
its within-n recall of planted facts, or with ``eval=copy`` its copying by distance) to each run as
``base/<key>``, and says when θ0 cannot copy within n, the case in which no weighting can show recall
beyond n; with ``model.base.min_copy_gain`` (``experiment=mini_repro``) such a θ0 is refused before the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lctw.errors import ConfigError
from lctw.models.specs import build_lock
from lctw.runs.checkpoints import theta_config
from lctw.runs.jobs import read_metrics

log = logging.getLogger(__name__)

CONF = Path(__file__).resolve().parents[2] / "conf"


@contextmanager
def _project_hydra():
    """Compose from the project's ``conf/`` whether or not a Hydra app (train.py) is running. The app's
    job name is restored too: Hydra keeps it in a singleton that a submitit job pickles when it is
    requeued, and the requeued job would otherwise log to app.log instead of train.log."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import JobRuntime
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    backup, job_name = get_gh_backup(), JobRuntime.instance().get("name")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            yield
    finally:
        restore_gh_from_backup(backup)
        JobRuntime.instance().set("name", job_name)


def compose(overrides: list[str], config_name: str = "config") -> DictConfig:
    from hydra import compose as hydra_compose

    with _project_hydra():
        return hydra_compose(config_name=config_name, overrides=overrides)


# Keys of model.base that are not deltas to the recipe: which recipe, what θ0 is measured by, what it must reach.
_CHOICES = ("experiment", "eval", "min_copy_gain")


def base_config(spec) -> DictConfig:
    """The composed config of the base stage for a tiny model spec (its architecture, n and seed).

    ``model.base.experiment`` names the recipe (default ``base``; ``base_copy``: the copying base in phases);
    ``model.base.eval`` names an option of the ``eval`` group (``recall``, ``copy``): the evaluation run on θ0
    when it is built (names, not nodes: the model spec is instantiated, and an eval node in it would be too).
    ``model.base.min_copy_gain`` is what θ0 must reach (:func:`base_metrics`), not part of the recipe."""
    arch = [f"model.{k}={v}" for k, v in spec.arch.items()]
    deltas = {k: v for k, v in spec.base.items() if k not in _CHOICES}
    evaluation = [f"eval={spec.base['eval']}"] if spec.base.get("eval") else []
    recipe = spec.base.get("experiment") or "base"
    cfg = compose([f"experiment={recipe}", f"n={spec.n}", f"seed={spec.seed}", f"paths.cache={spec.cache_dir}", *arch,
                   *evaluation])
    return OmegaConf.merge(cfg, deltas) if deltas else cfg


def config_key(cfg: DictConfig) -> str:
    """A hash of everything in ``cfg`` that changes the trained numbers."""
    numbers = theta_config(OmegaConf.to_container(cfg, resolve=True))
    return hashlib.sha256(json.dumps(numbers, sort_keys=True).encode()).hexdigest()[:12]


def prepare(spec) -> dict[str, float]:
    """θ0 for a tiny spec: find it in the cache or build it by this stage, bind it to the spec, and return
    θ0's own measurements (:func:`base_metrics`). Nothing to do for a spec that is not built here."""
    if not getattr(spec, "built_locally", False) or not spec.pretrained:
        return {}
    spec.bind(config_key(base_config(spec)))
    run_dir = spec.path.parent
    with build_lock(run_dir):  # DDP ranks / parallel sweep jobs on a fresh cache
        if not (spec.path / "config.json").exists():
            build_base(spec, run_dir)
    return base_metrics(spec)


def build_base(spec, path: Path) -> None:
    """Run the base stage for ``spec`` and move its run directory to ``path`` (``path/hf`` is θ0).

    The caller holds the lock. The run happens in ``<path>.tmp`` and is renamed when complete, so a
    crashed build leaves no half-written base behind.
    """
    from lctw.training.experiment import run

    cfg = base_config(spec)
    steps = sum(p.trainer.max_steps for p in cfg.phases) if cfg.get("phases") else cfg.trainer.max_steps
    log.info("building the tiny base model at n=%d (%d steps; cached in %s)", spec.n, steps, path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    OmegaConf.save(cfg, tmp / "config.yaml", resolve=True)
    metrics = run(cfg, run_dir=tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    log.info("tiny base ready: %s (val/ce at n: %.3f)", path, metrics.get("val/ce", float("nan")))


# A model that copies the four-digit value gains up to 4 ln 10 = 9.2 nats over the control; below this
# gain per value θ0 is not counted as recalling within n.
COPIES = 1.0
# θ0's within-n copying as eval=copy measures it: gain per copied token on held-out random spans.
COPY_GAIN = "eval/copy/random/gain_within_n"


def check_copying(measured: dict[str, float], minimum: float, where: Path) -> None:
    """Refuse a θ0 that does not copy within n: a run on it could not show copying beyond n."""
    gain = measured.get(COPY_GAIN)
    if gain is None:
        raise ConfigError(f"model.base.min_copy_gain={minimum}: θ0 in {where} has no {COPY_GAIN} (it was built "
                          "without model.base.eval=copy); delete it to rebuild it with that evaluation")
    figure = (f"gain {gain:.3f} ± {measured.get(COPY_GAIN + '_sem', float('nan')):.3f} nats per copied token, exact "
              f"match {measured.get('eval/copy/random/acc_within_n', float('nan')):.2f}")
    if gain < minimum:
        raise ConfigError(f"model.base.min_copy_gain={minimum}: θ0 does not copy within n ({figure} on held-out "
                          f"random spans; {where}), so no run on it can show copying beyond n. Train the base "
                          "longer or change its recipe (model.base.experiment, model.base.*)")
    log.info("θ0 copies within n: %s", figure)


def base_metrics(spec) -> dict[str, float]:
    """θ0's measurements from its base run (``<cache>/tiny/<key>/metrics.json``) as ``base/<key>``:
    ``val/ce`` and every ``eval/*`` metric; empty for a model that was not built by the base stage.
    Logs θ0's within-n recall when it was measured, with a warning when it is below :data:`COPIES`.
    With ``model.base.min_copy_gain``, a θ0 whose within-n copy gain (:data:`COPY_GAIN`) is below it, or was
    not measured, is refused (a :class:`ConfigError` with the figure), before any run on it starts."""
    if not getattr(spec, "built_locally", False) or not getattr(spec, "pretrained", False):
        return {}
    path = spec.path.parent / "metrics.json"
    measured = read_metrics(path)
    out = {f"base/{k}": v for k, v in measured.items() if k == "val/ce" or k.startswith("eval/")}
    if spec.base.get("min_copy_gain") is not None:
        check_copying(measured, float(spec.base["min_copy_gain"]), path.parent)
    gain = measured.get("eval/recall/gain_within_n")
    if gain is None:
        evaluation = spec.base.get("eval")
        if evaluation and not any(k.startswith(f"eval/{evaluation}/") for k in measured):
            log.warning("θ0's model.base.eval=%s was not measured when %s was built; delete it to rebuild it",
                        evaluation, path.parent)
        return out
    sem, acc = measured.get("eval/recall/gain_within_n_sem", float("nan")), measured["eval/recall/acc_within_n"]
    figure = (f"θ0's within-n recall of planted facts: gain {gain:.3f} ± {sem:.3f} nats per value over the "
              f"control, exact match {acc:.2f}, CE {measured['eval/recall/ce_within_n']:.3f} per value token")
    if gain < COPIES:
        log.warning("%s. θ0 does not copy within n (a model that copies gains up to 4 ln 10 = 9.2 nats): a run on "
                    "it cannot show recall beyond n; see docs/results.md", figure)
    else:
        log.info(figure)
    return out
