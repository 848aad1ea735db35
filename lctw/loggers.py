"""Loggers (``conf/logger``): W&B, CSV or none, all called as ``f(save_dir, name, group, config, ...)``.

W&B runs online when an API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry for
api.wandb.ai) and offline otherwise, with files under the run directory, so a run never waits on the
network. The mode is passed to every ``wandb.init`` explicitly: ``WandbLogger(offline=True)`` would
switch the whole process, which leaks into the next job of a multirun.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

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


def wandb(save_dir: str, name: str, group: str | None, hparams: dict, project: str = "lctw",
          entity: str | None = None, mode: str = "auto", tags: list[str] | None = None, init_timeout: int = 90):
    import wandb as wandb_lib
    from lightning.pytorch.loggers import WandbLogger

    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(
        project=project, entity=entity, name=name, group=group, save_dir=save_dir, tags=list(tags or []),
        mode=wandb_mode(mode), settings=wandb_lib.Settings(init_timeout=init_timeout, console="off"),
        reinit="finish_previous", id=run_id(save_dir), resume="allow",
    )
    logger.log_hyperparams(hparams)
    return logger


def run_id(save_dir: str) -> str:
    """The W&B run id of a run directory, kept in ``<dir>/wandb/run_id``: a run resumed in its directory
    (after a crash or a SLURM requeue) continues the same W&B run."""
    import secrets

    f = Path(save_dir) / "wandb" / "run_id"
    if not f.exists():
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(secrets.token_hex(4))
    return f.read_text().strip()


def csv(save_dir: str, name: str, group: str | None, hparams: dict):
    from lightning.pytorch.loggers import CSVLogger

    logger = CSVLogger(save_dir=save_dir, name="csv", version="")
    logger.log_hyperparams(hparams)
    return logger


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
    """End the W&B run of this job (also after a failure) so the next multirun job starts clean."""
    import sys

    wandb_lib = sys.modules.get("wandb")
    if wandb_lib is not None and wandb_lib.run is not None:
        wandb_lib.finish()
