"""Loggers (``conf/logger``): W&B, CSV or none, all called as ``f(save_dir, name, group, config, ...)``.

W&B runs online when an API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry for
api.wandb.ai) and offline otherwise, with files under the run directory, so a run never waits on the
network. The mode is passed to every ``wandb.init`` explicitly: ``WandbLogger(offline=True)`` would
switch the whole process, which leaks into the next job of a multirun.

Logging never blocks or stops training:

* **Start.** The online ``wandb.init`` gets ``logger.init_timeout`` seconds (default 5). If it fails
  (no network, a wrong key, an unreachable host, a timeout), the run logs offline into the same
  directory, with a warning that says how to upload it later (``wandb sync``). Measured with an
  unreachable host, refused or silent (``tests/test_loggers.py``, 2 busy CPU cores): logging offline
  8-9 s after the call, where it used to fail with a CommError after about 115 s. Not covered: with a
  host that accepts connections and never answers, W&B's own analytics thread (OpenTelemetry, probing
  that host with 10 s timeouts) still holds the process for about 20 s at exit, after training.
* **During the run.** Upload errors are W&B's own business: it keeps logging to disk and retries in
  the background (``stop_on_fatal_error=False``). A W&B call that raises in this process (e.g. W&B's
  service process died) is reported once as a warning and skipped; training goes on
  (:class:`WandbLogger`).
* **End.** :func:`finish` waits at most ``logger.finish_timeout`` seconds for uploads (what is left
  stays on disk for ``wandb sync``), and a failing ``wandb.finish`` is a warning, after which W&B's
  service connection is dropped so that the next job of a multirun starts a fresh one.
"""

from __future__ import annotations

import csv as _csv
import functools
import logging
import netrc
import os
import time
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter as _CSVWriter

log = logging.getLogger(__name__)

MODES = ("auto", "online", "offline", "disabled")


def wandb_mode(mode: str = "auto") -> str:
    if mode not in MODES:
        raise ValueError(f"logger.mode={mode!r} is not allowed: choose one of {list(MODES)}")
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in MODES[1:]:
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def _never_raises(method):
    """A W&B logger method whose failure is a warning (the first one per logger) instead of an exception."""

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # whatever W&B raises, training must go on
            if not self.failures:
                log.warning("W&B failed in %s (%s: %s); training goes on, W&B may miss what is logged from now on. "
                            "The run's files are in %s", method.__name__, type(err).__name__, err, self.save_dir)
            self.failures += 1
            return None

    return call


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger whose logging calls never raise: a W&B failure must not end a training run.

    ``failures`` counts the calls that failed (the first is logged as a warning).
    """

    failures = 0
    log_hyperparams = _never_raises(_LightningWandbLogger.log_hyperparams)
    log_metrics = _never_raises(_LightningWandbLogger.log_metrics)
    log_table = _never_raises(_LightningWandbLogger.log_table)
    log_text = _never_raises(_LightningWandbLogger.log_text)
    log_image = _never_raises(_LightningWandbLogger.log_image)
    finalize = _never_raises(_LightningWandbLogger.finalize)


def wandb(save_dir: str, name: str, group: str | None, hparams: dict, project: str = "lctw",
          entity: str | None = None, mode: str = "auto", tags: list[str] | None = None, init_timeout: float = 5.0,
          finish_timeout: float = 60.0):
    """A W&B logger writing under ``save_dir``; online falls back to offline when ``wandb.init`` fails.

    ``init_timeout``: seconds the online ``wandb.init`` may take. ``finish_timeout``: seconds
    ``wandb.finish`` waits for uploads at the end (0 = until done).
    """
    if isinstance(init_timeout, bool) or not isinstance(init_timeout, (int, float)) or init_timeout <= 0:
        raise ValueError(f"logger.init_timeout={init_timeout!r} is out of range: allowed seconds > 0")
    if isinstance(finish_timeout, bool) or not isinstance(finish_timeout, (int, float)) or finish_timeout < 0:
        raise ValueError(f"logger.finish_timeout={finish_timeout!r} is out of range: allowed seconds >= 0 "
                         "(0 = wait until the upload is done)")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    chosen = wandb_mode(mode)
    options = dict(project=project, entity=entity, name=name, group=group, save_dir=save_dir, tags=list(tags or []),
                   init_timeout=init_timeout, finish_timeout=finish_timeout, id=run_id(save_dir), resume="allow")
    start = time.monotonic()
    try:
        logger = _started(chosen, options)  # wandb.init now: a failure falls back here, not at the first step
    except Exception as err:  # no network, wrong key, unreachable host, timeout: W&B raises several types
        if chosen != "online":
            raise
        finish()  # a failure after wandb.init returned (define_metric) leaves a run Lightning would reuse
        # the failed online attempt keeps its id in this process's W&B service: the offline run takes a new one
        logger = _started("offline", {**options, "id": run_id(save_dir, renew=True)})
        log.warning("W&B online start failed after %.1f s (%s: %s); logging offline to %s/wandb instead. "
                    "Upload it later with: wandb sync %s/wandb/offline-run-*", time.monotonic() - start,
                    type(err).__name__, err, save_dir, save_dir)
    logger.log_hyperparams(flat_config(hparams, option_names()))
    return logger


def flat_config(config: dict, choices: dict[str, str] | None = None) -> dict:
    """The resolved config as W&B wants it for grouping, filters and parallel coordinates: flat dotted keys
    (``weighting.lam``, ``trainer.max_steps``) plus the name of each config group's chosen option under
    the group's own key (``weighting: dense``, ``scorer: frozen``, ``context: theta``)."""
    flat: dict = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict) and value:
                walk(value, f"{name}.")
            else:
                flat[name] = value

    walk(config, "")
    flat.update(choices or {})
    return flat


def option_names() -> dict[str, str]:
    """The chosen option of each config group (Hydra's ``runtime.choices``; ``model/base`` as ``model.base``),
    without Hydra's own groups; {} outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return {group.replace("/", "."): str(choice) for group, choice in HydraConfig.get().runtime.choices.items()
            if choice is not None and not group.startswith("hydra")}


def _started(mode: str, options: dict, wait: float = 15.0) -> WandbLogger:
    """A W&B logger whose run has started. A run resumed right after its process was killed finds its id
    still held by the dead process's W&B service for a second or two: it waits for the id to be free."""
    deadline = time.monotonic() + wait
    while True:
        logger = _wandb_logger(mode, **options)
        try:
            _ = logger.experiment
            return logger
        except Exception as err:
            if "is in use" not in str(err) or time.monotonic() > deadline:
                raise
            finish()
            time.sleep(1.0)


def run_id(save_dir: str, renew: bool = False) -> str:
    """The W&B run id of a run directory, kept in ``<dir>/wandb/run_id``: a run resumed in its directory
    (after a crash or a SLURM requeue) continues the same W&B run. ``renew`` draws a new one."""
    import secrets

    f = Path(save_dir) / "wandb" / "run_id"
    if renew or not f.exists():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(secrets.token_hex(4))
    return f.read_text().strip()


def _wandb_logger(mode: str, init_timeout: float, finish_timeout: float, **options) -> WandbLogger:
    import wandb as wandb_lib

    # quiet: no "logged in as" line, whose account lookup costs two 5 s timeouts without a network
    # before the online start is even tried. stop_on_fatal_error=False (W&B's default, kept on purpose):
    # an upload error stops the uploads, never the logging to disk, nor the run.
    settings = wandb_lib.Settings(init_timeout=init_timeout, finish_timeout=finish_timeout, console="off",
                                  quiet=True, stop_on_fatal_error=False)
    return WandbLogger(mode=mode, settings=settings, reinit="finish_previous", **options)


def csv(save_dir: str, name: str, group: str | None, hparams: dict):
    """``<save_dir>/csv/metrics.csv``, continued when the run resumes in its directory (:class:`CSVLogger`)."""
    logger = CSVLogger(save_dir=save_dir, name="csv", version="")
    logger.log_hyperparams(hparams)
    return logger


class _ContinuedHistory(_CSVWriter):
    """Lightning's CSV writer, which deletes an existing ``metrics.csv`` when it opens its directory, made to
    continue it: a resumed run's history must be the uninterrupted run's.

    The rows already on disk are kept up to the first step the resumed process logs; from that step on they
    are replaced by what it logs. That step is the resume point's: a run resumes at the optimizer step after
    its checkpoint and logs every step from there on again (rows logged after the checkpoint, before the
    kill, would otherwise be duplicated), while what was logged at the checkpoint's own step after it was
    written (that step's training row, a validation at that step) is not logged again (it would be lost if
    the history were cut at the checkpoint instead). Lightning writes the file at every log call, so the rows
    on disk are all that was logged before the kill."""

    def _check_log_dir_exists(self) -> None:
        self._previous: list[dict] | None = None
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self._previous = list(_csv.DictReader(file))

    def save(self) -> None:
        if self._previous is None or not self.metrics:
            return super().save()
        first = min(int(row["step"]) for row in self.metrics)
        kept = [row for row in self._previous if int(row["step"]) < first]
        self._previous = None
        self.metrics_keys = sorted(set(self.metrics_keys).union(*kept, *self.metrics))
        with self._fs.open(self.metrics_file_path, "w", newline="") as file:
            writer = _csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows([*kept, *self.metrics])
        self.metrics = []


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger whose ``metrics.csv`` survives a resume (:class:`_ContinuedHistory`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuedHistory:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedHistory(log_dir=self.log_dir)
        return self._experiment


def none(save_dir: str, name: str, group: str | None, hparams: dict):
    return False


def run_name(cfg) -> str:
    """``name`` if set, else the command-line overrides of this job (Hydra's ``override_dirname``)."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("name"):
        return str(cfg.name)
    if HydraConfig.initialized():
        return HydraConfig.get().job.override_dirname or "default"
    return "default"


def run_group(cfg) -> str | None:
    """``logger.group`` if set, else the multirun's sweep directory name: all jobs of a sweep in one group."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return None


def build(cfg, save_dir, group: bool = True):
    """The configured logger for a run (or evaluation) writing under ``save_dir``, with the resolved
    config as its hyperparameters; ``group=False`` keeps it out of a sweep's group."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    # Called, not instantiated with the config as a kwarg: Hydra would instantiate its _target_s.
    return instantiate(cfg.logger, _partial_=True)(save_dir=str(save_dir), name=run_name(cfg),
                                                   group=run_group(cfg) if group else None,
                                                   hparams=OmegaConf.to_container(cfg, resolve=True))


def finish() -> None:
    """End the W&B run of this job (also after a failure) so the next multirun job starts clean.

    Never raises: a failing ``wandb.finish`` (e.g. W&B's service process died) is a warning, after
    which this job's run and W&B's connection to its service are dropped, so that the next job starts
    a new run on a new service.
    """
    import sys

    wandb_lib = sys.modules.get("wandb")
    if wandb_lib is None or wandb_lib.run is None:
        return
    try:
        wandb_lib.finish()
    except Exception as err:  # whatever W&B raises here, the run's own results are already saved
        from wandb.sdk.lib import module as wandb_module

        log.warning("W&B finish failed (%s: %s); the run's W&B files may be incomplete", type(err).__name__, err)
        # W&B's finish fails before its own cleanup (it sends telemetry first), leaving wandb.run set:
        # Lightning's next WandbLogger would reuse that dead run. Unset it as Run.finish's `finally` does.
        wandb_module.unset_globals()
        try:
            wandb_lib.teardown()  # forgets the dead service first, then fails closing it
        except Exception as teardown_err:
            log.debug("wandb.teardown after a failed finish: %s", teardown_err)
